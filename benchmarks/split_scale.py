"""Does the analysis stay linear? ResNeXt-101 64x4d in split form (33 regions of 64 Convs each,
written by the tool's own `--form split`) rewritten with `--no-verify` by the command line, against
an onnx load + save of the same file, each in a fresh process, interleaved.

    python benchmarks/split_scale.py [--rounds 5] [--keep /tmp/r101_split.onnx]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

import gconv_rewrite as gr
from gconv_rewrite.samples import resnext_model

LOAD_SAVE = "import onnx, sys; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])"


def _wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="write the split-form model here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        split = args.keep or Path(tmp) / "r101_split.onnx"
        native = resnext_model(101, "64x4d", "native", batch=1)
        result = gr.rewrite(native, form="split", verify_result=False)
        onnx.save(result.model, split)
        regions = len(result.decisions)
        convs = sum(n.op_type == "Conv" for n in result.model.graph.node)
        print(f"ResNeXt-101 64x4d split form: {regions} regions, {convs} Convs, "
              f"{split.stat().st_size / 2**20:.0f} MiB")
        out, copied = Path(tmp) / "out.onnx", Path(tmp) / "copy.onnx"
        cli = [sys.executable, "-m", "gconv_rewrite", str(split), "-o", str(out), "--form", "native", "--no-verify",
               "--no-tune", "-q"]
        copy = [sys.executable, "-c", LOAD_SAVE, str(split), str(copied)]
        times: dict[str, list[float]] = {"rewrite": [], "load+save": []}
        for _ in range(args.rounds):
            times["rewrite"].append(_wall(cli))
            times["load+save"].append(_wall(copy))
        back = onnx.load(out, load_external_data=False)
        fused = sum(n.op_type == "Conv" for n in back.graph.node)
        ratios = [a / b for a, b in zip(times["rewrite"], times["load+save"])]
        for name, values in times.items():
            print(f"{name}: median {statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f})")
        print(f"rewrite / load+save per round: median {statistics.median(ratios):.2f} "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f}); Convs after the rewrite: {fused}")


if __name__ == "__main__":
    sys.exit(main())
