"""Measure a conv geometry in each exact form on this machine, and cache what was measured.

One probe = a single-node model (input -> grouped Conv with bias -> output) in the native form,
rewritten into each other form by the same code that rewrites user models, then timed with the
verification's session options (spinning off, own sessions), the forms rotated round by round.
The calibration script (benchmarks/calibrate.py), the accuracy benchmark and `tune` all use it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import textwrap
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import runtime
from .geometry import ConvSpec, conv_output_dims
from .wording import tail

FORMS = ("native", "dw", "split", "dense")
CACHE_VERSION = 1
_HOPELESS = 4.0  # a form this many times slower than the best on a first run is not timed further


@dataclass(frozen=True)
class Probe:
    """One geometry at one batch size: everything that decides a conv's run time."""

    c_in: int
    c_out: int
    group: int
    spatial: tuple[int, ...]  # input spatial size
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...] | None
    auto_pad: str
    dtype: str
    batch: int

    @classmethod
    def from_spec(cls, spec: ConvSpec, batch: int | None = None) -> "Probe | None":
        """The probe of a candidate's spec; None when its spatial size is not static. A symbolic batch is 1."""
        shape = spec.input_shape
        if not shape or len(shape) != spec.rank + 2 or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
            return None
        if batch is None:
            batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else 1
        return cls(spec.c_in, spec.c_out, spec.group, tuple(shape[2:]), spec.kernel, spec.strides, spec.dilations,
                   spec.pads, spec.auto_pad, spec.dtype, int(batch))

    @property
    def cig(self) -> int:
        return self.c_in // self.group

    @property
    def cog(self) -> int:
        return self.c_out // self.group

    def output_spatial(self) -> tuple[int, ...]:
        return conv_output_dims(self.spatial, self.kernel, self.strides, self.dilations, self.pads, self.auto_pad)

    def key(self) -> str:
        """A stable text key (cache, CSV)."""
        pads = "x".join(map(str, self.pads)) if self.pads is not None else self.auto_pad
        join = lambda v: "x".join(map(str, v))  # noqa: E731
        return (f"{self.dtype} N{self.batch} Cin{self.c_in} Cout{self.c_out} G{self.group} in{join(self.spatial)} "
                f"k{join(self.kernel)} s{join(self.strides)} d{join(self.dilations)} p{pads}")

    def describe(self) -> str:
        k = "x".join(map(str, self.kernel))
        text = f"N={self.batch} Cin={self.c_in} Cout={self.c_out} G={self.group} k={k} in={'x'.join(map(str, self.spatial))}"
        if any(s != 1 for s in self.strides):
            text += " s=" + "x".join(map(str, self.strides))
        return text

    def model(self, seed: int = 0) -> onnx.ModelProto:
        """The single-node native model of this probe (float weights with a bias)."""
        rng = np.random.default_rng(seed)
        np_dtype = np.dtype(self.dtype)
        elem = helper.np_dtype_to_tensor_dtype(np_dtype)
        fan_in = self.cig * math.prod(self.kernel)
        w = (rng.standard_normal((self.c_out, self.cig) + self.kernel) / math.sqrt(fan_in)).astype(np_dtype)
        b = rng.standard_normal(self.c_out).astype(np_dtype)
        attrs = dict(group=self.group, kernel_shape=list(self.kernel), strides=list(self.strides),
                     dilations=list(self.dilations))
        if self.pads is not None:
            attrs["pads"] = list(self.pads)
        else:
            attrs["auto_pad"] = self.auto_pad
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)
        x = helper.make_tensor_value_info("x", elem, [self.batch, self.c_in, *self.spatial])
        y = helper.make_tensor_value_info("y", elem, [self.batch, self.c_out, *self.output_spatial()])
        graph = helper.make_graph([node], "probe", [x], [y],
                                  [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    def intermediate_bytes(self) -> int:
        """Bytes of the depthwise emulation's intermediate (C_in*Cog channels at the output size)."""
        return self.batch * self.c_in * self.cog * math.prod(self.output_spatial()) * np.dtype(self.dtype).itemsize


def form_models(probe: Probe) -> dict[str, onnx.ModelProto]:
    """The probe in every exact form, each written by the rewriter itself."""
    from .cost import Planner
    from .rewrite import rewrite_model

    planner = Planner("cpu", TuneCache(read=False))  # forced forms: predictions are not needed
    native = probe.model()
    models = {"native": native}
    for form in FORMS[1:]:
        copy = onnx.ModelProto()
        copy.CopyFrom(native)
        decisions = rewrite_model(copy, form=form, planner=planner)
        if decisions and decisions[0].action in ("expanded", "converted"):
            models[form] = copy
    return models


@dataclass
class Measurement:
    """Median ms of each form of one probe (None: not measured), with the quartiles and the method."""

    probe: str
    times_ms: dict[str, float | None]
    quartiles_ms: dict[str, tuple[float, float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # form -> why not timed in full
    rounds: int = 0

    def best(self) -> str:
        times = {f: t for f, t in self.times_ms.items() if t is not None}
        return min(times, key=times.get)


def measure(probe: Probe, choice: runtime.ProviderChoice, forms=FORMS, rounds: int = 9, min_round_s: float = 0.01,
            max_intermediate_bytes: int = 1 << 30, seed: int = 0) -> Measurement:
    """Time `forms` of `probe` on `choice`'s provider, rotated round by round.

    A form more than 4x slower than the best on a first run (after one run that builds plans)
    keeps that rough time and is noted, not timed in full; the dw form is not built when its
    intermediate would exceed `max_intermediate_bytes`.
    """
    result = Measurement(probe.key(), {f: None for f in forms})
    models = form_models(probe)
    rng = np.random.default_rng(seed)
    feed = {"x": rng.standard_normal((probe.batch, probe.c_in, *probe.spatial)).astype(np.dtype(probe.dtype))}
    runners, first = {}, {}
    for form in forms:
        if form not in models:
            result.notes[form] = "no such form for this conv"
            continue
        if form == "dw" and probe.intermediate_bytes() > max_intermediate_bytes:
            result.notes[form] = f"intermediate of {probe.intermediate_bytes() / 2**20:.0f} MiB not built"
            continue
        sess = runtime.session(models[form], choice, purpose="timing", label=f"the {form} probe")
        run = runtime.Runner(sess, feed, choice)
        run()  # plans, allocations
        start = time.perf_counter()
        run()
        first[form] = (time.perf_counter() - start) * 1000
        runners[form] = run
    fastest = min(first.values())
    timed = [f for f in runners if first[f] <= _HOPELESS * fastest]
    for form in runners:
        if form not in timed:
            result.times_ms[form] = first[form]
            result.notes[form] = f"one run only: {first[form] / fastest:.1f}x the fastest first run"
    if len(timed) == 1:
        result.times_ms[timed[0]] = first[timed[0]]
        return result
    times, _, _ = runtime.time_rotated([runners[f] for f in timed], rounds, min_round_s)
    for form, ms in zip(timed, times):
        result.times_ms[form] = float(np.median(ms))
        result.quartiles_ms[form] = (float(np.percentile(ms, 25)), float(np.percentile(ms, 75)))
    result.rounds = rounds
    return result


# -- the cache -----------------------------------------------------------------------------------

def cache_path() -> str:
    """$GCONV_REWRITE_CACHE, else $XDG_CACHE_HOME/gconv-rewrite/tune.json, else ~/.cache/gconv-rewrite/tune.json."""
    if os.environ.get("GCONV_REWRITE_CACHE"):
        return os.environ["GCONV_REWRITE_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gconv-rewrite", "tune.json")


def target_key(provider: runtime.ProviderChoice | str, device: str | None = None) -> str:
    """What a measurement depends on besides the geometry: device (this machine's unless named),
    provider, onnxruntime version, and on CUDA the session settings."""
    name = provider if isinstance(provider, str) else provider.name
    key = f"{device or runtime.device_name(name)} | {name} | onnxruntime {runtime.ort_version()}"
    return key + f" | {runtime.settings_text('timing')}" if name == "cuda" else key


def _well_formed(targets) -> bool:
    """Every entry a measurement this version can read: a damaged file is reported, never half-used."""
    known = {f.name for f in fields(Measurement)}
    for probes in targets.values():
        if not isinstance(probes, dict):
            return False
        for entry in probes.values():
            if (not isinstance(entry, dict) or not set(entry) <= known or "probe" not in entry
                    or not isinstance(entry.get("times_ms"), dict)):
                return False
            times = entry["times_ms"].values()
            if not all(v is None or isinstance(v, (int, float)) for v in times) or all(v is None for v in times):
                return False
    return True


class TuneCache:
    """Measured times per (device, provider, onnxruntime version) and probe key, in one JSON file."""

    def __init__(self, path: str | None = None, read: bool = True):
        self.path = path or cache_path()
        self.entries: dict[str, dict[str, dict]] = {}
        self.problem = ""  # why an existing file is not used (and will not be overwritten)
        if not read:
            return
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (FileNotFoundError, NotADirectoryError):
            return  # no cache yet (check_writable says if one cannot be made there)
        except (OSError, ValueError) as exc:
            self.problem = f"unreadable ({getattr(exc, 'strerror', None) or type(exc).__name__})"
            return
        if not isinstance(data, dict) or "targets" not in data or not isinstance(data["targets"], dict):
            self.problem = "not a gconv-rewrite tune cache"
        elif data.get("version") == CACHE_VERSION:
            if not _well_formed(data["targets"]):
                self.problem = "not a gconv-rewrite tune cache (malformed entries)"
            else:
                self.entries = data["targets"]
        # another version: its entries are ignored and replaced

    def check_writable(self) -> None:
        """Raise GconvError now, before any measurement, if save() could not write the file."""
        from .errors import GconvError

        if self.problem:
            raise GconvError(f"tune cache {self.path} is {self.problem}; not overwritten "
                             "(delete it or choose another --cache)")
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise GconvError(f"cannot create the tune cache folder {folder} ({exc.strerror or exc})") from None
        if not os.access(folder, os.W_OK):
            raise GconvError(f"cannot write the tune cache in {folder} (permission denied)")

    def get(self, target: str, probe: Probe) -> Measurement | None:
        entry = self.entries.get(target, {}).get(probe.key())
        if entry is None:
            return None
        entry = dict(entry)
        entry["quartiles_ms"] = {f: tuple(q) for f, q in entry.get("quartiles_ms", {}).items()}
        return Measurement(**entry)

    def put(self, target: str, measurement: Measurement) -> None:
        self.entries.setdefault(target, {})[measurement.probe] = asdict(measurement)

    def save(self) -> None:
        """Write atomically (a reader never sees half a file)."""
        self.check_writable()
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"version": CACHE_VERSION, "targets": self.entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as exc:
            from .errors import GconvError
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise GconvError(f"cannot write the tune cache {self.path} ({exc.strerror or exc})") from None


def wait_for_quiet(max_wait_s: float = 10.0, busy_cores: float = 0.15) -> float:
    """Wait (up to `max_wait_s`) until other processes use less than `busy_cores` cores; returns their load.

    Reads /proc/stat over 0.2 s while this process sleeps, so what it sees is someone else's work.
    Returns 0.0 where /proc/stat does not exist.
    """
    deadline = time.monotonic() + max_wait_s
    load = 0.0
    while True:
        try:
            a = _cpu_times()
            time.sleep(0.2)
            b = _cpu_times()
        except OSError:
            return 0.0
        busy = (b[0] - a[0]) / max(b[1] - a[1], 1)
        load = busy * (os.cpu_count() or 1)
        if load < busy_cores or time.monotonic() > deadline:
            return load
        time.sleep(0.5)


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


@dataclass
class TuneEntry:
    """One distinct conv geometry of a model, as measured (or found in the cache)."""

    probe: str
    nodes: list[str]  # the candidates with this geometry
    times_ms: dict[str, float | None]
    best: str
    cached: bool
    notes: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        """The node(s), then each form's time and the fastest, wrapped to 80 columns."""
        times = ", ".join(f"{f} {self.times_ms[f]:.3f}" for f in FORMS if self.times_ms.get(f) is not None)
        where = self.nodes[0] + (f" (+{len(self.nodes) - 1} more)" if len(self.nodes) > 1 else "")
        native = self.times_ms.get("native")
        gain = f" ({native / self.times_ms[self.best]:.2f}x native)" if native and self.best != "native" else ""
        head = tail(where, 70) + (" [cached]" if self.cached else "")
        return head + "\n" + textwrap.fill(f"measured ms: {times} -> {self.best}{gain}", 80, initial_indent="    ",
                                           subsequent_indent="      ")


@dataclass
class TuneReport:
    """What `tune` measured: per distinct geometry, every form's time on the target."""

    target: str
    cache: str
    entries: list[TuneEntry] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # candidates without a static geometry

    def lines(self) -> list[str]:
        """The terminal report: one line per geometry, a summary, the cache file."""
        lines = [e.line() for e in self.entries]
        measured = sum(not e.cached for e in self.entries)
        wins = {f: sum(e.best == f for e in self.entries) for f in FORMS}
        summary = (f"{len(self.entries)} geometr{'y' if len(self.entries) == 1 else 'ies'}: "
                   f"{measured} measured, {len(self.entries) - measured} from the cache")
        if self.entries:
            summary += "; fastest: " + ", ".join(f"{f} {n}" for f, n in wins.items() if n)
        lines.append(summary)
        lines.append(textwrap.fill(f"on: {self.target}", 80, subsequent_indent="  "))
        if self.skipped:
            lines.append(textwrap.fill(f"not tuned (spatial size not static; give it with --input-shape): "
                                       f"{', '.join(self.skipped)}", 80, subsequent_indent="  "))
        lines.append(f"cache: {self.cache}")
        return lines

    def summary(self) -> str:
        """One line for the main command's report after --tune."""
        measured = sum(not e.cached for e in self.entries)
        text = (f"tuned {len(self.entries)} geometr{'y' if len(self.entries) == 1 else 'ies'} "
                f"({measured} measured, {len(self.entries) - measured} cached)")
        if self.skipped:
            text += f"; {len(self.skipped)} not tuned (spatial size not static)"
        return text

    def to_dict(self) -> dict:
        """Plain data, as `tune --json` prints it (schema gconv-rewrite/tune-report, docs/reports.md)."""
        return {"schema": "gconv-rewrite/tune-report", "version": 1} | asdict(self)
