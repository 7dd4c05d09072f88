"""gconv-rewrite: rewrite grouped convolutions in ONNX models between native and emulated forms, exactly.

    import gconv_rewrite as gr
    result = gr.rewrite("model.onnx", direction="fuse")
    for d in result.decisions:
        print(d.line())
    result.save("out.onnx")
"""

from .api import inspect, rewrite, tune
from .cost import Prediction
from .errors import GconvError, InternalError, VerificationError
from .geometry import ConvSpec
from .inspection import Finding, InspectReport
from .report import Decision, RewriteResult
from .tune_report import TuneReport
from .verify import OutputParity, VerifyReport, verify

__version__ = "0.1.0"
__all__ = ["rewrite", "verify", "inspect", "tune", "TuneReport", "Prediction", "InspectReport", "Finding",
           "RewriteResult", "Decision", "ConvSpec", "VerifyReport", "OutputParity",
           "GconvError", "InternalError", "VerificationError", "__version__"]
