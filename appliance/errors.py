"""Errors that are the user's to fix: the CLI prints their message, never a traceback."""


class UserError(Exception):
    """A mistake in input the user controls (a config file, a dataset, a model path, an image)."""


class ModelRejected(UserError):
    """A model package failed its checksum, its output contract or its load; it is not used."""


class UnknownModel(UserError):
    """No such version in the model registry."""
