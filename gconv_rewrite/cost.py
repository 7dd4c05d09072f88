"""The cost model: which exact form of a grouped conv runs fastest on a provider.

Two parts, both fitted by benchmarks/calibrate.py from measurements of single-conv models
(the fitting is cost_fit.py; this module only predicts):

* native time: a power law per onnxruntime kernel path (ms = e^c0 * MACs^c1 * Cig^c2 * ...),
  fitted in log space. The CPU provider runs a grouped Conv on its NCHWc kernel when Cig and
  Cog are multiples of the block (8 with AVX2, 16 with AVX-512), else as one im2col + small
  GEMM per group: the two paths differ by up to 10x in throughput, hence two fits.
* every other form relative to native: the median time ratio of the k calibrated geometries
  nearest to this one, in a space of the features that decide which kernels run (log Cig,
  log Cog, log kernel area, log N*Ho*Wo, log G, stride > 1, NCHWc path, Cog = 1). Ratios vary
  far less than times, and the neighbours carry the kernel effects no formula here would
  (e.g. the depthwise kernel used only when Cog = 1).

A form other than native is chosen only when predicted at least `margin` (5%) faster: native
is one node, and a small predicted gain is within the noise of the calibration itself.
Measured times (`tune`) replace predictions. Providers without a calibration for this device
use a documented roofline prior, and every prediction says which basis it has.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from . import runtime
from .errors import GconvError
from .geometry import FORMS, Probe

PROFILE_SCHEMA = "gconv-rewrite/cost-profile"
PROFILE_VERSION = 1
_PROFILES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles")
NATIVE_TERMS = ("1", "log MACs", "log Cig", "log Cog", "log kernel", "log N*Ho*Wo", "log G", "log stride area")


@dataclass
class Prediction:
    """Predicted (and, when tuned, measured) time of each form of one conv, the pick and why."""

    probe: str
    times_ms: dict[str, float]  # predicted per form
    form: str  # the pick
    why: str
    basis: str  # "calibrated", "similar" (a similar machine's profile), "prior" (uncalibrated here) or "measured"
    source: str  # which profile / cache, in words
    measured_ms: dict[str, float | None] | None = None
    work: str = ""  # the forms' FLOPs and bytes relative to native, in words

    @property
    def calibrated(self) -> bool:
        """True when the times come from a calibration for this device, or from measurements."""
        return self.basis in ("calibrated", "measured")

    def to_dict(self) -> dict:
        """Plain data for reports."""
        return {"probe": self.probe, "predicted_ms": {f: round(t, 5) for f, t in self.times_ms.items()},
                "measured_ms": self.measured_ms, "form": self.form, "why": self.why, "basis": self.basis,
                "source": self.source, "work": self.work}

    def times_line(self) -> str:
        """"predicted ms: native 0.048, dw 0.106, ... -> native": the numbers behind the pick."""
        def listed(times):
            return ", ".join(f"{f} {times[f]:.3f}" for f in FORMS if times.get(f) is not None)
        if self.measured_ms:  # the measurement decides; the prediction shows how far off the model was
            return f"measured ms: {listed(self.measured_ms)} -> {self.form} (predicted: {listed(self.times_ms)})"
        note = {"prior": " (uncalibrated)", "similar": " (a similar machine's profile)"}.get(self.basis, "")
        return f"predicted ms: {listed(self.times_ms)} -> {self.form}{note}"


def features(p: Probe, block: int) -> list[float]:
    """The neighbour-space coordinates of a probe (see the module docstring)."""
    out = math.prod(p.output_spatial())
    nchwc = float(p.cig % block == 0 and p.cog % block == 0)
    # weights (kernel area x2, the path flags x3) chosen by 5-fold cross-validation on the calibration set
    return [math.log(p.cig), math.log(p.cog), 2.0 * math.log(math.prod(p.kernel)), math.log(p.batch * out),
            math.log(p.group), float(max(p.strides) > 1), 3.0 * nchwc, 3.0 * float(p.cog == 1)]


def native_terms(p: Probe) -> list[float]:
    """The terms of the native power law (NATIVE_TERMS, in log space) for `p`; cost_fit fits on them."""
    out = p.batch * math.prod(p.output_spatial())
    # A stride reads stride-area times the input per output: 24%/29% -> 20%/19% median fit error.
    return [1.0, math.log(macs(p)), math.log(p.cig), math.log(p.cog), math.log(math.prod(p.kernel)), math.log(out),
            math.log(p.group), math.log(math.prod(p.strides))]


def macs(p: Probe) -> int:
    """Multiply-accumulates of the whole batch."""
    return p.batch * p.macs_per_image()


@dataclass
class Profile:
    """A provider's fitted (or prior) cost model; see the module docstring."""

    provider: str
    device: str
    ort_version: str
    block: int
    calibrated: bool
    note: str = ""
    fitted: str = ""
    source: str = ""
    native: dict[str, list[float]] = field(default_factory=dict)  # path -> power-law coefficients
    neighbours: int = 5
    margin: float = 0.05
    points: list[list[float]] = field(default_factory=list)  # features + log(t_form / t_native) per FORMS[1:]
    fit_quality: dict = field(default_factory=dict)
    # Set by basis.select, never saved: why this profile was chosen, and the device it stands in for
    # (a similar machine's profile is used for picks there, and says so).
    chosen: str = ""
    applies_to: str = ""

    # -- predictions ------------------------------------------------------------------------
    def native_ms(self, p: Probe) -> float:
        path = "nchwc" if p.cig % self.block == 0 and p.cog % self.block == 0 else "plain"
        coef = self.native.get(path) or self.native.get("nchwc") or self.native.get("plain")  # a partial fit: one path
        return float(math.exp(np.dot(coef, native_terms(p))))

    def predict(self, p: Probe, block: int | None = None) -> dict[str, float]:
        """Predicted ms of every form of `p`."""
        if not self.points:
            return roofline(p, self.provider)
        native = self.native_ms(p)
        x = np.array(features(p, block or self.block))
        pts = np.asarray(self.points, dtype=float)
        nf = len(x)
        order = np.argsort(np.linalg.norm(pts[:, :nf] - x, axis=1))
        times = {"native": native}
        for i, form in enumerate(FORMS[1:]):
            col = pts[order, nf + i]
            col = col[~np.isnan(col)][: self.neighbours]
            if len(col):
                times[form] = native * float(math.exp(np.median(col)))
        return times

    def choose(self, p: Probe | None, available=FORMS, measured: dict[str, float | None] | None = None,
               block: int | None = None, current_device: str | None = None) -> Prediction:
        """The form to use for `p` among `available`, with the numbers behind the pick."""
        source = self.describe(current_device)
        basis = self.basis_on(current_device)
        if p is None:
            return Prediction("", {}, "native",
                              "spatial size unknown (give it with --input-shape): no prediction, so the native form",
                              "prior", "no static spatial size")
        if (p.dtype != "float32" or len(p.kernel) != 2) and self.points:
            times = roofline(p, self.provider)
            what = p.dtype if p.dtype != "float32" else f"{len(p.kernel)}-D convs"
            basis, source = "prior", f"roofline prior ({what} not calibrated)"
        else:
            times = self.predict(p, block)
        times = {f: t for f, t in times.items() if f in available}
        times_used = dict(times)
        if measured:
            measured = {f: t for f, t in measured.items() if f in available}
            if any(t is not None for t in measured.values()):
                basis, source = "measured", "tuned on this machine"
                times_used = {f: t for f, t in measured.items() if t is not None}
        form = min(times_used, key=times_used.get)
        native = times_used.get("native")
        why = _why(form, times_used, basis)
        if basis == "prior" and native is not None:
            form = "native"  # an uncalibrated prior informs the report, it does not leave the one-node form
            why = (f"native: an uncalibrated prior picks no other form (`gconv-rewrite tune` measures them); "
                   f"{_why(form, times_used, basis)}")
        elif form != "native" and native is not None and times_used[form] > native / (1 + self.margin):
            form = "native"  # not enough gain to leave the one-node form (and within the timing noise)
            why = _why(form, times_used, basis)
        return Prediction(p.key(), times, form, why, basis, source,
                          measured_ms=measured if basis == "measured" else None)

    def basis_on(self, current_device: str | None) -> str:
        """"calibrated" on its own device, "similar" where basis.select chose it for a device of the same
        class (its picks are used), else "prior" (informs, keeps native)."""
        if not self.calibrated:
            return "prior"
        if current_device is None or current_device == self.device:
            return "calibrated"
        return "similar" if current_device == self.applies_to else "prior"

    def describe(self, current_device: str | None = None) -> str:
        """Which profile, measured where, and (when basis.select chose it) why: every report says it."""
        why = f"; {self.chosen}" if self.chosen else ""
        if not self.calibrated:
            return f"{self.provider} prior (uncalibrated: {self.note}{why})"
        if current_device is not None and current_device == self.device:
            return f"{self.provider} profile calibrated on this device (onnxruntime {self.ort_version}{why})"
        text = f"{self.provider} profile calibrated on {self.device}, onnxruntime {self.ort_version}"
        if self.basis_on(current_device) == "similar":
            text = f"{self.provider} profile of another machine: {self.device}, onnxruntime {self.ort_version}"
            text += f" ({self.chosen})" if self.chosen else ""
        elif current_device is not None:
            text += f" (not this device: {current_device}; prior only{why})"
        return text

    # -- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = {"schema": PROFILE_SCHEMA, "version": PROFILE_VERSION}
        data.update({k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("chosen", "applies_to")})
        data["points"] = [[None if isinstance(v, float) and math.isnan(v) else round(v, 5) for v in row]
                          for row in self.points]
        return data

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=None, separators=(",", ":"))
            f.write("\n")

    @classmethod
    def from_dict(cls, data: dict) -> "Profile":
        if data.get("schema") != PROFILE_SCHEMA or data.get("version") != PROFILE_VERSION:
            raise ValueError("not a gconv-rewrite cost profile of this version")
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data and k not in ("chosen", "applies_to")}
        fields["points"] = [[math.nan if v is None else v for v in row] for row in fields.get("points", [])]
        return cls(**fields)


