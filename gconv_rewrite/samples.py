"""Ground-truth sample models: grouped convolutions, native and depthwise-emulated.

Builds ONNX models with random weights (fixed seed) for examples, tests and benchmarks:

* `grouped_conv_model`: one grouped Conv, natively or as one of the emulation layouts,
  with the native weights it computes;
* `resnext_block_model`: a stack of ResNeXt bottleneck blocks;
* `resnext_model`: a full ResNeXt-50/101 in any layout.

This module is deliberately independent of the rest of `gconv_rewrite` (pure onnx.helper +
numpy): its models are the ground truth the rewriter is tested against, so it must not share
the rewriter's code or its mistakes.

Emulation layouts. A grouped Conv (C_in inputs, G groups, Cig = C_in/G, C_out outputs,
Cog = C_out/G) is emulated by a depthwise Conv (group=C_in, weight [C_in*Cog, 1, *k]) whose
output channel j = c*Cog + m, with input channel c = g*Cig + i, carries W[g*Cog + m, i],
followed by a tail that sums the Cig partial results of each (g, m):

* ``nchw_reducesum``: Reshape [N,G,Cig,Cog,*S] -> ReduceSum(axis 2) -> Reshape [N,C_out,*S];
* ``nhwc_tf2onnx``: Transpose to NHWC -> Reshape [N,*S,G,Cig,Cog] -> ReduceSum(Cig axis) ->
  Reshape [N,*S,C_out] -> Transpose back, reshape shapes computed at run time
  (Shape -> Gather -> Cast -> Slice -> Concat -> Cast) as tf2onnx emits them;
* ``nhwc_sum_slices``: as above but Cig x (Slice -> Squeeze) and a chain of Add
  (keras-applications 1.0.8 ResNeXt block3);
* ``frozen_1x1``: a 1x1 Conv whose 0/1 kernel sums the in-group channels (later
  keras-applications block3);
* ``interleaved``: depthwise channel j = (i*G + g)*Cog + m; Transpose -> Reshape
  [N,*S,Cig,C_out] -> ReduceSum(Cig axis) -> Transpose back. Groups take *strided* input
  channels (c = i*G + g): equal to a native grouped Conv after permuting its input channels;
* ``wrong_sum_multiplier``: the (a) reshape summed over the Cog axis instead, which is a
  depthwise Conv with summed kernels and NOT a grouped Conv (C_in output channels);
* ``native``: Conv(group=G).

A conv bias goes on the depthwise Conv, split at random over the Cig partial sums, so the
native bias is the sum of the parts (exact up to float rounding).

Every layout supports 1-D, 2-D and 3-D convs. Note: onnxruntime's CPU provider has no
float64 Conv kernel, so float64 models pass the checker but only run on other providers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

__all__ = [
    "LAYOUTS",
    "EQUIVALENT_LAYOUTS",
    "GroupedConvSample",
    "grouped_conv_model",
    "resnext_block_model",
    "resnext_model",
    "swap_input_channels",
]

LAYOUTS = (
    "native",
    "nchw_reducesum",
    "nhwc_tf2onnx",
    "nhwc_sum_slices",
    "frozen_1x1",
    "interleaved",
    "wrong_sum_multiplier",
    "split_slices",
    "split_nhwc",
    "dense",
)
# Layouts that write the grouped conv with plain Convs: sliced (Keras Lambda slices through tf2onnx),
# split channels-last (tf.split through tf2onnx), or one Conv with block-diagonal weights.
_WRITTEN = ("split_slices", "split_nhwc", "dense")
# Layouts that compute a grouped Conv (``interleaved`` up to an input-channel permutation).
EQUIVALENT_LAYOUTS = tuple(lay for lay in LAYOUTS if lay != "wrong_sum_multiplier")

RESNEXT_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

_DTYPES = {
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float64): TensorProto.DOUBLE,
}
_AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")
_PRODUCER = "gconv_rewrite.samples"
Dim = int | str | None


# --------------------------------------------------------------------------- geometry


def _tuple(value: int | Sequence[int], rank: int, what: str) -> tuple[int, ...]:
    out = (int(value),) * rank if np.isscalar(value) else tuple(int(v) for v in value)
    if len(out) != rank:
        raise ValueError(f"{what} needs {rank} values, got {value!r}")
    return out


@dataclass(frozen=True)
class _Geometry:
    """One (native) grouped Conv: channels, groups and spatial attributes."""

    c_in: int
    c_out: int
    groups: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # begin..., end...; all zero unless auto_pad is NOTSET
    auto_pad: str

    @classmethod
    def make(cls, c_in, c_out, groups, kernel, strides, dilations, pads, auto_pad, rank):
        if groups < 2 or c_in % groups or c_out % groups:
            raise ValueError(f"need groups > 1 dividing C_in={c_in} and C_out={c_out}, got {groups}")
        if auto_pad not in _AUTO_PADS:
            raise ValueError(f"auto_pad must be one of {_AUTO_PADS}, got {auto_pad!r}")
        k = _tuple(kernel, rank, "kernel_shape")
        d = _tuple(dilations, rank, "dilations")
        if auto_pad != "NOTSET":
            if pads is not None:
                raise ValueError("explicit pads and auto_pad exclude each other")
            p = (0,) * (2 * rank)
        elif pads is None:  # 'same' size for odd kernels and stride 1
            p = tuple(di * (ki // 2) for ki, di in zip(k, d)) * 2
        elif np.isscalar(pads) or len(pads) == rank:
            p = _tuple(pads, rank, "pads") * 2
        else:
            p = _tuple(pads, 2 * rank, "pads")
        return cls(c_in, c_out, groups, k, _tuple(strides, rank, "strides"), d, p, auto_pad)

    @property
    def rank(self) -> int:
        return len(self.kernel)

    @property
    def cig(self) -> int:
        return self.c_in // self.groups

    @property
    def cog(self) -> int:
        return self.c_out // self.groups

    def out_spatial(self, spatial: Sequence[int | None]) -> tuple[int | None, ...]:
        """Output spatial sizes (ONNX Conv rules); None stays unknown."""
        out = []
        for ax, size in enumerate(spatial):
            if size is None:
                out.append(None)
                continue
            s, ext = self.strides[ax], self.dilations[ax] * (self.kernel[ax] - 1) + 1
            if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                out.append(-(-size // s))
            else:
                padded = size + self.pads[ax] + self.pads[ax + self.rank]
                out.append((padded - ext) // s + 1)
        if any(o is not None and o < 1 for o in out):
            raise ValueError(f"conv output would be empty for input spatial {tuple(spatial)}")
        return tuple(out)

    def conv_attrs(self, group: int, pads: bool = True) -> dict[str, Any]:
        """Conv attributes; `pads=False` when a Pad node in front took the padding."""
        attrs: dict[str, Any] = dict(
            group=group, kernel_shape=list(self.kernel), strides=list(self.strides),
            dilations=list(self.dilations),
        )
        if self.auto_pad != "NOTSET":
            attrs["auto_pad"] = self.auto_pad
        else:
            attrs["pads"] = list(self.pads) if pads else [0] * (2 * self.rank)
        return attrs


# --------------------------------------------------------------------------- emulation weights
# The single place where the depthwise channel order of each layout is defined.


def _depthwise_weight(w: np.ndarray, geo: _Geometry, interleaved: bool) -> np.ndarray:
    """Native W [C_out, Cig, *k] -> depthwise weight [C_in*Cog, 1, *k] (pure reordering)."""
    k = w.shape[2:]
    w = w.reshape(geo.groups, geo.cog, geo.cig, *k)  # [g, m, i]
    order = (2, 0, 1) if interleaved else (0, 2, 1)  # j = ((i*G+g)*Cog + m) or ((g*Cig+i)*Cog + m)
    return np.ascontiguousarray(w.transpose(*order, *range(3, 3 + len(k)))).reshape(-1, 1, *k)


def _split_bias(b: np.ndarray, geo: _Geometry, interleaved: bool, rng) -> np.ndarray:
    """Depthwise bias [C_in*Cog] whose Cig parts sum to the native bias b [C_out]."""
    parts = rng.standard_normal((geo.groups, geo.cig, geo.cog)) * 0.1
    parts[:, 0, :] = b.astype(np.float64).reshape(geo.groups, geo.cog) - parts[:, 1:, :].sum(1)
    if interleaved:
        parts = parts.transpose(1, 0, 2)
    return parts.reshape(-1).astype(b.dtype)


def _frozen_sum_kernel(geo: _Geometry, dtype) -> np.ndarray:
    """0/1 kernel [C_out, C_in*Cog, 1...]: output g*Cog+m sums depthwise (g*Cig+i)*Cog+m over i."""
    k = np.zeros((geo.c_out, geo.c_in * geo.cog), dtype=dtype)
    g, i, m = np.meshgrid(np.arange(geo.groups), np.arange(geo.cig), np.arange(geo.cog), indexing="ij")
    k[(g * geo.cog + m).ravel(), ((g * geo.cig + i) * geo.cog + m).ravel()] = 1
    return k.reshape(*k.shape, *([1] * geo.rank))


def _interleave_perm(c_in: int, groups: int) -> np.ndarray:
    """perm with native(x[:, perm]) == interleaved(x): native channel g*Cig+i is x channel i*G+g."""
    cig = c_in // groups
    return np.arange(c_in).reshape(cig, groups).T.reshape(-1)


# --------------------------------------------------------------------------- graph building


class _Graph:
    """Collects nodes and constants; emits opset-dependent forms of a few ops."""

    def __init__(self, opset: int, weights: str):
        if opset < 11:
            raise ValueError(f"opset {opset} < 11 is not supported")
        if weights not in ("initializer", "constant"):
            raise ValueError(f"weights must be 'initializer' or 'constant', got {weights!r}")
        self.opset, self.weights = opset, weights
        # Tensors are written straight into the final ModelProto: helper.make_graph/make_model
        # would copy every initializer twice, tripling peak memory on a 333 MB ResNeXt-101.
        self.proto = onnx.ModelProto()
        self.nodes = self.proto.graph.node
        self._used: Counter[str] = Counter()

    def name(self, base: str) -> str:
        """A unique, deterministic name derived from `base`."""
        n = self._used[base]
        self._used[base] += 1
        return base if n == 0 else f"{base}_{n}"

    def const(self, base: str, value: np.ndarray) -> str:
        """A constant tensor, as an initializer or a Constant node (per `weights`)."""
        name = self.name(base)
        if self.weights == "initializer":
            tensor = self.proto.graph.initializer.add()
        else:
            node = self.nodes.add()
            node.op_type, node.name = "Constant", self.name(f"{name}/Constant")
            node.output.append(name)
            attr = node.attribute.add()
            attr.name, attr.type = "value", onnx.AttributeProto.TENSOR
            tensor = attr.t
        value = np.ascontiguousarray(value)
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(value.dtype)
        tensor.dims.extend(value.shape)
        tensor.raw_data = value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
        return name

    def ints(self, base: str, values: Sequence[int]) -> str:
        return self.const(base, np.asarray(values, dtype=np.int64))

    def op(self, op_type: str, inputs: Sequence[str], base: str, **attrs) -> str:
        """Append one single-output node; its output is named after the node."""
        name = self.name(base)
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attrs))
        return name

    def reduce_sum(self, x: str, axis: int, base: str) -> str:
        if self.opset < 13:  # axes became an input in opset 13
            return self.op("ReduceSum", [x], base, axes=[axis], keepdims=0)
        return self.op("ReduceSum", [x, self.ints(f"{base}/axes", [axis])], base, keepdims=0)

    def squeeze(self, x: str, axis: int, base: str) -> str:
        if self.opset < 13:
            return self.op("Squeeze", [x], base, axes=[axis])
        return self.op("Squeeze", [x, self.ints(f"{base}/axes", [axis])], base)

    def slice(self, x: str, start: int, end: int, axis: int, base: str) -> str:
        ins = [self.ints(f"{base}/{what}", [v]) for what, v in (("starts", start), ("ends", end), ("axes", axis))]
        return self.op("Slice", [x, *ins], base)

    def set_output(self, x: str, name: str = "output") -> None:
        """Rename tensor `x` (produced by one node, consumed by none) to the graph output name."""
        for node in self.nodes:
            node.output[:] = [name if o == x else o for o in node.output]

    def reshape(self, x: str, shape: Sequence[int] | str, base: str) -> str:
        shape_name = shape if isinstance(shape, str) else self.ints(f"{base}/shape", shape)
        return self.op("Reshape", [x, shape_name], base)

    def model(self, name, inputs, outputs, opset, ir_version, doc="") -> onnx.ModelProto:
        model = self.proto
        model.graph.name, model.graph.doc_string = name, doc
        model.graph.input.extend(inputs)
        model.graph.output.extend(outputs)
        model.opset_import.append(helper.make_opsetid("", opset))
        model.ir_version = ir_version
        model.producer_name, model.producer_version = _PRODUCER, "1"
        return model


def _to_nhwc(rank: int) -> list[int]:
    return [0, *range(2, rank + 2), 1]


def _emit_written(g: _Graph, x: str, geo: _Geometry, layout: str, w: np.ndarray, b: np.ndarray | None,
                  attrs: dict, base: str) -> str:
    """The grouped conv written with plain Convs (`_WRITTEN`), native weights w, b; returns its output."""
    G, cig, cog, r = geo.groups, geo.cig, geo.cog, geo.rank
    if layout == "dense":
        dense = np.zeros((geo.c_out, geo.c_in) + w.shape[2:], dtype=w.dtype)
        for i in range(G):
            dense[i * cog:(i + 1) * cog, i * cig:(i + 1) * cig] = w[i * cog:(i + 1) * cog]
        ins = [x, g.const(f"{base}.weight", dense)] + ([g.const(f"{base}.bias", b)] if b is not None else [])
        return g.op("Conv", ins, f"{base}/Conv", **attrs)
    if layout == "split_slices":
        parts = [g.slice(x, i * cig, (i + 1) * cig, 1, f"{base}/Slice") for i in range(G)]
    else:
        t = g.op("Transpose", [x], f"{base}/to_nhwc", perm=_to_nhwc(r))
        names = [g.name(f"{base}/Split_out") for _ in range(G)]
        if g.opset < 13:
            g.nodes.append(helper.make_node("Split", [t], names, name=g.name(f"{base}/Split"), axis=r + 1,
                                            split=[cig] * G))
        else:
            g.nodes.append(helper.make_node("Split", [t, g.ints(f"{base}/split", [cig] * G)], names,
                                            name=g.name(f"{base}/Split"), axis=r + 1))
        parts = [g.op("Transpose", [p], f"{base}/to_nchw", perm=[0, r + 1, *range(1, r + 1)]) for p in names]
    outs = []
    for i, part in enumerate(parts):
        ins = [part, g.const(f"{base}.weight{i}", w[i * cog:(i + 1) * cog])]
        if b is not None:
            ins.append(g.const(f"{base}.bias{i}", b[i * cog:(i + 1) * cog]))
        outs.append(g.op("Conv", ins, f"{base}/Conv", **attrs))
    return g.op("Concat", outs, f"{base}/Concat", axis=1)


def _to_nchw(rank: int) -> list[int]:
    return [0, rank + 1, *range(1, rank + 1)]


def _runtime_spatial(g: _Graph, x: str, rank: int, base: str) -> str:
    """The spatial dims of NC* tensor `x` as an int64 vector computed at run time."""
    return g.slice(g.op("Shape", [x], f"{base}/Shape"), 2, 2 + rank, 0, f"{base}/spatial")


def _emit_conv(
    g: _Graph, x: str, geo: _Geometry, layout: str, w: np.ndarray, b: np.ndarray | None,
    out_spatial: tuple[int | None, ...], *, pad_node: bool, split_rng, base: str,
) -> str:
    """Emit `layout`'s form of the grouped conv with native weights w, b; returns its output."""
    r, G, cig, cog = geo.rank, geo.groups, geo.cig, geo.cog
    if pad_node:
        if geo.auto_pad != "NOTSET":
            raise ValueError("pad_node needs explicit pads (auto_pad='NOTSET')")
        p = geo.pads
        pads = [0, 0, *p[:r], 0, 0, *p[r:]]
        x = g.op("Pad", [x, g.ints(f"{base}/pads", pads)], f"{base}/Pad", mode="constant")
    attrs = geo.conv_attrs(group=G, pads=not pad_node)
    if layout == "native":
        ins = [x, g.const(f"{base}.weight", w)] + ([g.const(f"{base}.bias", b)] if b is not None else [])
        return g.op("Conv", ins, f"{base}/Conv", **attrs)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    if layout in _WRITTEN:
        return _emit_written(g, x, geo, layout, w, b, {**attrs, "group": 1}, base)

    interleaved = layout == "interleaved"
    attrs["group"] = geo.c_in
    ins = [x, g.const(f"{base}.dw.weight", _depthwise_weight(w, geo, interleaved))]
    if b is not None:
        ins.append(g.const(f"{base}.dw.bias", _split_bias(b, geo, interleaved, split_rng)))
    dw = g.op("Conv", ins, f"{base}/dw/Conv", **attrs)
    static = all(s is not None for s in out_spatial)
    c_y = geo.c_in if layout == "wrong_sum_multiplier" else geo.c_out
    keep = [0] * (r + 1)  # Reshape 0 = copy N (and, in NHWC, the spatial dims) from the input

    if layout in ("nchw_reducesum", "wrong_sum_multiplier"):
        if static:
            split, merge = [0, G, cig, cog, *out_spatial], [0, c_y, *out_spatial]
        else:
            hw = _runtime_spatial(g, dw, r, base)
            split = g.op("Concat", [g.ints(f"{base}/split_dims", [0, G, cig, cog]), hw], f"{base}/split_shape", axis=0)
            merge = g.op("Concat", [g.ints(f"{base}/merge_dims", [0, c_y]), hw], f"{base}/merge_shape", axis=0)
        t = g.reshape(dw, split, f"{base}/Reshape")
        # The right tail sums the Cig axis (2); the wrong one sums the multiplier axis (3).
        t = g.reduce_sum(t, 2 if layout == "nchw_reducesum" else 3, f"{base}/ReduceSum")
        return g.reshape(t, merge, f"{base}/Reshape")

    if layout == "frozen_1x1":
        k = g.const(f"{base}.sum.weight", _frozen_sum_kernel(geo, w.dtype))
        return g.op("Conv", [dw, k], f"{base}/sum/Conv", kernel_shape=[1] * r, strides=[1] * r, pads=[0] * (2 * r))

    t = g.op("Transpose", [dw], f"{base}/to_nhwc", perm=_to_nhwc(r))
    if layout == "interleaved":
        t = g.reshape(t, [*keep, cig, geo.c_out], f"{base}/Reshape")
        t = g.reduce_sum(t, r + 1, f"{base}/ReduceSum")
    elif layout == "nhwc_sum_slices":
        t = g.reshape(t, [*keep, G, cig, cog], f"{base}/Reshape")
        parts = [g.squeeze(g.slice(t, i, i + 1, r + 2, f"{base}/Slice"), r + 2, f"{base}/Squeeze") for i in range(cig)]
        t = parts[0]
        for part in parts[1:]:
            t = g.op("Add", [t, part], f"{base}/Add")
        t = g.reshape(t, [*keep, geo.c_out], f"{base}/Reshape")
    else:  # nhwc_tf2onnx: TF computes reshape shapes in int32 from tf.shape(); tf2onnx keeps that.
        shape = g.op("Shape", [dw], f"{base}/Shape")
        lead = g.op("Gather", [shape, g.ints(f"{base}/nhwc_dims", [0, *range(2, r + 2)])], f"{base}/Gather", axis=0)
        lead = g.op("Cast", [lead], f"{base}/Cast", to=TensorProto.INT32)
        lead = g.op("Slice", [lead, *(g.ints(f"{base}/{n}", [v]) for n, v in (("starts", 0), ("ends", r + 1)))],
                    f"{base}/strided_slice")

        def shape_of(tail: Sequence[int], what: str) -> str:
            dims = g.const(f"{base}/{what}_dims", np.asarray(tail, dtype=np.int32))
            cat = g.op("Concat", [lead, dims], f"{base}/{what}_shape", axis=0)
            return g.op("Cast", [cat], f"{base}/{what}_shape_i64", to=TensorProto.INT64)

        t = g.reshape(t, shape_of([G, cig, cog], "split"), f"{base}/Reshape")
        t = g.reduce_sum(t, r + 2, f"{base}/ReduceSum")
        t = g.reshape(t, shape_of([geo.c_out], "merge"), f"{base}/Reshape")
    return g.op("Transpose", [t], f"{base}/to_nchw", perm=_to_nchw(r))


