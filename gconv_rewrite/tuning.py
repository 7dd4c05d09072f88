"""Measure a conv geometry in each exact form on this machine (the cache is tune_cache.py, the
report tune_report.py).

One probe = a single-node model (input -> grouped Conv with bias -> output) in the native form,
written into each other form by the same emitters that rewrite user models, then timed with the
verification's session options (spinning off, own sessions), the forms rotated round by round.
The calibration script (benchmarks/calibrate.py), the accuracy benchmark and `tune` all use it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from . import runtime
from .geometry import FORMS, Probe
from .lowering import form_models

_HOPELESS = 4.0  # a form this many times slower than the best on a first run is not timed further


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
