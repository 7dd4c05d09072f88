"""onnxruntime sessions: provider selection that tells the truth, quiet logs, and running models."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import io
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from onnxruntime.capi.onnxruntime_pybind11_state import EPFail  # a provider failed while running

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
    """Silence what libraries print while CUDA is probed: native writes to fds 1 and 2 (CUDA loader
    messages) and Python print()s (onnxruntime.preload_dlls, "EP Error" lines).

    Python's own buffers are flushed before the fds come back, so a print() made inside never
    reaches the real stdout later (with stdout a file, it would sit in the buffer until then).
    """
    saved = []
    py_streams = (sys.stdout, sys.stderr)
    _flush_python_streams()
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
            os.dup2(devnull, fd)
        os.close(devnull)
    except OSError:
        pass
    sink = io.StringIO()
    sys.stdout = sys.stderr = sink
    try:
        yield
    finally:
        sys.stdout, sys.stderr = py_streams
        _flush_python_streams()
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


def _flush_python_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


@contextlib.contextmanager
def stdout_for_one_document():
    """Reserve stdout for one machine-readable document (`--json`), whatever libraries print.

    While the block runs, fd 1 and sys.stdout point at stderr, so a library's print() or a native
    write to fd 1 lands on stderr (still visible, never mixed into the JSON). Yields the stream
    that reaches the real stdout: the document is written there, and only there.
    """
    _flush_python_streams()
    real = sys.stdout
    try:
        fd = real.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (e.g. a test runner's buffer)
        fd = None
    saved = None
    with contextlib.suppress(AttributeError, OSError, ValueError):
        if fd is not None:
            err_fd = sys.stderr.fileno()
            saved = os.dup(fd)
            os.dup2(err_fd, fd)
    document = real if saved is None else open(saved, "w", encoding=getattr(real, "encoding", None) or "utf-8",
                                               closefd=False)
    sys.stdout = sys.stderr
    try:
        yield document
    finally:
        _flush_python_streams()
        with contextlib.suppress(Exception):
            document.flush()
        sys.stdout = real
        if saved is not None:
            os.dup2(saved, fd)
            os.close(saved)


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
    if not (os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidia0")
            or os.environ.get("CUDA_VISIBLE_DEVICES")):
        return "no NVIDIA GPU found"
    with _quiet_native_output():
        return _cuda_run_probe(ort)


def _cuda_run_probe(ort) -> str:
    try:
        if hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 - best effort: the probe session below reports what is missing
                pass
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
        w = helper.make_tensor("w", TensorProto.FLOAT, [2, 1, 1, 1], [1.0, 2.0])
        graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], group=2)], "probe", [x], [y], [w])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        sess = _new_session(model.SerializeToString(), opts, [(_CUDA, cuda_options("parity"))])
        if _CUDA not in sess.get_providers():
            return "the CUDA provider did not load (no GPU, or CUDA 13 / cuDNN 9 libraries missing)"
        sess.run(None, {"x": np.ones((1, 2, 3, 3), np.float32)})
        if _CUDA not in sess.get_providers():  # defence in depth: fallback is disabled, so this cannot happen
            return "the CUDA provider stopped running the probe Conv (onnxruntime fell back to CPU)"
    except Exception as exc:  # noqa: BLE001 - missing libcublasLt.so.13 / libcudnn.so.9 / no device / EP_FAIL
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


# The CUDA device every session runs on (onnxruntime's `device_id`: an index after CUDA_VISIBLE_DEVICES,
# in CUDA's order); device_name() names this one.
CUDA_DEVICE_ID = 0

# cuDNN/TF32 settings of CUDA sessions, by purpose, so that reports can state them. With cuDNN 9,
# onnxruntime's cudnn_conv_algo_search=EXHAUSTIVE (its default) selects a cuDNN frontend heuristic
# mode: no algorithm is benchmarked. TF32 is onnxruntime's default too; it also selects the Tensor
# Core engines used for float16, so only parity sessions turn it off (float32 parity needs full
# float32 products); timing and tuning use what a deployment with default options runs.
_CUDA_SETTINGS = {
    "parity": {"cudnn_conv_algo_search": "EXHAUSTIVE", "use_tf32": "0"},
    "timing": {"cudnn_conv_algo_search": "EXHAUSTIVE", "use_tf32": "1"},
}
PURPOSES = tuple(_CUDA_SETTINGS)


def cuda_options(purpose: str) -> dict[str, str]:
    """onnxruntime CUDA provider options for a session's purpose: "parity" or "timing"."""
    return {"device_id": str(CUDA_DEVICE_ID)} | _CUDA_SETTINGS[purpose]


