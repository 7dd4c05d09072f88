"""How much rewriting costs beside loading and saving the model.

For each model: `onnx.load` + `onnx.save` of the file (the baseline) and
`gconv-rewrite MODEL -o OUT --no-verify` end to end (a fresh process each time: start-up,
imports, load, analysis, rewrite, atomic save), interleaved round by round; medians, spread
and the ratio of medians. Also the peak memory (max RSS) of each process, and the rewrite of a
100k-node graph.

    python benchmarks/speed.py [--rounds 5] [--workdir /tmp/gconv-speed] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gconv_rewrite.samples import resnext_model  # noqa: E402

BASELINE = "import onnx, sys; m = onnx.load(sys.argv[1]); onnx.save(m, sys.argv[2])"


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall time of a child process and its peak RSS in MB."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = proc.communicate()
    elapsed = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{cmd} failed: {err.decode()[-400:]}")
    rss = os.wait4  # noqa: F841 (documented: ru_maxrss of RUSAGE_CHILDREN is the max over children)
    return elapsed, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024


def peak_rss(cmd: list[str]) -> int:
    """Peak RSS (MB) of one run, read from /usr/bin/time if present."""
    if not Path("/usr/bin/time").exists():
        return -1
    proc = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, capture_output=True, text=True)
    return int(proc.stderr.strip().splitlines()[-1]) // 1024


def big_graph(nodes: int) -> onnx.ModelProto:
    """A long chain of cheap ops with a grouped Conv every 1000 nodes: tests that passes are linear."""
    c, g = 16, 4
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((c, c // g, 3, 3)).astype(np.float32), "w")
    graph_nodes, prev = [], "x"
    for i in range(nodes):
        out = f"t{i}"
        if i % 1000 == 999:
            graph_nodes.append(helper.make_node("Conv", [prev, "w"], [out], name=f"conv{i}", group=g,
                                                pads=[1, 1, 1, 1]))
        else:
            graph_nodes.append(helper.make_node("Relu" if i % 2 else "Identity", [prev], [out], name=f"n{i}"))
        prev = out
    graph = helper.make_graph(graph_nodes, "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 8, 8])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def summarize(label: str, base: list[float], tool: list[float]) -> str:
    mb, mt = statistics.median(base), statistics.median(tool)
    return (f"| {label} | {mb:.2f} s ({min(base):.2f}–{max(base):.2f}) | {mt:.2f} s ({min(tool):.2f}–{max(tool):.2f}) "
            f"| {mt / mb:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gconv-speed"))
    p.add_argument("--quick", action="store_true", help="ResNeXt-50 only, 2 rounds")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    tool = [sys.executable, "-m", "gconv_rewrite"]
    cases = [("ResNeXt-101 64x4d native (expand)", dict(depth=101, width="64x4d", layout="native"), "expand"),
             ("ResNeXt-101 64x4d native (auto)", dict(depth=101, width="64x4d", layout="native"), "auto"),
             ("ResNeXt-101 64x4d tf2onnx-emulated (fuse)",
              dict(depth=101, width="64x4d", layout="nhwc_tf2onnx"), "fuse"),
             ("ResNeXt-50 32x4d keras sum-of-slices (fuse)",
              dict(depth=50, width="32x4d", layout="nhwc_sum_slices"), "fuse")]
    if args.quick:
        cases = [c for c in cases if "ResNeXt-50" in c[0]]
        args.rounds = 2
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, onnx {onnx.__version__}")
    rows = []
    for label, kwargs, direction in cases:
        src = args.workdir / f"{kwargs['depth']}_{kwargs['width']}_{kwargs['layout']}.onnx"
        if not src.exists():
            onnx.save(resnext_model(**kwargs), src)
        size = src.stat().st_size / 1e6
        out_a, out_b = args.workdir / "baseline.onnx", args.workdir / "tool.onnx"
        base, ours = [], []
        for _ in range(args.rounds):
            base.append(timed([sys.executable, "-c", BASELINE, str(src), str(out_a)])[0])
            ours.append(timed(tool + [str(src), "-o", str(out_b), "--no-verify", "--direction", direction])[0])
        rss_base = peak_rss([sys.executable, "-c", BASELINE, str(src), str(out_a)])
        rss_tool = peak_rss(tool + [str(src), "-o", str(out_b), "--no-verify", "--direction", direction])
        rows.append(summarize(f"{label}, {size:.0f} MB", base, ours) + f" {rss_base} / {rss_tool} MB |")
        print(rows[-1], flush=True)
    big = args.workdir / "big.onnx"
    onnx.save(big_graph(100_000), big)
    times = [timed(tool + [str(big), "-o", str(args.workdir / "big_out.onnx"), "--no-verify",
                           "--direction", "expand"])[0]
             for _ in range(2)]
    base = [timed([sys.executable, "-c", BASELINE, str(big), str(args.workdir / "b.onnx")])[0] for _ in range(2)]
    rows.append(summarize("100k-node chain, 100 grouped Convs (expand)", base, times) + " |")
    print(rows[-1])
    print("\n| model | load + save | gconv-rewrite --no-verify | ratio | peak RSS load+save / tool |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
