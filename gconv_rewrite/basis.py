"""Which cost profile planning rests on, and why.

In order: a profile the user named (`--profile`; $GCONV_REWRITE_PROFILE for CPU planning); this device's own
calibration (`gconv-rewrite calibrate`, kept in the user's cache folder); a shipped profile
measured on this very device; a shipped profile of the same machine class (same ISA, hence the
same NCHWc block, then the closest thread count); else none, and the planner keeps native
forms. The kernel-path flag (NCHWc or not) always comes from the chosen profile's machine, never
from the host. A damaged, foreign or stale calibration file is a one-line warning and the next
basis is used: never a traceback, never a silent wrong basis.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field

from . import runtime, tune_cache
from .cost import _PROFILES, Profile, load_profile, shipped_profiles
from .errors import GconvError


@dataclass(frozen=True)
class Machine:
    """What a device string says about a CPU: what decides which kernels onnxruntime runs."""

    isa: str  # "AVX-512", "AVX2" or "" (other architectures)
    threads: int | None
    family: str  # e.g. "AMD EPYC family 25": the CPU generation, for tie-breaking

    @property
    def block(self) -> int:
        """onnxruntime's NCHWc block on this ISA (16 with AVX-512, else 8)."""
        return 16 if self.isa == "AVX-512" else 8


def machine_of(device: str) -> Machine:
    """Parse runtime.device_name()'s text: "AMD EPYC (family 25 model 1) AVX2, 2 threads"."""
    isa = "AVX-512" if " AVX-512" in device else "AVX2" if " AVX2" in device else ""
    threads = re.search(r", (\d+) threads$", device)
    name = device.split(" (family")[0].split(",")[0].replace(" AVX-512", "").replace(" AVX2", "")
    family = re.search(r"family (\d+)", device)
    return Machine(isa, int(threads.group(1)) if threads else None,
                   f"{name} family {family.group(1)}" if family else name)


@dataclass
class Basis:
    """The profile to plan with, whether it was measured on this device, and why it was chosen."""

    profile: Profile | None  # None: the planner's own choice (CUDA: the GPU model's shipped profile, --device)
    this_device: bool  # True: calibrated here (or named by the user): nothing to tune first
    why: str
    warnings: list[str] = field(default_factory=list)


def calibration_dir() -> str:
    """Where `gconv-rewrite calibrate` keeps its files: beside the tune cache (so $GCONV_REWRITE_CACHE moves both)."""
    return os.path.join(os.path.dirname(os.path.abspath(tune_cache.cache_path())), "calibration")


def user_paths(provider: str, device: str) -> tuple[str, str]:
    """(measurements CSV, fitted profile JSON) of this device's calibration for `provider`."""
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")[:60]
    digest = hashlib.sha1(device.encode()).hexdigest()[:8]
    stem = os.path.join(calibration_dir(), f"{provider}-{slug}-{digest}")
    return stem + ".csv", stem + ".profile.json"


def load_user_profile(provider: str, device: str) -> tuple[Profile | None, str]:
    """This device's calibration, or (None, why it is not used); (None, "") when there is none."""
    path = user_paths(provider, device)[1]
    try:
        with open(path) as f:
            profile = Profile.from_dict(json.load(f))
        if not profile.native or not profile.points or len({len(r) for r in profile.points}) != 1:
            raise ValueError("no fitted model in it")
    except FileNotFoundError:
        return None, ""
    except (OSError, ValueError, TypeError, KeyError) as exc:
        what = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, f"calibration {path} ignored: damaged ({what})"
    if profile.provider != provider or profile.device != device:
        return None, f"calibration {path} ignored: it was measured on {profile.device} ({profile.provider}), not here"
    if profile.ort_version != runtime.ort_version():
        return None, (f"calibration {path} ignored: stale (onnxruntime {profile.ort_version}, this is "
                      f"{runtime.ort_version()}); run `gconv-rewrite calibrate` again")
    return profile, ""


def _named(provider: str, name: str, device: str, how: str = "named with --profile") -> Basis:
    """The profile the user named: a shipped profile's name or a profile file."""
    try:
        if os.path.sep in name or name.endswith(".json"):
            with open(name) as f:
                profile = Profile.from_dict(json.load(f))
        else:
            profile = load_profile(name) if os.path.exists(os.path.join(_PROFILES, f"{name}.json")) else None
    except (OSError, ValueError, TypeError) as exc:
        raise GconvError(f"profile {name}: not a readable cost profile ({str(exc).splitlines()[0]})") from None
    if profile is None:
        names = ", ".join(sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(_PROFILES, "*.json"))))
        raise GconvError(f"profile {name}: no such profile (shipped: {names}; or a path to a .json)")
    if profile.provider != provider:
        raise GconvError(f"profile {name} is a {profile.provider} profile; the target is {provider}")
    chosen = dataclasses.replace(profile, applies_to=device, chosen=f"{how} {name}".replace("= ", "="))
    return Basis(chosen, True, chosen.chosen)


def select(provider: str, device: str | None = None, named: str | None = None) -> Basis:
    """The basis to plan `provider` on `device` (default: this machine's); see the module docstring."""
    device = device or runtime.device_name(provider)
    if named:
        return _named(provider, named, device)
    pinned = os.environ.get("GCONV_REWRITE_PROFILE")  # pins the CPU basis (CI: the same picks on every host)
    if pinned and provider == "cpu":
        return _named(provider, pinned, device, "pinned by $GCONV_REWRITE_PROFILE=")
    warnings = []
    mine, problem = load_user_profile(provider, device)
    if problem:
        warnings.append(problem)
    if mine is not None:
        why = f"calibrated on this device by `gconv-rewrite calibrate` ({mine.fitted}, {len(mine.points)} geometries)"
        return Basis(dataclasses.replace(mine, chosen=why), True, why, warnings)
    profiles = shipped_profiles(provider)
    if provider != "cpu":  # CUDA: the planner picks the GPU model's shipped profile (--device); no classes yet
        here = any(p.device == device for p in profiles)
        why = "shipped profile of this GPU model" if here else "no calibration for this GPU model"
        return Basis(None, here, why, warnings)
    for profile in profiles:
        if profile.calibrated and profile.device == device:
            why = "shipped profile measured on this device"
            return Basis(dataclasses.replace(profile, chosen=why), True, why, warnings)
    here = machine_of(device)
    similar = [p for p in profiles if p.calibrated and machine_of(p.device).isa == here.isa and p.block == here.block]
    if provider == "cpu" and here.isa and similar:
        def distance(p: Profile) -> tuple:
            m = machine_of(p.device)
            return (abs((m.threads or 0) - (here.threads or 0)), m.family != here.family, -len(p.points))
        best = min(similar, key=distance)
        why = (f"no calibration for this device; the closest machine class: {here.isa}, NCHWc block {best.block}, "
               f"{machine_of(best.device).threads} threads")
        return Basis(dataclasses.replace(best, applies_to=device, chosen=why), False, why, warnings)
    default = load_profile(provider)
    why = f"no calibration for this device and no shipped profile of its class ({here.isa or 'no AVX'})"
    return Basis(dataclasses.replace(default, chosen=why), False, why, warnings)
