"""Write the small sample models of this folder (deterministic: same bytes on every run).

Each is a stack of two ResNeXt bottleneck blocks (64 channels, width 64, G=8, so Cig=Cog=8;
the first block has stride 2 and a projection shortcut) on a [N, 64, 28, 28] input with a
dynamic batch N, random weights and BN statistics (seed 0), opset 17, IR version 8.

All but resnext_wrong_emulation.onnx compute the same function as resnext_native.onnx
(within float rounding): the interleaved one has its first 1x1 conv's output channels
permuted to match its strided groups. The wrong one sums over the channel multiplier and is
not a grouped conv at all.

    python models/build_samples.py [--out-dir models]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from gconv_rewrite.samples import resnext_block_model  # noqa: E402

COMMON = dict(in_channels=64, width=64, groups=8, num_blocks=2, stride=2, image=28, batch="N", seed=0)

# file name -> (layout, extra options)
SAMPLES = {
    "resnext_native.onnx": ("native", {}),
    "resnext_emulated_nchw.onnx": ("nchw_reducesum", {}),
    "resnext_emulated_tf.onnx": ("nhwc_tf2onnx", {"pad_node": True}),
    "resnext_sum_slices.onnx": ("nhwc_sum_slices", {}),
    "resnext_frozen_1x1.onnx": ("frozen_1x1", {}),
    "resnext_interleaved.onnx": ("interleaved", {}),
    "resnext_wrong_emulation.onnx": ("wrong_sum_multiplier", {}),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, (layout, extra) in SAMPLES.items():
        model = resnext_block_model(layout, **COMMON, **extra)
        onnx.checker.check_model(model, full_check=True)
        path = args.out_dir / name
        path.write_bytes(model.SerializeToString(deterministic=True))
        print(f"{name:30s} {layout:22s} {path.stat().st_size / 1024:7.1f} KiB")


if __name__ == "__main__":
    main()
