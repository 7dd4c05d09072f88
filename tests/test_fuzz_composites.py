"""The composite fuzzer (benchmarks/fuzz_composites.py) in CI: random split forms, block-diagonal and
mixed Convs, rewritten and round-tripped, each compared with the original on onnxruntime. A short
fixed-seed run here; the benchmark runs longer ones (RESULTS.md)."""

import subprocess
import sys

from helpers import ROOT


def test_random_composites_rewrite_to_what_they_compute():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fuzz_composites.py"), "--cases", "150",
                           "--seed", "0"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "150 cases" in proc.stdout and "\n0 failures" in proc.stdout
    assert " fused" in proc.stdout  # the run exercised fusions, not only refusals
