"""Errors a user can act on. Each carries the process exit code the CLI returns."""


class StreamqError(Exception):
    """Base class: a failure with a message meant for the user, not a traceback."""

    exit_code = 1


class ConfigError(StreamqError):
    """The YAML or the command line asks for something invalid (exit code 2)."""

    exit_code = 2


class CheckpointError(StreamqError):
    """The source checkpoint is missing, truncated, corrupt or unsupported."""

    exit_code = 1


class DatasetError(StreamqError):
    """The calibration data cannot be read; the message names file and line."""

    exit_code = 1


class OutputError(StreamqError):
    """The output directory cannot be used (not ours, a different job, no space)."""

    exit_code = 1


class BudgetError(StreamqError):
    """The job does not fit in the memory budget (exit code 3)."""

    exit_code = 3
