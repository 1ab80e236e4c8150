"""The one Label Studio adapter: its REST API, task images, brush RLE, labeling configs, and the
percent <-> pixel geometry of regions. No torch and no web framework: the backend, the training
job and the user-study evaluator all talk to Label Studio through this package."""