def _value_info(name: str, elem: int, dims: Sequence[Dim]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(dims))


def _spatial_dims(spatial: Sequence[int], dynamic: bool) -> tuple[Dim, ...]:
    names = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}[len(spatial)]
    return tuple(names) if dynamic else tuple(spatial)


def _check_common(layout: str, dtype, ir_version: int) -> tuple[np.dtype, int]:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    dt = np.dtype(dtype)
    if dt not in _DTYPES:
        raise ValueError(f"dtype must be float16, float32 or float64, got {dt}")
    return dt, _DTYPES[dt]


def _normal(rng, shape, std: float, dtype) -> np.ndarray:
    """N(0, std) drawn directly in float32 (cheap for large models), then cast."""
    a = rng.standard_normal(shape, dtype=np.float32)
    a *= np.float32(std)
    return a if np.dtype(dtype) == np.float32 else a.astype(dtype)


def _conv_weight(rng, c_out: int, c_in_per_group: int, kernel: Sequence[int], dtype) -> np.ndarray:
    fan_in = c_in_per_group * int(np.prod(kernel))
    return _normal(rng, (c_out, c_in_per_group, *kernel), np.sqrt(2.0 / fan_in), dtype)  # He init


# --------------------------------------------------------------------------- single grouped conv


@dataclass
class GroupedConvSample:
    """A single-conv model and the native grouped Conv it computes.

    For every layout but ``wrong_sum_multiplier``:
    ``model(x) == Conv(x[:, input_perm], weight, bias, group=groups, **attrs)``, where
    `input_perm` is identity except for ``interleaved``. For ``wrong_sum_multiplier`` the model
    was built from the same weights but is not that Conv (`equivalent` is False).
    """

    model: onnx.ModelProto
    layout: str
    weight: np.ndarray  # native [C_out, C_in/G, *kernel]
    bias: np.ndarray | None  # native [C_out]
    groups: int
    attrs: dict[str, Any]  # native Conv attributes: kernel_shape, strides, dilations, pads/auto_pad
    input_perm: np.ndarray  # input channel permutation, identity unless ``interleaved``
    equivalent: bool
    input_name: str = "input"
    output_name: str = "output"
    _options: dict[str, Any] = field(default_factory=dict, repr=False)

    def reference_model(self) -> onnx.ModelProto:
        """A native model of the conv this sample should equal (Gather first if permuted)."""
        return grouped_conv_model("native", **self._options, _input_perm=self.input_perm).model