def _why(form: str, times: dict[str, float], basis: str) -> str:
    verb = "measured" if basis == "measured" else "predicted"
    best = times[form]
    others = sorted((t, f) for f, t in times.items() if f != form)
    if not others:
        return f"{form} is the only form"
    runner_t, runner = others[0]
    text = f"{form} {verb} {_ms(best)}, next {runner} {_ms(runner_t)} ({runner_t / best:.2f}x)"
    if form == "native" and runner_t < best:
        text = f"native kept: {runner} {verb} only {best / runner_t:.2f}x faster ({_ms(runner_t)} vs {_ms(best)})"
    return text


def _ms(t: float) -> str:
    return f"{t:.3f} ms" if t < 10 else f"{t:.1f} ms"


# -- the prior -------------------------------------------------------------------------------------

# A roofline with round numbers: where nothing is calibrated, it says what the forms must move and
# compute. Its order (native < split, dense; dw costs the Cig-times larger intermediate) is what
# cuDNN's dedicated grouped kernels suggest; its absolute times are not a measurement.
_PRIOR = {"cuda": dict(launch_ms=0.005, gflops=15000.0, gbytes_s=1500.0),
          "cpu": dict(launch_ms=0.002, gflops=100.0, gbytes_s=20.0)}


def work(p: Probe) -> dict[str, tuple[int, float, float]]:
    """What each form must do: (nodes run, FLOPs, activation bytes read + written)."""
    item = np.dtype(p.dtype).itemsize
    out = p.batch * math.prod(p.output_spatial())
    x_bytes = p.batch * p.c_in * math.prod(p.spatial) * item
    y_bytes = out * p.c_out * item
    inter = p.intermediate_bytes()  # Cig x the output
    flops = 2.0 * macs(p)
    return {"native": (1, flops, x_bytes + y_bytes),
            "dw": (2, flops, x_bytes + 2 * inter + y_bytes),  # Reshapes move nothing
            "split": (p.group + 2, flops, 2 * (x_bytes + y_bytes)),  # Split and Concat copy
            "dense": (1, flops * p.group, x_bytes + y_bytes)}