def cuda_settings(purpose: str) -> dict:
    """The settings of `purpose`'s CUDA sessions, as reports state them."""
    options = _CUDA_SETTINGS[purpose]
    return {"device_id": CUDA_DEVICE_ID, "tf32": options["use_tf32"] == "1",
            "cudnn_conv_algo_search": f"{options['cudnn_conv_algo_search']} (with cuDNN 9: a heuristic mode, "
                                      "no algorithm benchmarked)",
            "as_deployed": purpose == "timing"}


def settings_text(purpose: str) -> str:
    """One phrase for reports: which CUDA settings produced a number."""
    if purpose == "timing":
        return "onnxruntime's default CUDA settings, as deployed (TF32 on, cuDNN heuristic algorithm choice)"
    return "TF32 off for float32 parity (cuDNN heuristic algorithm choice)"


class CudaFallbackError(GconvError):
    """The CUDA provider failed where onnxruntime would have silently continued on CPU."""


def _new_session(source, opts, providers):
    """The one place sessions are created: onnxruntime's silent fallback to CPU is disabled.

    onnxruntime's Python wrapper otherwise catches a provider failure (EPFail, e.g. "Failed to
    initialize CUDNN Frontend") at creation or in run(), prints "Falling back to ...", switches the
    session to CPU and carries on: CUDA would be reported with CPU numbers.
    """
    sess = _ort().InferenceSession(source, opts, providers=providers, enable_fallback=0)
    sess.disable_fallback()
    return sess


