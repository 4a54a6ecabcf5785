"""Let a bevel error raised inside the ``torch.compile`` backend reach the user as that same error type.

Dynamo wraps an exception raised by a backend in ``BackendCompilerFailed`` (a RuntimeError), so
``except bevel.PipelineError`` around a call of the compiled model would miss it. Dynamo lets its own
``ShortenTraceback`` errors through unwrapped; :func:`surface_to_user` makes the bevel error one of
those too, keeping its type, message and attributes.
"""

from __future__ import annotations

import functools
from typing import Any

from bevel.errors import BevelError


def surface_to_user(error: BevelError) -> BevelError:
    """``error`` as an exception of the same bevel type that reaches the caller of the compiled model.

    The result is an instance of both the original bevel type and dynamo's ``ShortenTraceback``,
    with the same message and attributes, so the user sees ``bevel.errors.PipelineError: ...``.
    Should that dynamo class ever go away, the error is returned as it is and the user gets
    dynamo's ``BackendCompilerFailed`` whose message quotes it.
    """
    try:
        surfaced_type = _user_facing_type(type(error))
    except (ImportError, TypeError):
        return error
    surfaced = surfaced_type.__new__(surfaced_type, *error.args)
    surfaced.args = error.args
    surfaced.__dict__.update(error.__dict__)
    surfaced.first_useful_frame = None  # keep the whole traceback: ShortenTraceback trims to this frame
    return surfaced.with_traceback(error.__traceback__)


@functools.cache
def _user_facing_type(error_type: type[BevelError]) -> type[BevelError]:
    """``error_type`` made one that dynamo passes through unwrapped; one class per bevel error type."""
    from torch._dynamo.exc import ShortenTraceback

    def __reduce__(self: BevelError) -> tuple[Any, ...]:  # pickles as the plain bevel error
        state = {k: v for k, v in self.__dict__.items() if k != "first_useful_frame"}
        return error_type.__new__, (error_type, *self.args), state

    # Same name, module and qualname: tracebacks and reprs read as the plain bevel error.
    return type(error_type.__name__, (error_type, ShortenTraceback),
                {"__module__": error_type.__module__, "__qualname__": error_type.__qualname__,
                 "__reduce__": __reduce__})
