"""Evidence for the float32 parity tolerance: rounding noise of exact rewrites of a ResNeXt-50
versus the error of a single wrong weight (two input channels swapped inside one group of one
grouped Conv), at every grouped Conv of the network.

    python benchmarks/parity_evidence.py [--image 224] [--provider cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gconv_rewrite as gr  # noqa: E402
from gconv_rewrite.samples import resnext_model, swap_input_channels  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--seeds", type=int, default=3, help="input samples")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    native = resnext_model(50, "32x4d", "native", batch=1, image=args.image)
    inputs = [gr.verify.__globals__["generate_inputs"](native, {}, s) for s in range(args.seeds)]
    print(f"ResNeXt-50 32x4d, {args.image}x{args.image}, batch 1, {args.seeds} input samples, "
          f"onnxruntime {args.provider}")
    print("| comparison | max rel to magnitude |")
    print("|---|---|")
    for layout in ("nhwc_tf2onnx", "nhwc_sum_slices", "nchw_reducesum"):
        emulated = resnext_model(50, "32x4d", layout, batch=1, image=args.image)
        fused = gr.rewrite(emulated, "fuse", verify_result=False).model
        r = gr.verify(emulated, fused, args.provider, inputs=inputs, latency=False)
        print(f"| {layout} emulation vs its fusion | {r.outputs[0].max_rel:.2e} |", flush=True)
    expanded = gr.rewrite(native, "expand", verify_result=False).model
    r = gr.verify(native, expanded, args.provider, inputs=inputs, latency=False)
    print(f"| native vs its expansion | {r.outputs[0].max_rel:.2e} |")
    errors = []
    for i in range(16):
        r = gr.verify(native, swap_input_channels(native, i), args.provider, inputs=inputs, latency=False)
        errors.append(r.outputs[0].max_rel)
        print(f"| channels 0,1 swapped in group 0 of grouped Conv {i} | {errors[-1]:.2e} |", flush=True)
    print(f"\nsmallest mutation error: {min(errors):.2e}; median {np.median(errors):.2e}")


if __name__ == "__main__":
    main()