def explain_work(p: Probe, forms=FORMS) -> str:
    """The forms' work relative to native, in words: what the predicted times stand on."""
    w = work(p)
    _, flops, by = w["native"]
    text = {"dw": f"dw moves {w['dw'][2] / by:.1f}x the bytes",
            "split": f"split {w['split'][2] / by:.1f}x the bytes in {w['split'][0]} nodes",
            "dense": f"dense does {w['dense'][1] / flops:.0f}x the FLOPs"}
    parts = [text[f] for f in forms if f in text]
    return ", ".join(parts) + " of native" if parts else ""


def roofline(p: Probe, provider: str = "cuda") -> dict[str, float]:
    """Prior time of every form: launches + max(FLOP time, byte time)."""
    c = _PRIOR.get(provider, _PRIOR["cuda"])
    return {form: nodes * c["launch_ms"] + max(fl / (c["gflops"] * 1e6), by / (c["gbytes_s"] * 1e6))
            for form, (nodes, fl, by) in work(p).items()}


# -- loading ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def load_profile(name: str) -> Profile:
    """The shipped profile `name` ("cpu", "cpu-zen5-avx512", "cuda"); a prior where none was fitted. Read once."""
    path = os.path.join(_PROFILES, f"{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            return Profile.from_dict(json.load(f))
    return Profile(name.split("-")[0], "", "", 8, False, note="no measurements for this provider yet; roofline prior")


def shipped_profiles(provider: str) -> list[Profile]:
    """Every calibrated profile shipped for `provider` (profiles/<provider>.json and <provider>-*.json)."""
    found = []
    for name in sorted(os.listdir(_PROFILES)) if os.path.isdir(_PROFILES) else []:
        if name.endswith(".json") and (name == f"{provider}.json" or name.startswith(f"{provider}-")):
            with open(os.path.join(_PROFILES, name)) as f:
                profile = Profile.from_dict(json.load(f))
            if profile.calibrated and profile.provider == provider:
                found.append(profile)
    return found


def cuda_target(asked: str | None) -> tuple[Profile | None, str, str]:
    """(profile, device, note) for planning CUDA: the shipped profile of the GPU model `asked` for,
    else, where no CUDA GPU runs here, the only shipped CUDA profile; (None, '', '') otherwise."""
    shipped = shipped_profiles("cuda")
    if asked:
        match = [p for p in shipped if p.device.strip().lower() == asked.strip().lower()]
        if not match:
            have = ", ".join(f"'{p.device}'" for p in shipped) or "none yet"
            raise GconvError(f"--device '{asked}': no CUDA profile ships for that GPU model (shipped: {have})")
        return match[0], match[0].device, f"planning for {match[0].device} as asked (--device), not run here"
    if len(shipped) == 1 and not runtime.cuda_runs_here():
        return shipped[0], shipped[0].device, (f"planning for {shipped[0].device}, the only GPU model with a "
                                               "shipped CUDA profile (no CUDA GPU runs here)")
    return None, "", ""


class Planner:
    """Picks a form per conv for one provider: measured times first (`tune`), else the profile's predictions.

    measured: ms per form by probe key, as measured on the target planned for (tune_cache.TuneCache.times
    of tune_cache.target_key(provider, planner.device); tune_cache.cached_planner looks them up);
    warning: why measurements that exist were not used (reports repeat it), '' when none;
    device: for CUDA, the GPU model to plan for by its shipped profile (`--device`), when not this machine's.
    """

    def __init__(self, provider: str = "cpu", measured: dict[str, dict[str, float | None]] | None = None,
                 profile: Profile | None = None, warning: str = "", device: str | None = None):
        self.provider = provider
        self.profile = profile or load_profile(provider)
        self.device = runtime.device_name(provider)
        self.planned_for = ""  # why the device planned for is not this machine's (CUDA planning on a build machine)
        if provider == "cuda" and profile is None:
            target, named, self.planned_for = cuda_target(device)
            if target is not None:
                self.profile, self.device = target, named
            elif any(p.device == self.device for p in shipped_profiles("cuda")):
                self.profile = next(p for p in shipped_profiles("cuda") if p.device == self.device)
        elif device:
            raise GconvError(f"--device '{device}' names a GPU model to plan for: it needs --provider cuda")
        # The kernel-path flag is in the profile's coordinates: its machine's NCHWc block, never the host's.
        self.block = self.profile.block
        self.warning = warning
        self.measured = dict(measured or {})

    def plan(self, spec, available=FORMS) -> Prediction:
        """The Prediction for a candidate's ConvSpec (its batch when static, else 1)."""
        probe = Probe.from_spec(spec) if spec is not None else None
        measured = self.measured.get(probe.key()) if probe is not None else None
        prediction = self.profile.choose(probe, available, measured, self.block, self.device)
        if probe is not None:
            prediction.work = explain_work(probe, available)
        if self.planned_for and prediction.basis == "calibrated":
            prediction.source = self.describe()
        return prediction

    def describe(self) -> str:
        if self.planned_for:
            return (f"{self.provider} profile calibrated on {self.profile.device}, onnxruntime "
                    f"{self.profile.ort_version}: {self.planned_for}")
        return self.profile.describe(self.device)
