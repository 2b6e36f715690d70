"""Errors the CLI turns into one clear line and a non-zero exit."""


class ReplaceMeError(Exception):
    """A problem with the user's input or environment (runtime failure, exit code 1)."""

    exit_code = 1


class UsageError(ReplaceMeError):
    """A malformed command line or config (exit code 2)."""

    exit_code = 2


class UnsupportedModelError(ReplaceMeError):
    """An architecture or config field this tool does not implement faithfully."""


class CheckpointError(ReplaceMeError):
    """A missing, corrupt or inconsistent checkpoint file."""


class NumericalError(ReplaceMeError):
    """NaN/Inf in weights or activations, or a singular system."""
