"""Write a random-weight ResNeXt-50/101 ONNX model (native or an emulation layout) for benchmarks.

    python benchmarks/make_resnext.py --depth 101 --width 64x4d --layout native -o /tmp/r101.onnx
    python benchmarks/make_resnext.py --layout nhwc_tf2onnx --pad-node --external-data -o /tmp/r50_tf.onnx

Weights are stored in the .onnx file unless --external-data is given or they would pass
protobuf's 2 GB limit (frozen_1x1 on wide models), then in '<output>.data' beside it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from gconv_rewrite.samples import LAYOUTS, RESNEXT_DEPTHS, resnext_model  # noqa: E402

_PROTO_LIMIT = 2**31 - 2**26  # stay clear of protobuf's 2 GiB cap (graph structure needs room too)


def _weight_bytes(model: onnx.ModelProto) -> int:
    total = sum(len(t.raw_data) for t in model.graph.initializer)
    return total + sum(len(a.t.raw_data) for n in model.graph.node for a in n.attribute if a.HasField("t"))


def _batch(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", type=Path, required=True, help="path of the .onnx file to write")
    p.add_argument("--depth", type=int, choices=sorted(RESNEXT_DEPTHS), default=50)
    p.add_argument("--width", default="32x4d", help="GROUPSxBASEd, e.g. 32x4d, 64x4d, 32x8d")
    p.add_argument("--layout", choices=LAYOUTS, default="native")
    p.add_argument("--image", type=int, default=224, help="input height and width")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=_batch, default="N", help="static batch size or a symbol name")
    p.add_argument("--dynamic-spatial", action="store_true", help="symbolic input height and width")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--pad-node", action="store_true", help="grouped convs' padding in a Pad node")
    p.add_argument("--weights", choices=("initializer", "constant"), default="initializer")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--ir-version", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--external-data", action="store_true", help="store weights in '<output>.data'")
    p.add_argument("--check", action="store_true", help="run onnx.checker (full) on the written file")
    args = p.parse_args(argv)

    start = time.perf_counter()
    model = resnext_model(
        args.depth, args.width, args.layout, image=args.image, num_classes=args.num_classes,
        pad_node=args.pad_node, dtype=np.dtype(args.dtype), batch=args.batch,
        dynamic_spatial=args.dynamic_spatial, weights=args.weights, opset=args.opset,
        ir_version=args.ir_version, seed=args.seed,
    )
    size = _weight_bytes(model)
    external = args.external_data or size > _PROTO_LIMIT
    if external and args.weights == "constant":
        p.error("external data needs --weights initializer")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if external:
        location = args.output.name + ".data"
        (args.output.parent / location).unlink(missing_ok=True)  # onnx appends to an existing file
        onnx.save_model(model, args.output, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location, size_threshold=1024)
    else:
        onnx.save_model(model, args.output)
    print(f"wrote {args.output} (ResNeXt-{args.depth} {args.width}, {args.layout}, "
          f"{size / 2**20:.1f} MiB of weights{', external data' if external else ''}) "
          f"in {time.perf_counter() - start:.1f} s")
    if args.check:
        onnx.checker.check_model(str(args.output), full_check=True)
        print("checker: ok")


if __name__ == "__main__":
    main()
