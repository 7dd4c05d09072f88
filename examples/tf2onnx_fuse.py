"""The TensorFlow case: a tf2onnx export of keras-applications' ResNeXt block, whose grouped conv
keras wrote as a depthwise conv + a sum of slices, fused back into grouped Convs and verified.

    python examples/tf2onnx_fuse.py [MODEL.onnx] [OUT.onnx]

Without arguments it uses the tf2onnx 1.17 export bundled with the tests
(tests/fixtures/exporters/keras_app_block3_sum_slices.onnx, made by make_tf_fixtures.py).
"""

from __future__ import annotations

import os
import sys

import gconv_rewrite as gr

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = os.path.join(HERE, "..", "tests", "fixtures", "exporters", "keras_app_block3_sum_slices.onnx")


def fuse(model: str, out: str) -> gr.RewriteResult:
    """Survey, fuse every exact emulation, verify on this machine's provider, save."""
    survey = gr.inspect(model)
    emulated = [f for f in survey.findings if f.status == "emulated"]
    extra_kib = sum(f.intermediate_mb_per_image or 0 for f in emulated) * 1024
    print(f"{len(emulated)} emulated grouped conv(s); their intermediates cost {extra_kib:.0f} KiB per image")
    result = gr.rewrite(model, direction="fuse")
    if result.verification is not None and not result.verification.passed:
        raise gr.VerificationError("the fused model differs from the export")
    result.save(out)
    return result


if __name__ == "__main__":
    args = sys.argv[1:]
    result = fuse(args[0] if args else DEFAULT, args[1] if len(args) > 1 else "fused.onnx")
    for d in result.decisions:
        print(d.line())
    print("\n".join(result.verification.lines()))
    print(f"wrote {args[1] if len(args) > 1 else 'fused.onnx'}")
