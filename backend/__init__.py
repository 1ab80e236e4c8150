"""The Label Studio ML backend over HTTP: the app, request schemas, auth, errors, the Label
Studio backend (predict / setup / webhook), regions -> prompts, and the image and embedding caches."""
