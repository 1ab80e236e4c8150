"""The Label Studio ML backend serving Stable-SAM: HTTP app, LS regions <-> prompts, brush RLE,
image fetching with Label Studio auth, webhook -> training queue, model versions."""
