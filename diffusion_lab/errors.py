"""Errors that stop a run with one clear line (``run.py`` prints them without a traceback)."""


class DiffusionLabError(Exception):
    """Base class: the message names the problem and the fix, on one line."""


class ConfigError(DiffusionLabError):
    """A config key that does not exist or a value out of range."""


class DataError(DiffusionLabError):
    """A missing, unreadable or corrupt data set."""


class TrainingDivergedError(DiffusionLabError):
    """A NaN or infinite loss."""


class CheckpointError(DiffusionLabError):
    """A checkpoint that cannot be written (a full disk, a folder without write permission)."""


class TrainingFailedError(DiffusionLabError):
    """An unexpected exception during training or validation (the traceback goes to a file)."""
