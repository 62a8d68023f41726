"""User-facing failures: one exception type carrying a one-line message and an exit code.

Nothing below the CLI prints or exits; the CLI maps SanitizeError to its code."""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1          # a bug: unexpected exception (traceback only with --debug)
    USAGE = 2             # bad or contradictory flags (typer uses 2 for its own usage errors too)
    NO_ENGINE = 3         # TensorRT not available: sanitized ONNX written instead of the engine
    BAD_MODEL = 4         # unreadable, invalid, hostile or unsupported ONNX model
    BAD_DATA = 5          # missing, empty, unreadable or inconsistent images / npz
    OUTPUT = 6            # output path problem: exists without --force, missing/read-only folder, equals input
    DEGRADED = 7          # sanitized model would break the accuracy budget (use --allow-degraded to write anyway)
    DISAGREE = 8          # `compare`: agreement below --min-agreement
    MISSING_DEP = 9       # an optional dependency (onnxruntime, torch, matplotlib) is not installed


class SanitizeError(Exception):
    """A problem the user can fix; str(e) is a single line."""

    def __init__(self, message: str, code: ExitCode = ExitCode.USAGE):
        super().__init__(" ".join(str(message).split()))
        self.code = ExitCode(code)


class BadModel(SanitizeError):
    def __init__(self, message: str):
        super().__init__(message, ExitCode.BAD_MODEL)


class BadData(SanitizeError):
    def __init__(self, message: str):
        super().__init__(message, ExitCode.BAD_DATA)


class BadOutput(SanitizeError):
    def __init__(self, message: str):
        super().__init__(message, ExitCode.OUTPUT)


def require(module: str, extra: str):
    """Import an optional dependency or fail with one line naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SanitizeError(
            f"{module} is not installed ({e}); install it with: pip install 'onnx-backdoor-sanitizer[{extra}]'",
            ExitCode.MISSING_DEP,
        ) from None
