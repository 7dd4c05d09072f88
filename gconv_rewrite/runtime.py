"""onnxruntime sessions: provider selection that tells the truth, quiet logs, and running models."""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from .errors import GconvError

PROVIDERS = ("auto", "cpu", "cuda")
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


def _ort():
    """onnxruntime, its logger quietened before first use."""
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


def target_provider(provider: str) -> ProviderChoice:
    """The provider to plan for, which need not run here: `--provider cuda` on a CPU-only machine
    plans a GPU deployment with the CUDA cost profile (nothing is run, so nothing is refused)."""
    if provider == "cuda" and _cuda_problem():
        return ProviderChoice("cuda", (), f"planned for CUDA without running it here ({_cuda_problem()})")
    return choose_provider(provider)


# cuDNN settings used for every CUDA session, so that reports can state them.
CUDNN_CONV_ALGO_SEARCH = "EXHAUSTIVE"


def session(model: onnx.ModelProto | str, choice: ProviderChoice, *, allow_spinning: bool = False,
            tf32: bool = False, profile: bool = False, label: str = "the model"):
    """An InferenceSession (models over 2 GB must be passed as paths).

    Intra-op spinning is off by default: two sessions timed in one process otherwise steal
    each other's cores. On CUDA, TF32 is off unless asked (fp32 parity needs it off).
    """
    ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # failures reach the user as one GconvError line, not as red logs
    if not allow_spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile:
        opts.enable_profiling = True
    providers: list = list(choice.ort_providers)
    if choice.name == "cuda":
        providers[0] = (_CUDA, {"cudnn_conv_algo_search": CUDNN_CONV_ALGO_SEARCH, "use_tf32": "1" if tf32 else "0"})
    source = model if isinstance(model, str) else model.SerializeToString()
    try:
        return ort.InferenceSession(source, opts, providers=providers)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise GconvError(f"onnxruntime cannot load {label}: {text[0] if text else exc}") from None


class Runner:
    """Runs one session on one feed; on CUDA with inputs and outputs bound on the device (IO binding)."""

    def __init__(self, sess, feed: dict[str, np.ndarray], choice: ProviderChoice):
        self.sess = sess
        self.feed = feed
        self.binding = None
        if choice.name == "cuda":
            ort = _ort()
            self.binding = sess.io_binding()
            for name, value in feed.items():
                self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
            for out in sess.get_outputs():
                self.binding.bind_output(out.name, "cuda")

    def __call__(self) -> None:
        if self.binding is None:
            self.sess.run(None, self.feed)
        else:  # run_with_iobinding synchronises the CUDA stream before returning
            self.sess.run_with_iobinding(self.binding)


@dataclass
class Timing:
    """Interleaved timing of two runners: per-round times (ms) of each, and their per-round ratios."""

    a_ms: list[float]
    b_ms: list[float]
    runs_per_round: int
    warmup_runs: tuple[int, int]

    @property
    def ratios(self) -> list[float]:
        return [b / a for a, b in zip(self.a_ms, self.b_ms)]


def _warm_up(run, max_runs: int = 60, window: int = 3, spread: float = 0.1) -> tuple[int, float]:
    """Run until the last `window` times agree within `spread` (first runs build plans, fill caches)."""
    times: list[float] = []
    while len(times) < max_runs:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
        if len(times) >= window + 2:
            last = times[-window:]
            if max(last) <= (1 + spread) * min(last):
                break
    return len(times), float(np.median(times[-window:]))


def time_interleaved(run_a, run_b, rounds: int = 20, min_round_s: float = 0.03, progress=None) -> Timing:
    """Warm both up, then alternate A,B / B,A round by round (see `time_rotated`)."""
    times, k, warm = time_rotated([run_a, run_b], rounds, min_round_s, progress)
    return Timing(times[0], times[1], k, (warm[0], warm[1]))


def time_rotated(runs, rounds: int = 20, min_round_s: float = 0.03, progress=None,
                 ) -> tuple[list[list[float]], int, list[int]]:
    """Per-round times (ms) of several runners, the order rotated each round.

    Each runner is first warmed up until stable. In each round each runs k times (k chosen so
    a round lasts about `min_round_s`); the round's time is the median of those k runs, so a
    burst of background load in one run does not decide the round. Returns (times per runner,
    k, warm-up runs per runner).
    """
    warm = [_warm_up(run) for run in runs]
    k = int(min(50, max(3, np.ceil(min_round_s / max(min(t for _, t in warm), 1e-6)))))
    times: list[list[float]] = [[] for _ in runs]
    clock = time.perf_counter
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()  # as timeit does: a collection of someone else's garbage must not land in one round
    try:
        for r in range(rounds):
            order = list(range(len(runs)))
            order = order[r % len(runs):] + order[:r % len(runs)]
            if len(runs) > 2 and (r // len(runs)) % 2:
                order.reverse()  # every runner also follows every other, not only one
            for which in order:
                run = runs[which]
                per_run = []
                for _ in range(k):
                    start = clock()
                    run()
                    per_run.append(clock() - start)
                times[which].append(float(np.median(per_run)) * 1000)
            if progress is not None:
                progress(r + 1, rounds)
    finally:
        if collecting:
            gc.enable()
    return times, k, [n for n, _ in warm]


def device_name(choice: ProviderChoice | str) -> str:
    """The device a provider runs on, as measurements must be keyed: CPU model and threads, or GPU model."""
    if (choice if isinstance(choice, str) else choice.name) == "cuda":
        return _gpu_name()
    return _cpu_name()


@functools.lru_cache(maxsize=None)
def _cpu_name() -> str:
    name, flags, fields = "unknown CPU", "", {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name == "unknown CPU":
                    name = value.strip()
                elif key == "flags" and not flags:
                    flags = value
                elif key in ("cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if line.strip() == "":
                    break  # the first processor says it all
    except OSError:
        name = platform.processor() or platform.machine() or name
    isa = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else ""
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if fields:  # "AMD EPYC" alone does not tell Zen 3 from Zen 5
        name += f" (family {fields.get('cpu family', '?')} model {fields.get('model', '?')})"
    return f"{name}{' ' + isa if isa else ''}, {threads} threads"


def nchwc_block() -> int:
    """Channels per block of onnxruntime's NCHWc CPU kernels: 16 with AVX-512, else 8."""
    return 16 if "AVX-512" in _cpu_name() else 8


@functools.lru_cache(maxsize=None)
def _gpu_name() -> str:
    root = "/proc/driver/nvidia/gpus"
    try:
        for entry in sorted(os.listdir(root)):
            with open(os.path.join(root, entry, "information")) as f:
                for line in f:
                    if line.startswith("Model:"):
                        return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown NVIDIA GPU"


def ort_version() -> str:
    return _ort().__version__
