"""What the web process and the training worker share: settings, model resolution, the model
versions store, the training queue, and logging with token redaction."""
