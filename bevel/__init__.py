"""bevel: capture a PyTorch model as a graph, rewrite it with a pipeline of passes, and run or export the result."""

__version__ = "0.1.0"

from bevel import passes  # noqa: E402
from bevel.runtime import ops as _ops  # noqa: E402,F401  (registers torch.ops.bevel.*)
from bevel.compiler.backend import register as _register_backend  # noqa: E402
from bevel.compiler.captured import CapturedModel, capture  # noqa: E402
from bevel.compiler.compile import compile  # noqa: E402
from bevel.compiler.pipeline import Pipeline  # noqa: E402
from bevel.errors import (ArtifactError, BevelError, CaptureError, ExportError, GenerateError,  # noqa: E402
                          ModelLoadError, ParamError, PassError, PipelineError)
from bevel.runtime.artifact import load  # noqa: E402

__all__ = ["capture", "compile", "CapturedModel", "load", "Pipeline", "passes", "ArtifactError", "BevelError",
           "CaptureError", "ExportError", "GenerateError", "ModelLoadError", "ParamError", "PassError", "PipelineError",
           "__version__"]

_register_backend()  # backend="bevel" for torch.compile, also when the entry point is not installed