def grouped_conv_model(
    layout: str = "native",
    *,
    in_channels: int = 8,
    out_channels: int | None = None,
    groups: int = 2,
    spatial: int | Sequence[int] = (8, 8),
    kernel_shape: int | Sequence[int] = 3,
    strides: int | Sequence[int] = 1,
    dilations: int | Sequence[int] = 1,
    pads: int | Sequence[int] | None = None,
    auto_pad: str = "NOTSET",
    bias: bool = False,
    pad_node: bool = False,
    dtype: Any = np.float32,
    batch: int | str = "N",
    dynamic_spatial: bool = False,
    weights: str = "initializer",
    opset: int = 17,
    ir_version: int = 8,
    seed: int = 0,
    _input_perm: np.ndarray | None = None,
) -> GroupedConvSample:
    """One grouped Conv (natively or in an emulation `layout`) from input to output.

    `spatial` is the input's spatial size; its length sets the rank (an int means 2-D square).
    `pads` is None (k//2 * dilation each side), an int, one value per axis, or ONNX's
    begin.../end... list. `pad_node` moves explicit pads into a Pad node before the conv.
    `batch` is a static size or a symbol name; `dynamic_spatial` makes spatial dims symbolic
    (reshape shapes are then computed at run time). `weights` is 'initializer' or 'constant'
    (Constant nodes). The same seed gives the same native weights in every layout.
    """
    options = dict(locals())
    for key in ("layout", "_input_perm"):
        options.pop(key)
    dt, elem = _check_common(layout, dtype, ir_version)
    spatial = (int(spatial),) * 2 if np.isscalar(spatial) else tuple(int(s) for s in spatial)
    rank = len(spatial)
    if rank not in (1, 2, 3):
        raise ValueError(f"spatial rank must be 1, 2 or 3, got {spatial}")
    c_out = in_channels if out_channels is None else out_channels
    geo = _Geometry.make(in_channels, c_out, groups, kernel_shape, strides, dilations, pads, auto_pad, rank)

    rng = np.random.default_rng(seed)
    w = _conv_weight(rng, c_out, geo.cig, geo.kernel, dt)
    b = _normal(rng, (c_out,), 0.5, dt) if bias else None
    split_rng = np.random.default_rng([seed, 1])  # layout-only randomness: keeps w, b layout-independent

    g = _Graph(opset, weights)
    x = "input"
    if _input_perm is not None and not np.array_equal(_input_perm, np.arange(in_channels)):
        x = g.op("Gather", [x, g.ints("input_perm", _input_perm)], "permute_input", axis=1)
    out_spatial = geo.out_spatial([None] * rank if dynamic_spatial else spatial)
    y = _emit_conv(g, x, geo, layout, w, b, out_spatial, pad_node=pad_node, split_rng=split_rng, base="conv")
    g.set_output(y)

    y_channels = in_channels if layout == "wrong_sum_multiplier" else c_out
    model = g.model(
        f"grouped_conv_{layout}",
        [_value_info("input", elem, (batch, in_channels, *_spatial_dims(spatial, dynamic_spatial)))],
        [_value_info("output", elem, (batch, y_channels, *out_spatial))],
        opset, ir_version, doc=f"grouped Conv C_in={in_channels} C_out={c_out} G={groups}, layout {layout}",
    )
    perm = _interleave_perm(in_channels, groups) if layout == "interleaved" else np.arange(in_channels)
    return GroupedConvSample(
        model=model, layout=layout, weight=w, bias=b, groups=groups,
        attrs={k: v for k, v in geo.conv_attrs(groups).items() if k != "group"},
        input_perm=perm, equivalent=layout != "wrong_sum_multiplier", _options=options,
    )


