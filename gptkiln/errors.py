"""One small error tree. Every error says what went wrong and what to do next.

The CLI maps each class to its own exit code (documented in the README); anything that
is not a GptkilnError is a bug in gptkiln and exits with 1 and a traceback.
"""

from __future__ import annotations


class GptkilnError(Exception):
    """Base class: ``cause`` is what went wrong, ``fix`` the next step for the user."""

    exit_code = 1
    details: dict | None = None  # machine-readable context for --json (e.g. a parity report)

    def __init__(self, cause: str, fix: str = ""):
        super().__init__(cause)
        self.cause = cause
        self.fix = fix

    def to_dict(self) -> dict:
        """The error as --json prints it (for a failed build in a matrix too)."""
        return {"type": type(self).__name__, "cause": self.cause, "fix": self.fix, "exit_code": self.exit_code,
                "details": self.details}

    def __str__(self) -> str:
        return f"{self.cause}\n  fix: {self.fix}" if self.fix else self.cause


class UsageError(GptkilnError):
    """Bad arguments: unknown target, conflicting options."""

    exit_code = 2


class ModelNotFoundError(GptkilnError):
    """The model path does not exist or the hub id could not be fetched."""

    exit_code = 3


class NotAModelError(GptkilnError):
    """The path exists but holds no model (no config.json, no weights, no tokenizer)."""

    exit_code = 4


class UnsupportedModelError(GptkilnError):
    """The model exists but is not a decoder-only causal LM gptkiln can export."""

    exit_code = 5


class OutputError(GptkilnError):
    """The output path cannot be used: not empty, a file, a directory gptkiln did not write, unwritable."""

    exit_code = 6


class ExportError(GptkilnError):
    """A pipeline stage (export, compile) failed; the message names the stage."""

    exit_code = 7


class TargetUnavailableError(GptkilnError):
    """The target's runtime is not installed or cannot run on this machine."""

    exit_code = 8


class ParityError(GptkilnError):
    """The build computes something different from PyTorch beyond the tolerances."""

    exit_code = 9


class ArtifactError(GptkilnError):
    """An existing output directory is missing files or was modified."""

    exit_code = 10


class CalibrationError(GptkilnError):
    """Calibration or evaluation data cannot be used: missing, empty, binary, not UTF-8, too short."""

    exit_code = 11


class ConfigError(GptkilnError):
    """A build file is malformed: unknown key, wrong type, bad value; the message names the file and line."""

    exit_code = 12


class BundleError(GptkilnError):
    """A bundle was refused before loading: a file that does not match, a path that escapes the bundle."""

    exit_code = 13
