"""The errors bevel raises for things a user can fix: each names what is wrong and where."""

from __future__ import annotations

import re


def first_line(error: BaseException | str) -> str:
    """The first non-empty line of an error or message, for one-line reports of underlying failures
    (terminal colour codes, which some libraries put in their messages, taken out)."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()
    return lines[0] if lines else (type(error).__name__ if isinstance(error, BaseException) else "")


class BevelError(Exception):
    """Base of every error bevel raises on purpose; the CLI turns it into exit code 2."""


class CaptureError(BevelError):
    """The model could not be turned into a graph (torch.export failed)."""


class PipelineError(BevelError):
    """A pipeline string or list is malformed, names an unknown pass or parameter, or is ordered wrongly."""


class ParamError(PipelineError):
    """A pass parameter is unknown, has the wrong type or is out of its range; ``key`` names it."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class PassError(BevelError):
    """A pass failed while rewriting the graph."""


class ArtifactError(BevelError):
    """A saved artifact is missing a file, was modified, or was written by an incompatible version."""


class ModelLoadError(BevelError):
    """A MODEL reference (``package.module:callable`` or a built-in name) could not be resolved."""


class ExportError(BevelError):
    """The compiled graph could not be written as ONNX."""


class GenerateError(BevelError):
    """``generate`` (or a decode stream) was given a prompt, a length, a token or a sampling setting it
    cannot run."""
