"""Errors raised while reading model files, so callers can tell a bad file from a bug."""


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, truncated, unsafe, or does not match the model it should hold."""
