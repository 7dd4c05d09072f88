"""The tune cache: what `tune` measured, per (device, provider, onnxruntime version) and probe key,
in one JSON file that a damaged or foreign file never half-feeds; and the planner that uses it."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, fields

from . import runtime
from .cost import Planner, Profile
from .errors import GconvError
from .geometry import Probe
from .tuning import Measurement

CACHE_VERSION = 1


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

    def times(self, target: str) -> dict[str, dict[str, float | None]]:
        """Measured ms per form of every probe key measured on `target` (what a Planner takes)."""
        return {key: entry["times_ms"] for key, entry in self.entries.get(target, {}).items()}

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
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise GconvError(f"cannot write the tune cache {self.path} ({exc.strerror or exc})") from None


def cached_planner(provider: str, path: str | None = None, profile: Profile | None = None,
                   device: str | None = None) -> Planner:
    """The planner of `provider` with the times measured on its target in the cache at `path`.

    device: for CUDA, the GPU model to plan for (`--device`); the planner settles which device it plans
    for (this machine's, or a shipped profile's), and the measurements are those of that target."""
    store = TuneCache(path)
    # A damaged cache must not silently turn measured picks into predicted ones.
    warning = f"tune cache {store.path} ignored: it is {store.problem}" if store.problem else ""
    planner = Planner(provider, None, profile, warning, device=device)
    planner.measured = store.times(target_key(provider, planner.device))
    return planner
