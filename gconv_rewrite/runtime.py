"""onnxruntime sessions: provider selection that tells the truth, quiet logs, and running models."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from dataclasses import dataclass

import numpy as np
import onnx

from .errors import GconvError

PROVIDERS = ("auto", "cpu", "cuda")
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


def _ort():
    import onnxruntime as ort

    ort.set_default_logger_severity(4)  # expected fallbacks must not print red errors
    return ort


@contextlib.contextmanager
def _quiet_native_output():
    """Silence what native libraries print straight to fds 1 and 2 (CUDA loader messages)."""
    saved = []
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
            os.dup2(devnull, fd)
        os.close(devnull)
    except OSError:
        pass
    try:
        yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


@dataclass(frozen=True)
class ProviderChoice:
    name: str  # "cpu" | "cuda"
    ort_providers: tuple[str, ...]
    note: str  # why this provider (e.g. why CUDA was not used)


@functools.lru_cache(maxsize=None)
def _cuda_problem() -> str:
    """'' when the CUDA provider really loads and runs a Conv, else the reason it does not."""
    ort = _ort()
    if _CUDA not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA provider"
    if not (os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidia0") or os.environ.get("CUDA_VISIBLE_DEVICES")):
        return "no NVIDIA GPU found"
    with _quiet_native_output():
        return _cuda_run_probe(ort)


def _cuda_run_probe(ort) -> str:
    try:
        if hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()
            except Exception:
                pass
        from onnx import TensorProto, helper
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
        w = helper.make_tensor("w", TensorProto.FLOAT, [2, 1, 1, 1], [1.0, 2.0])
        graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], group=2)], "probe", [x], [y], [w])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=[_CUDA])
        if _CUDA not in sess.get_providers():
            return "the CUDA provider did not load (no GPU, or CUDA 13 / cuDNN 9 libraries missing)"
        sess.run(None, {"x": np.ones((1, 2, 3, 3), np.float32)})
    except Exception as exc:  # missing libcublasLt.so.13 / libcudnn.so.9 / no device ...
        text = str(exc).strip().splitlines()
        return f"the CUDA provider does not run: {text[0] if text else type(exc).__name__}"
    return ""


def choose_provider(provider: str) -> ProviderChoice:
    """Resolve auto|cpu|cuda; asking for CUDA where it does not work is an error, never a silent CPU run."""
    if provider not in PROVIDERS:
        raise GconvError(f"unknown provider '{provider}' (choose from {', '.join(PROVIDERS)})")
    if provider == "cpu":
        return ProviderChoice("cpu", (_CPU,), "asked for CPU")
    problem = _cuda_problem()
    if provider == "cuda":
        if problem:
            raise GconvError(f"--provider cuda: {problem}")
        return ProviderChoice("cuda", (_CUDA, _CPU), "asked for CUDA")
    if problem:
        return ProviderChoice("cpu", (_CPU,), f"auto: CPU, since {problem}")
    return ProviderChoice("cuda", (_CUDA, _CPU), "auto: the CUDA provider works here")


def session(model: onnx.ModelProto | str, choice: ProviderChoice, *, threads: int | None = None,
            allow_spinning: bool = True):
    """An InferenceSession; models over 2 GB must be passed as paths."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not allow_spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, str) else model.SerializeToString()
    try:
        return ort.InferenceSession(source, opts, providers=list(choice.ort_providers))
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise GconvError(f"onnxruntime cannot load the model: {text[0] if text else exc}") from None


def ort_version() -> str:
    return _ort().__version__


def cpu_count() -> int:
    return os.cpu_count() or 1