# --------------------------------------------------------------------------- ResNeXt


class _NetBuilder:
    """Adds Conv/BN/ReLU layers with random weights; the native parameters are drawn in the
    same order whatever the layout, so one seed gives one function in every equivalent layout."""

    def __init__(self, g: _Graph, seed: int, dtype: np.dtype, layout: str, pad_node: bool):
        self.g, self.dtype, self.layout, self.pad_node = g, dtype, layout, pad_node
        self.rng = np.random.default_rng(seed)
        self.split_rng = np.random.default_rng([seed, 1])

    def conv(self, x, c_in, c_out, k, stride, name, spatial, *, perm_out=None, bias=False):
        """Plain Conv (no groups); `perm_out` reorders its output channels."""
        w = _conv_weight(self.rng, c_out, c_in, (k, k), self.dtype)
        b = _normal(self.rng, (c_out,), 0.1, self.dtype) if bias else None
        if perm_out is not None:
            w, b = w[perm_out], None if b is None else b[perm_out]
        ins = [x, self.g.const(f"{name}.weight", w)]
        if b is not None:
            ins.append(self.g.const(f"{name}.bias", b))
        y = self.g.op("Conv", ins, f"{name}/Conv", kernel_shape=[k, k], strides=[stride, stride],
                      pads=[k // 2] * 4, dilations=[1, 1], group=1)
        return y, tuple(None if s is None else (s + 2 * (k // 2) - k) // stride + 1 for s in spatial)

    def bn(self, x, c, name, *, relu: bool, perm=None, gamma=(0.5, 1.5)):
        """BatchNormalization with randomised statistics (so BN is never an identity)."""
        rng, dt = self.rng, self.dtype
        params = [
            rng.uniform(*gamma, c), rng.normal(0, 0.1, c),  # scale, bias
            rng.normal(0, 0.1, c), rng.uniform(0.5, 1.5, c),  # running mean, var
        ]
        if perm is not None:
            params = [p[perm] for p in params]
        names = ("weight", "bias", "running_mean", "running_var")
        ins = [self.g.const(f"{name}.{n}", p.astype(dt)) for n, p in zip(names, params)]
        y = self.g.op("BatchNormalization", [x, *ins], f"{name}/BatchNormalization", epsilon=1e-5)
        return self.g.op("Relu", [y], f"{name}/Relu") if relu else y

    def bottleneck(self, x, c_in, width, c_out, groups, stride, name, spatial, conv_bias=False):
        """ResNeXt bottleneck: 1x1-BN-ReLU, grouped 3x3 (stride here, as torchvision), BN-ReLU,
        1x1-BN, projection shortcut when the shape changes, Add, ReLU."""
        # An interleaved tail groups strided channels: permute conv1's outputs (and BN1) so the
        # block still computes the native function (the only exact way without a Gather).
        perm = None
        if self.layout == "interleaved":
            perm = np.argsort(_interleave_perm(width, groups))
        t, _ = self.conv(x, c_in, width, 1, 1, f"{name}.conv1", spatial, perm_out=perm)
        t = self.bn(t, width, f"{name}.bn1", relu=True, perm=perm)
        geo = _Geometry.make(width, width, groups, 3, stride, 1, None, "NOTSET", 2)
        w = _conv_weight(self.rng, width, geo.cig, geo.kernel, self.dtype)
        b = _normal(self.rng, (width,), 0.1, self.dtype) if conv_bias else None
        out_sp = geo.out_spatial(spatial)
        t = _emit_conv(self.g, t, geo, self.layout, w, b, out_sp, pad_node=self.pad_node,
                       split_rng=self.split_rng, base=f"{name}.conv2")
        t = self.bn(t, width, f"{name}.bn2", relu=True)
        t, _ = self.conv(t, width, c_out, 1, 1, f"{name}.conv3", out_sp)
        # Small last-BN scale keeps the residual stream bounded through 33 random blocks.
        t = self.bn(t, c_out, f"{name}.bn3", relu=False, gamma=(0.1, 0.4))
        short = x
        if stride != 1 or c_in != c_out:
            short, _ = self.conv(x, c_in, c_out, 1, stride, f"{name}.downsample.0", spatial)
            short = self.bn(short, c_out, f"{name}.downsample.1", relu=False)
        y = self.g.op("Add", [t, short], f"{name}/Add")
        return self.g.op("Relu", [y], f"{name}/Relu"), out_sp


def resnext_block_model(
    layout: str = "native",
    *,
    in_channels: int = 64,
    width: int = 64,
    out_channels: int | None = None,
    groups: int = 8,
    num_blocks: int = 1,
    stride: int = 1,
    image: int | Sequence[int] = 28,
    conv_bias: bool = False,
    pad_node: bool = False,
    dtype: Any = np.float32,
    batch: int | str = "N",
    dynamic_spatial: bool = False,
    weights: str = "initializer",
    opset: int = 17,
    ir_version: int = 8,
    seed: int = 0,
) -> onnx.ModelProto:
    """A stack of `num_blocks` ResNeXt bottleneck blocks on an NCHW input.

    The first block takes `in_channels` and `stride`; all produce `out_channels` (default
    `in_channels`) with `width` channels in the grouped 3x3 conv. Every layout in
    EQUIVALENT_LAYOUTS with the same seed computes the same function as the native model.
    """
    dt, elem = _check_common(layout, dtype, ir_version)
    c_out = in_channels if out_channels is None else out_channels
    hw = (int(image),) * 2 if np.isscalar(image) else tuple(int(s) for s in image)
    g = _Graph(opset, weights)
    net = _NetBuilder(g, seed, dt, layout, pad_node)
    x, spatial, c = "input", (None, None) if dynamic_spatial else hw, in_channels
    for i in range(num_blocks):
        x, spatial = net.bottleneck(x, c, width, c_out, groups, stride if i == 0 else 1,
                                    f"block{i}", spatial, conv_bias=conv_bias)
        c = c_out
    g.set_output(x)
    return g.model(
        f"resnext_blocks_{layout}",
        [_value_info("input", elem, (batch, in_channels, *_spatial_dims(hw, dynamic_spatial)))],
        [_value_info("output", elem, (batch, c_out, *spatial))],
        opset, ir_version, doc=f"{num_blocks} ResNeXt block(s), width {width}, G={groups}, layout {layout}",
    )


def _parse_width(width: str | tuple[int, int]) -> tuple[int, int]:
    """(groups, base_width) from (32, 4) or '32x4d'."""
    if isinstance(width, str):
        groups, base = width.lower().rstrip("d").split("x")
        return int(groups), int(base)
    return int(width[0]), int(width[1])


def resnext_model(
    depth: int = 50,
    width: str | tuple[int, int] = (32, 4),
    layout: str = "native",
    *,
    image: int = 224,
    num_classes: int = 1000,
    pad_node: bool = False,
    dtype: Any = np.float32,
    batch: int | str = "N",
    dynamic_spatial: bool = False,
    weights: str = "initializer",
    opset: int = 17,
    ir_version: int = 8,
    seed: int = 0,
) -> onnx.ModelProto:
    """A full torchvision-style ResNeXt (stem, 4 stages, avgpool, fc) with random weights.

    `depth` 50 or 101; `width` (groups, base width) e.g. (32, 4), (64, 4), (32, 8) or '32x4d'.
    Grouped convs use `layout`. Weights are drawn tensor by tensor straight into float32, so
    peak memory is about one copy of the model (ResNeXt-101 64x4d: ~333 MB). `frozen_1x1`
    adds dense 0/1 kernels of C x C*Cog each: several GB for 64x4d, save with external data.
    """
    if depth not in RESNEXT_DEPTHS:
        raise ValueError(f"depth must be one of {sorted(RESNEXT_DEPTHS)}, got {depth}")
    groups, base_width = _parse_width(width)
    dt, elem = _check_common(layout, dtype, ir_version)
    g = _Graph(opset, weights)
    net = _NetBuilder(g, seed, dt, layout, pad_node)

    spatial = (None, None) if dynamic_spatial else (image, image)
    x, spatial = net.conv("input", 3, 64, 7, 2, "conv1", spatial)
    x = net.bn(x, 64, "bn1", relu=True)
    x = g.op("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    spatial = tuple(None if s is None else (s + 2 - 3) // 2 + 1 for s in spatial)
    c = 64
    for stage, (blocks, planes) in enumerate(zip(RESNEXT_DEPTHS[depth], (64, 128, 256, 512)), start=1):
        block_width = planes * base_width // 64 * groups
        for i in range(blocks):
            stride = 2 if stage > 1 and i == 0 else 1
            x, spatial = net.bottleneck(x, c, block_width, planes * 4, groups, stride, f"layer{stage}.{i}", spatial)
            c = planes * 4
    x = g.op("GlobalAveragePool", [x], "avgpool")
    x = g.op("Flatten", [x], "flatten", axis=1)
    fc_w = g.const("fc.weight", _normal(net.rng, (num_classes, c), np.sqrt(1.0 / c), dt))
    fc_b = g.const("fc.bias", _normal(net.rng, (num_classes,), 0.01, dt))
    g.nodes.append(helper.make_node("Gemm", [x, fc_w, fc_b], ["output"], name="fc", transB=1))  # small copy
    spatial_in = _spatial_dims((image, image), dynamic_spatial)
    return g.model(
        f"resnext{depth}_{groups}x{base_width}d_{layout}",
        [_value_info("input", elem, (batch, 3, *spatial_in))],
        [_value_info("output", elem, (batch, num_classes))],
        opset, ir_version, doc=f"ResNeXt-{depth} {groups}x{base_width}d, random weights, layout {layout}",
    )


def swap_input_channels(model, conv_index=0, group=0, i=0, j=1):
    """A deliberately wrong copy of `model`: input channels i, j swapped inside one group of one grouped Conv."""
    mutated = onnx.ModelProto()
    mutated.CopyFrom(model)
    convs = [n for n in mutated.graph.node
             if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    inits = {t.name: t for t in mutated.graph.initializer}
    tensor = inits[convs[conv_index].input[1]]
    w = onnx.numpy_helper.to_array(tensor).copy()
    cog = w.shape[0] // next(a.i for a in convs[conv_index].attribute if a.name == "group")
    rows = slice(group * cog, (group + 1) * cog)
    w[rows, [i, j]] = w[rows, [j, i]]
    tensor.CopyFrom(onnx.numpy_helper.from_array(w, tensor.name))
    return mutated
