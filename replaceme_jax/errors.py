"""Errors the CLI turns into one clear line and a non-zero exit.

Exit codes, the same in every command: 0 success; 1 a runtime problem with the inputs or the
environment (bad checkpoint, data, disk, NaN/Inf); 2 a usage problem the command line or config
can fix (unknown or mistyped key, bad value, existing output without --overwrite); 130 interrupted
(Ctrl-C), with no partial output.
"""


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


class OutputExistsError(UsageError):
    """The output location holds something and replacing it was not asked for (exit code 2)."""

    def __init__(self, path):
        super().__init__(f"{path}: output exists and is not empty (pass --overwrite, or set overwrite: true, to "
                         f"replace it)")
