"""Calibrate a provider on this machine: measure every exact form on a grid of conv geometries, fit a profile.

One implementation for `gconv-rewrite calibrate` (a few minutes; stored per device beside the
tune cache, see basis.user_paths; resumable: a rerun measures only what is missing) and for
benchmarks/calibrate.py (the shipped profiles' grid, in benchmarks/data). Each geometry is timed
as `tune` times it (tuning.measure), after waiting for a quiet machine; rows are appended and
flushed one by one, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass

from . import basis, runtime, tuning
from .cost import Profile
from .cost_fit import fit, read_measurements
from .errors import GconvError
from .geometry import FORMS, Probe

CSV_HEADER = ["probe"] + [f"t_{form}_ms" for form in FORMS] + ["background_cores", "notes"]
MIN_ROWS = 40  # fewer measured geometries fit no usable profile (two power laws of 8 terms, neighbours)


def grid(count: int, seed: int = 0, exclude=frozenset()) -> list[Probe]:
    """`count` distinct random geometries: C_in 32..1024, Cig 2..64 (multiples of the NCHWc block and not),
    Cog = Cig, Cig/2, 2 Cig or 1, spatial 7..112, kernel 1/3/5, stride 1/2, batch 1/8; none in `exclude`."""
    rng = random.Random(seed)
    probes, seen = [], set(exclude)
    while len(probes) < count:
        c_in = rng.choice([32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024])
        cig = rng.choice([2, 4, 8, 12, 16, 24, 32, 40, 64])
        if c_in % cig or not 1 < c_in // cig < c_in:
            continue
        g = c_in // cig
        cog = rng.choices([cig, max(1, cig // 2), 2 * cig, 1], weights=[5, 1, 1, 1])[0]
        k = rng.choice([1, 3, 3, 5])
        stride = rng.choice([1, 1, 2])
        size = rng.choice([7, 14, 28, 56, 112])
        batch = rng.choice([1, 1, 8])
        elements = c_in * size * size
        if not 20_000 <= elements <= 1_700_000 or batch * g * cog * cig * k * k * size * size / stride**2 > 4e9:
            continue  # outside what ResNeXt-like layers look like, or a native conv over 4 GMAC
        p = Probe(c_in, g * cog, g, (size, size), (k, k), (stride, stride), (1, 1), (k // 2,) * 4, "NOTSET",
                         "float32", batch)
        if p.key() not in seen:
            seen.add(p.key())
            probes.append(p)
    return probes


def model_like_grid(count: int, seed: int = 1, exclude=frozenset()) -> list[Probe]:
    """`count` geometries shaped like ResNeXt/RegNet 3x3 layers (group width 8..64, 2..40 groups, batch 1/8,
    stride 1/2): where split wins on few wide groups at batch 8, which the random grid hardly samples."""
    rng = random.Random(seed)
    seen, probes = set(exclude), []
    while len(probes) < count:
        cig = rng.choice([8, 16, 24, 32, 48, 64])
        g = rng.randint(2, 40)
        size = rng.choice([14, 28, 56])
        if not 20_000 <= g * cig * size * size <= 1_700_000:
            continue
        stride = rng.choice([1, 2])
        p = Probe(g * cig, g * cig, g, (size * stride, size * stride), (3, 3), (stride, stride), (1, 1),
                         (1, 1, 1, 1), "NOTSET", "float32", rng.choice([1, 8]))
        if p.key() not in seen:
            seen.add(p.key())
            probes.append(p)
    return probes


def quick_grid(count: int) -> list[Probe]:
    """The command's grid: 3/4 random, 1/4 model-like, interleaved so that a run cut short still covers both."""
    wide, like = grid(count - count // 4), model_like_grid(count // 4, exclude={p.key() for p in grid(420)})
    merged = []
    for i, p in enumerate(wide):
        merged.append(p)
        if i % 3 == 2 and like:
            merged.append(like.pop(0))
    return merged + like


# -- the machine record ------------------------------------------------------------------------------

def machine_path(csv_path: str) -> str:
    """The measurements' machine record beside the CSV (x.csv -> x.machine.json)."""
    return os.path.splitext(csv_path)[0] + ".machine.json"


def machine_record(choice: runtime.ProviderChoice) -> dict:
    """Which machine measures: a refit elsewhere must describe that machine, not the host."""
    block = runtime.nchwc_block() if choice.name == "cpu" else 8  # the NCHWc flag is a CPU notion; inert on CUDA
    return {"device": runtime.device_name(choice), "block": block, "ort_version": runtime.ort_version()}


def read_machine(csv_path: str) -> dict:
    """The machine that measured the CSV; ValueError (never a guess) when the record is missing or damaged."""
    try:
        with open(machine_path(csv_path)) as f:
            record = json.load(f)
        if not isinstance(record, dict) or not {"device", "block", "ort_version"} <= set(record):
            raise ValueError("fields missing")
        return record
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {machine_path(csv_path)} ({exc}): which machine measured {csv_path}?") from None


def measured_keys(csv_path: str) -> set[str]:
    """Probe keys already in a calibration CSV (a rerun resumes after them)."""
    try:
        with open(csv_path) as f:
            return {row["probe"] for row in csv.DictReader(f) if row.get("probe")}
    except FileNotFoundError:
        return set()


def measure_into(csv_path: str, probes: list[Probe], choice: runtime.ProviderChoice, rounds: int = 9,
                 progress=None, deadline: float | None = None, log=None, wait: bool = True) -> int:
    """Measure the `probes` not yet in `csv_path` and append their rows, one flushed row each; start none that would
    end after `deadline` (time.monotonic(), judged by the slowest so far). Only the CPU waits for a quiet machine
    (`wait`): other processes' CPU load says nothing about GPU kernels. Returns how many were measured. The
    machine record must match the host's."""
    record = machine_record(choice)
    done = measured_keys(csv_path)
    if done and read_machine(csv_path) != record:
        raise GconvError(f"{csv_path} was measured on another machine or onnxruntime; not appended to")
    todo = [p for p in probes if p.key() not in done]
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    with open(machine_path(csv_path), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    measured, slowest = 0, 0.0
    with open(csv_path, "a", newline="") as f:
        out = csv.writer(f)
        if not done:
            out.writerow(CSV_HEADER)
        for probe in todo:
            if deadline is not None and time.monotonic() + slowest > deadline:
                break
            began = time.monotonic()
            load = tuning.wait_for_quiet() if choice.name == "cpu" and wait else math.nan
            m = tuning.measure(probe, choice, rounds=rounds)
            notes = "; ".join(f"{k}: {v}" for k, v in m.notes.items())
            out.writerow([probe.key()] + ["nan" if m.times_ms[form] is None else f"{m.times_ms[form]:.5f}"
                                          for form in FORMS] + [f"{load:.2f}", notes])
            f.flush()
            measured += 1
            slowest = max(slowest, time.monotonic() - began)
            if progress is not None:
                progress(len(done) + measured, len(done) + len(todo))
            if log is not None:
                log(f"[{len(done) + measured}/{len(done) + len(todo)}] {probe.key()}: best {m.best()}")
    return measured


def fit_csv(csv_path: str, provider: str, source: str = "") -> Profile:
    """Fit a profile to a calibration CSV, described as the machine that measured it."""
    machine = read_machine(csv_path)
    rows = [(p, t) for p, t in read_measurements(csv_path) if not math.isnan(t["native"])]
    return fit(rows, provider=provider, device=machine["device"], ort_version=machine["ort_version"],
               block=machine["block"], source=source or csv_path)


# -- the command -------------------------------------------------------------------------------------

@dataclass
class CalibrationReport:
    """What `gconv-rewrite calibrate` did: rows measured now and in all, where, and whether a profile was fitted."""

    device: str
    provider: str
    measurements: str
    profile: str | None  # the fitted profile's file, None while too few rows are measured
    measured_now: int
    measured_total: int
    planned: int
    seconds: float

    def lines(self) -> list[str]:
        """The terminal report."""
        lines = [f"calibrated {self.provider} on {self.device}: {self.measured_now} geometries measured now, "
                 f"{self.measured_total} of {self.planned} in all ({self.seconds:.0f} s)",
                 f"measurements: {self.measurements}"]
        if self.profile:
            lines.append(f"profile: {self.profile} (used from now on by rewrite, inspect and --no-verify)")
        else:
            lines.append(f"no profile yet: at least {MIN_ROWS} geometries are needed; run it again to continue")
        if self.measured_total < self.planned:
            lines.append("run `gconv-rewrite calibrate` again to measure the rest (it resumes)")
        return lines

    def to_dict(self) -> dict:
        """Plain data (`calibrate --json`)."""
        return {"schema": "gconv-rewrite/calibration-report", "version": 1} | asdict(self)


def calibrate(provider: str = "auto", *, minutes: float = 4.0, count: int = 160, rounds: int = 5, fresh: bool = False,
              progress=None) -> CalibrationReport:
    """Measure up to `count` geometries (for at most `minutes`; resumable) on this machine and fit its profile."""
    if minutes <= 0 or count < 1 or rounds < 3:
        raise GconvError("calibrate needs minutes > 0, count >= 1 and rounds >= 3")
    start = time.monotonic()
    choice = runtime.choose_provider(provider)
    csv_path, profile_path = basis.user_paths(choice.name, runtime.device_name(choice))
    if fresh:
        for path in (csv_path, machine_path(csv_path), profile_path):
            if os.path.exists(path):
                os.unlink(path)
    try:
        if measured_keys(csv_path) and read_machine(csv_path) != machine_record(choice):
            os.unlink(csv_path)  # another onnxruntime version measured these: start again
    except (ValueError, OSError, csv.Error):
        os.unlink(csv_path)  # no readable machine record or rows: they cannot be trusted
    probes = quick_grid(count)
    try:
        now = measure_into(csv_path, probes, choice, rounds, progress, start + 60 * minutes)
    except OSError as exc:
        folder = os.path.dirname(csv_path)
        raise GconvError(f"cannot write the calibration in {folder} ({exc.strerror or exc})") from None
    total = len(measured_keys(csv_path))
    written = None
    if total >= MIN_ROWS:
        profile = fit_csv(csv_path, choice.name, source=csv_path)
        tmp = f"{profile_path}.{os.getpid()}.tmp"
        profile.save(tmp)
        os.replace(tmp, profile_path)
        written = profile_path
    return CalibrationReport(runtime.device_name(choice), choice.name, csv_path, written, now, total, len(probes),
                             time.monotonic() - start)