def session(model: onnx.ModelProto | str, choice: ProviderChoice, *, allow_spinning: bool = False,
            purpose: str = "parity", profile: bool = False, label: str = "the model"):
    """An InferenceSession (models over 2 GB must be passed as paths); on CUDA, one that cannot fall back.

    Intra-op spinning is off by default: two sessions timed in one process otherwise steal
    each other's cores. On CUDA, `purpose` picks the settings (see cuda_options): "parity"
    (TF32 off) or "timing" (as deployed).
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
        providers[0] = (_CUDA, cuda_options(purpose))
    source = model if isinstance(model, str) else model.SerializeToString()
    try:
        sess = _new_session(source, opts, providers)
    except Exception as exc:  # noqa: BLE001 - any onnxruntime load failure becomes one clear line
        text = str(exc).strip().splitlines()
        what = "the CUDA provider cannot load" if choice.name == "cuda" else "onnxruntime cannot load"
        raise (CudaFallbackError if choice.name == "cuda" else GconvError)(
            f"{what} {label}: {text[0] if text else exc}") from None
    if choice.name == "cuda":
        return CudaSession(sess, label)
    return sess


class CudaSession:
    """A CUDA session that never hands back CPU results: provider failures become one clear error,
    and the providers are checked again after every run."""

    def __init__(self, sess, label: str):
        self._sess, self.label = sess, label
        self._check("created")

    def _check(self, when: str) -> None:
        if _CUDA not in self._sess.get_providers():
            providers = ", ".join(self._sess.get_providers())
            raise CudaFallbackError(f"--provider cuda: the CUDA provider is not running {self.label} ({when} with "
                                    f"{providers} only); no CPU numbers are reported as CUDA")

    def _guarded(self, call, *args):
        try:
            result = call(*args)
        except EPFail as exc:
            text = str(exc).strip().splitlines()
            raise CudaFallbackError(f"--provider cuda: the CUDA provider failed running {self.label} "
                                    f"({text[0] if text else 'EP_FAIL'}); not retried on CPU") from None
        self._check("after running")
        return result

    def run(self, names, feed):
        return self._guarded(self._sess.run, names, feed)

    def run_with_iobinding(self, binding):
        return self._guarded(self._sess.run_with_iobinding, binding)

    def __getattr__(self, name):  # get_outputs, io_binding, end_profiling ...
        return getattr(self._sess, name)


class Runner:
    """Runs one session on one feed; on CUDA with inputs and outputs bound on the device (IO binding)."""

    def __init__(self, sess, feed: dict[str, np.ndarray], choice: ProviderChoice):
        self.sess = sess
        self.feed = feed
        self.binding = None
        if choice.name == "cuda":
            if not isinstance(sess, CudaSession):  # CUDA values bound to a CPU session would be copied back silently
                raise CudaFallbackError("IO binding on CUDA needs a CUDA session (runtime.session)")
            ort = _ort()
            self.binding = sess.io_binding()
            for name, value in feed.items():
                value = ort.OrtValue.ortvalue_from_numpy(value, "cuda", CUDA_DEVICE_ID)
                self.binding.bind_ortvalue_input(name, value)
            for out in sess.get_outputs():
                self.binding.bind_output(out.name, "cuda", CUDA_DEVICE_ID)

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
    """The GPU onnxruntime's CUDA provider runs on: CUDA device CUDA_DEVICE_ID, counted as CUDA counts
    (CUDA_VISIBLE_DEVICES applied, fastest first unless CUDA_DEVICE_ORDER says otherwise; a MIG
    instance by its own name), asked of the CUDA driver. Without the driver, /proc names the GPU
    only when it lists exactly one that CUDA may see; otherwise the name is honestly unknown."""
    name = _cuda_driver_device_name(CUDA_DEVICE_ID)
    if name:
        return name
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return "unknown NVIDIA GPU (CUDA_VISIBLE_DEVICES hides every GPU)"
    models = _proc_gpu_models()
    if len(set(models)) == 1:
        return models[0]  # one GPU, or several of one model: device 0 is that model either way
    if models:
        return f"unknown NVIDIA GPU (one of {len(models)}: {', '.join(sorted(set(models)))})"
    return "unknown NVIDIA GPU"


def _load_cuda_driver():
    """libcuda (the CUDA driver API), or None where there is none."""
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def _cuda_driver_device_name(ordinal: int) -> str:
    """cuDeviceGetName of CUDA device `ordinal` ('' when the driver cannot say)."""
    driver = _load_cuda_driver()
    if driver is None:
        return ""
    try:
        device, count = ctypes.c_int(), ctypes.c_int()
        if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= ordinal:
            return ""
        if driver.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
            return ""
        buffer = ctypes.create_string_buffer(256)
        if driver.cuDeviceGetName(buffer, len(buffer), device) != 0:
            return ""
        return buffer.value.decode(errors="replace").strip()
    except (AttributeError, OSError, ValueError):
        return ""


def _proc_gpu_models() -> list[str]:
    """GPU models listed by the NVIDIA kernel driver, in PCI order (not CUDA's)."""
    root, models = "/proc/driver/nvidia/gpus", []
    try:
        for entry in sorted(os.listdir(root)):
            with open(os.path.join(root, entry, "information")) as f:
                models += [line.split(":", 1)[1].strip() for line in f if line.startswith("Model:")]
    except OSError:
        pass
    return models


def cuda_runs_here() -> bool:
    """True when onnxruntime's CUDA provider really runs a Conv on this machine."""
    return not _cuda_problem()


def ort_version() -> str:
    return _ort().__version__
