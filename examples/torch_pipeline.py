"""An export pipeline: PyTorch ResNeXt-style model -> torch.onnx.export -> gconv-rewrite -> verify -> save.

    pip install torch gconv-rewrite
    python examples/torch_pipeline.py [OUT_DIR]

`optimise()` is the part a pipeline calls after its own export; it needs no torch.
"""

from __future__ import annotations

import os
import sys

import gconv_rewrite as gr


def optimise(exported: str, out: str, provider: str = "auto") -> gr.RewriteResult:
    """Rewrite an exported model for `provider`, prove it, save it; raise if parity fails."""
    result = gr.rewrite(exported, provider=provider)  # auto: per node, the form predicted fastest
    report = result.verification
    if report is not None and not report.passed:
        raise gr.VerificationError(f"{exported}: rewritten model differs: {report.lines()[0]}")
    result.save(out)  # atomic; external data kept external
    return result


def export_resnext_block(path: str) -> None:
    """A small ResNeXt bottleneck (32 groups of 4 channels) exported with torch.onnx."""
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, channels=256, width=128, groups=32):
            super().__init__()
            self.reduce = nn.Sequential(nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
            self.grouped = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False),
                                         nn.BatchNorm2d(width), nn.ReLU())
            self.expand = nn.Sequential(nn.Conv2d(width, channels, 1, bias=False), nn.BatchNorm2d(channels))

        def forward(self, x):
            return torch.relu(x + self.expand(self.grouped(self.reduce(x))))

    model = nn.Sequential(Bottleneck(), Bottleneck()).eval()
    torch.onnx.export(model, (torch.randn(1, 256, 56, 56),), path, input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)


def main(out_dir: str = ".") -> None:
    exported = os.path.join(out_dir, "resnext_block.onnx")
    export_resnext_block(exported)
    result = optimise(exported, os.path.join(out_dir, "resnext_block.gconv.onnx"))
    for d in result.decisions:
        print(d.line())
    if result.verification is not None:
        print("\n".join(result.verification.lines()))


if __name__ == "__main__":
    try:
        import torch  # noqa: F401 - only the export half needs it
    except ImportError:
        sys.exit("this example exports with PyTorch: pip install torch (optimise() itself needs no torch)")
    main(*sys.argv[1:])
