"""End to end on ResNeXt-style models: is auto never slower than its input, and does an emulated
export come out as fast as its natively exported twin?

For each model: `gconv_rewrite.rewrite(model)` in auto mode on the CPU provider (cost model,
verification, never-regress guard), then, for emulated inputs, `gconv_rewrite.verify(native
twin, result)` timing the rewritten model against the native model with the same weights.
Both timings are interleaved rounds in one process (see verify.measure_latency).

    python benchmarks/end_to_end.py [--rounds 10] [--skip-resnext50] [--provider cuda] [--only split dense]
        [--pair EXPORTED.onnx NATIVE_TWIN.onnx ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import gconv_rewrite as gr
from gconv_rewrite.samples import resnext_model

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "..", "models")
SAMPLES = ["resnext_native", "resnext_emulated_nchw", "resnext_emulated_tf", "resnext_sum_slices",
           "resnext_frozen_1x1", "resnext_interleaved"]
R50_LAYOUTS = [("native", {}), ("nhwc_tf2onnx", {"pad_node": True}), ("nhwc_sum_slices", {}), ("frozen_1x1", {}),
               ("nchw_reducesum", {}), ("split_slices", {}), ("split_nhwc", {}),
               ("split", {}), ("dense", {})]  # split, dense: the tool's own --form outputs


def row(name, model, twin, rounds, provider="cpu"):
    start = time.time()
    result = gr.rewrite(model, provider=provider, rounds=rounds)
    counts = {a: result.count(a) for a in ("fused", "converted", "expanded", "kept", "reverted") if result.count(a)}
    lat = result.verification.latency if result.verification is not None else None
    vs_input = f"{1 / lat.ratio:.2f}x ({lat.verdict}, ±{lat.noise:.3f})" if lat else "unchanged"
    if any(d.action == "reverted" for d in result.decisions):
        vs_input += ", reverted: output = input"
    vs_twin = ""
    if twin is not None:
        final = result.model
        report = gr.verify(twin, final, provider, rounds=rounds)
        t = report.latency
        vs_twin = (f"{t.ratio:.3f} ({t.verdict}, ±{t.noise:.3f}); "
                   f"native {t.a_median_ms:.1f} ms, ours {t.b_median_ms:.1f} ms")
    print(f"| {name} | {counts} | {vs_input} | {vs_twin or '-'} | {time.time() - start:.0f} s |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--skip-resnext50", action="store_true")
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--only", nargs="*", help="ResNeXt-50 layouts to run (default: the samples and every layout)")
    parser.add_argument("--pair", nargs=2, action="append", metavar=("MODEL", "TWIN"), default=[],
                        help="also an exported model and its natively exported twin (repeatable); only these "
                             "with --only and no layouts")
    args = parser.parse_args()
    print("| model | decisions | auto vs input (speedup) | auto result / native twin (time ratio) | wall |")
    print("|---|---|---|---|---|")
    for model, twin in args.pair:
        row(os.path.basename(model), model, twin, args.rounds, args.provider)
    if args.pair and args.only == []:
        return
    native = os.path.join(MODELS, "resnext_native.onnx")
    for name in SAMPLES if not args.only else []:
        path = os.path.join(MODELS, f"{name}.onnx")
        row(f"models/{name}.onnx", path, None if name == "resnext_native" else native, args.rounds, args.provider)
    if args.skip_resnext50:
        return
    twin = resnext_model(50, "32x4d", "native", batch=1)
    for layout, extra in R50_LAYOUTS:
        if args.only and layout not in args.only:
            continue
        if layout in ("split", "dense"):
            model = gr.rewrite(twin, form=layout, verify_result=False).model
        else:
            model = twin if layout == "native" else resnext_model(50, "32x4d", layout, batch=1, **extra)
        row(f"ResNeXt-50 32x4d {layout}, batch 1, 224", model, None if layout == "native" else twin, args.rounds,
            args.provider)


if __name__ == "__main__":
    sys.exit(main())
