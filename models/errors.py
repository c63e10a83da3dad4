class ModelError(ValueError):
    """A user-facing problem with a checkpoint or its config: the CLI prints it as one line."""
