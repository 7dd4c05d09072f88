"""Derive what a chain of channel-moving ops computes, by propagating element indices.

A depthwise Conv's output `y` (shape [N, C*M, spatial...]) gets a `Traced` twin holding, for
every element, the flat index of the element of `y` it came from. Each supported op is applied
to the index arrays exactly as onnxruntime would apply it to the data: Transpose, Reshape,
Slice, Gather and friends move indices; ReduceSum, Add and a 0/1 1x1 Conv *sum* elements,
which appends index "terms" on a trailing axis. A constant added on the way is tracked as a
bias. Whatever the exporter's layout (NCHW, NHWC with Transposes, sums of slices, frozen 1x1
convs), the result says exactly which elements of `y` each output element sums, and
`classify_output` turns that into a channel map, or into the reason it is not one.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np
from onnx import NodeProto, helper

from .graph import GraphIndex, attr

INT_MAX = np.iinfo(np.int64).max


class NotAChannelMove(Exception):
    """The op (as configured) does not just move or sum elements; the message says why."""


class Traced:
    """Index tensor(s) of shape data_shape + (terms,), -1 marking an absent term; plus a constant part.

    A sum keeps its operands as separate `parts` (the terms of all parts add up) so that a chain
    of Adds costs linear, not quadratic, time; `idx` concatenates them when an op needs one array.
    """

    __slots__ = ("parts", "bias")

    def __init__(self, idx: np.ndarray | list[np.ndarray], bias: np.ndarray | None = None):
        self.parts = list(idx) if isinstance(idx, list) else [idx]
        self.bias = bias  # float64, shape == data_shape, or None

    @property
    def idx(self) -> np.ndarray:
        if len(self.parts) > 1:
            self.parts = [np.concatenate(self.parts, axis=-1)]
        return self.parts[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.parts[0].shape[:-1]


def source(shape: tuple[int, ...]) -> Traced:
    """The identity trace of a tensor of `shape`: every element is its own single term."""
    dtype = np.int32 if prod(shape) < 2**31 else np.int64
    return Traced(np.arange(prod(shape), dtype=dtype).reshape(tuple(shape) + (1,)))


# -- constant evaluation of shape subgraphs ------------------------------------------------------

class ShapeEval:
    """Evaluates small integer subgraphs (Shape -> Gather -> Cast -> Slice -> Concat ...) feeding
    Reshapes, using the probe shapes of traced tensors and of the graph's (symbol-substituted) shapes."""

    _MAX_ELEMENTS = 1 << 16

    def __init__(self, index: GraphIndex, traced_shapes: dict[str, tuple[int, ...]], symbols: dict):
        self.ix = index
        self.traced_shapes = traced_shapes
        self.symbols = symbols
        self.cache: dict[str, np.ndarray | None] = {}

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        if name in self.traced_shapes:
            return self.traced_shapes[name]
        shape = self.ix.shape(name)
        if shape is None:
            return None
        dims = []
        for d in shape:
            if isinstance(d, int):
                dims.append(d)
            elif isinstance(d, str) and d in self.symbols:
                dims.append(self.symbols[d])
            else:
                return None
        return tuple(dims)

    def value(self, name: str, depth: int = 0) -> np.ndarray | None:
        if name in self.cache:
            return self.cache[name]
        result = None
        dims = self.ix.constant_dims(name)
        if dims is not None:
            if prod(dims) <= self._MAX_ELEMENTS:
                result = self.ix.constant(name)
        elif depth < 48 and name in self.ix.producer:
            try:
                result = self._eval(self.ix.producer[name], name, depth + 1)
            except (ValueError, IndexError, TypeError, KeyError, NotAChannelMove):
                result = None
        self.cache[name] = result
        return result

    def _eval(self, node: NodeProto, out_name: str, depth: int) -> np.ndarray | None:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            return None
        if op in ("Shape", "Size"):
            shape = self.static_shape(node.input[0])
            if shape is None:
                return None
            if op == "Size":
                return np.array(prod(shape), dtype=np.int64)
            start, end = attr(node, "start", 0), attr(node, "end", None)
            return np.array(shape[start:end], dtype=np.int64)
        ins = []
        for i, name in enumerate(node.input):
            if not name:
                ins.append(None)
                continue
            v = self.value(name, depth)
            if v is None:
                return None
            ins.append(v)
        if len(node.output) != 1:
            return None
        return _eval_small_op(node, ins, self.ix.opset)


def _eval_small_op(node: NodeProto, ins: list, opset: int) -> np.ndarray | None:
    op = node.op_type
    if op == "Identity":
        return ins[0]
    if op == "Cast":
        return ins[0].astype(helper.tensor_dtype_to_np_dtype(attr(node, "to")))
    if op == "Gather":
        return np.take(ins[0], ins[1].astype(np.int64), axis=attr(node, "axis", 0))
    if op == "Concat":
        return np.concatenate([np.atleast_1d(v) for v in ins if v is not None], axis=attr(node, "axis", 0))
    if op == "Unsqueeze":
        axes = attr(node, "axes") if opset < 13 else ins[1].tolist()
        out = ins[0]
        rank = out.ndim + len(axes)
        for a in sorted(a % rank for a in axes):
            out = np.expand_dims(out, a)
        return out
    if op == "Squeeze":
        axes = attr(node, "axes") if opset < 13 else (ins[1].tolist() if len(ins) > 1 and ins[1] is not None else None)
        return np.squeeze(ins[0], axis=None if axes is None else tuple(axes))
    if op == "Slice":
        return ins[0][_slice_tuple(node, ins[0].shape, ins, opset)]
    if op in ("Add", "Sub", "Mul", "Div", "Max", "Min"):
        a, b = ins[0], ins[1]
        if op == "Div" and np.issubdtype(a.dtype, np.integer):
            return (np.trunc(a / b)).astype(a.dtype)
        fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
              "Max": np.maximum, "Min": np.minimum}[op]
        return fn(a, b)
    if op == "Reshape":
        target = attr(node, "shape") if opset < 5 else ins[1].tolist()
        return ins[0].reshape(_reshape_target(ins[0].shape, target, attr(node, "allowzero", 0)))
    if op == "ReduceProd":
        axes = attr(node, "axes") if opset < 18 else (ins[1].tolist() if len(ins) > 1 and ins[1] is not None else None)
        return np.prod(ins[0], axis=None if axes is None else tuple(axes), keepdims=bool(attr(node, "keepdims", 1)))
    return None


# -- index propagation ------------------------------------------------------------------------

def _reshape_target(shape, target, allowzero=0) -> tuple[int, ...]:
    out = [int(t) for t in target]
    for i, t in enumerate(out):
        if t == 0 and not allowzero:
            if i >= len(shape):
                raise NotAChannelMove("Reshape copies a dim that does not exist")
            out[i] = shape[i]
    if out.count(-1) > 1:
        raise NotAChannelMove("Reshape has several -1 dims")
    total = prod(shape)
    if -1 in out:
        known = prod(d for d in out if d != -1)
        if known == 0 or total % known:
            raise NotAChannelMove(f"Reshape to {list(target)} does not fit {list(shape)}")
        out[out.index(-1)] = total // known
    if prod(out) != total:
        raise NotAChannelMove(f"Reshape to {list(target)} does not fit {list(shape)}")
    return tuple(out)


def _slice_tuple(node: NodeProto, shape, ins, opset: int) -> tuple:
    rank = len(shape)
    if opset < 10:
        starts, ends = attr(node, "starts"), attr(node, "ends")
        axes = attr(node, "axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = ins[1].tolist(), ins[2].tolist()
        axes = ins[3].tolist() if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
        steps = ins[4].tolist() if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    index = [slice(None)] * rank
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= rank
        dim = shape[axis]
        if step == 0:
            raise NotAChannelMove("Slice with step 0")
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
            index[axis] = slice(start, end, step)
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            index[axis] = slice(start, None if end < 0 else end, step)
    return tuple(index)


def _move(t: Traced, fn) -> Traced:
    """Apply a pure data-movement function (acting on arrays with a trailing terms axis) to every part."""
    bias = None if t.bias is None else fn(t.bias[..., None])[..., 0]
    return Traced([fn(p) for p in t.parts], bias)


def _axes_input(node: NodeProto, ins, ev_values, opset: int, attr_before: int):
    if opset < attr_before:
        return attr(node, "axes")
    if len(node.input) > 1 and node.input[1]:
        v = ev_values[1]
        if v is None:
            raise NotAChannelMove(f"{node.op_type} axes are not constant")
        return [int(a) for a in np.atleast_1d(v)]
    return None


def _pad_terms(arrays: list[np.ndarray]) -> list[np.ndarray]:
    width = max(a.shape[-1] for a in arrays)
    out = []
    for a in arrays:
        if a.shape[-1] < width:
            pad = np.full(a.shape[:-1] + (width - a.shape[-1],), -1, dtype=a.dtype)
            a = np.concatenate([a, pad], axis=-1)
        out.append(a)
    return out


def _full_bias(t: Traced, shape) -> np.ndarray:
    if t.bias is None:
        return np.zeros(shape, dtype=np.float64)
    return np.broadcast_to(t.bias, shape)


def _sum_traced(parts: list[Traced]) -> Traced:
    shape = np.broadcast_shapes(*(p.shape for p in parts))
    idx = [np.broadcast_to(a, shape + (a.shape[-1],)) for p in parts for a in p.parts]
    biases = [p for p in parts if p.bias is not None]
    bias = None
    if biases:
        bias = np.zeros(shape, dtype=np.float64)
        for p in biases:
            bias = bias + p.bias
    return Traced(idx, bias)


def _add_constant(t: Traced, const: np.ndarray, sign: float) -> Traced:
    shape = np.broadcast_shapes(t.shape, const.shape)
    idx = [np.broadcast_to(a, shape + (a.shape[-1],)) for a in t.parts]
    bias = _full_bias(t, shape) + sign * const.astype(np.float64)
    return Traced(idx, np.ascontiguousarray(np.broadcast_to(bias, shape)))


def conv_1x1_matrix(node: NodeProto, weight: np.ndarray | None) -> np.ndarray:
    """The [O, C] 0/1 matrix of a 1x1 Conv that only sums channels; raises with the reason otherwise."""
    if weight is None:
        raise NotAChannelMove("1x1 Conv weight is not a constant")
    if weight.ndim < 3 or any(k != 1 for k in weight.shape[2:]):
        raise NotAChannelMove(f"Conv kernel {list(weight.shape[2:])} is not 1x1")
    if attr(node, "group", 1) != 1:
        raise NotAChannelMove("1x1 Conv is grouped")
    if any(s != 1 for s in attr(node, "strides", [1])):
        raise NotAChannelMove("1x1 Conv has strides")
    if any(p != 0 for p in attr(node, "pads", [0])):
        raise NotAChannelMove("1x1 Conv has pads")
    matrix = weight.reshape(weight.shape[0], weight.shape[1])
    if not np.all((matrix == 0) | (matrix == 1)):
        raise NotAChannelMove("1x1 Conv weight is not a 0/1 channel-summing matrix")
    return matrix


def _conv_1x1(t: Traced, matrix: np.ndarray, bias: np.ndarray | None) -> Traced:
    out_c, in_c = matrix.shape
    if len(t.shape) < 3 or t.shape[1] != in_c:
        raise NotAChannelMove("1x1 Conv input is not channel-first with matching channels")
    nnz = matrix.sum(axis=1).astype(np.int64)
    width = max(int(nnz.max()), 1)
    cols = np.zeros((out_c, width), dtype=np.int64)
    valid = np.zeros((out_c, width), dtype=bool)
    for o in range(out_c):
        nz = np.flatnonzero(matrix[o])
        cols[o, :len(nz)] = nz
        valid[o, :len(nz)] = True
    g = np.take(t.idx, cols, axis=1)  # [N, O, K, S..., T]
    mask = valid.reshape((1, out_c, width) + (1,) * (g.ndim - 3))
    g = np.where(mask, g, np.asarray(-1, dtype=g.dtype))
    rank = g.ndim
    g = np.moveaxis(g, 2, rank - 2)  # [N, O, S..., K, T]
    idx = g.reshape(g.shape[:-2] + (-1,))
    out_bias = None
    if t.bias is not None:
        out_bias = np.einsum("oc,nc...->no...", matrix.astype(np.float64), t.bias)
    if bias is not None and np.any(bias != 0):
        b = bias.astype(np.float64).reshape((1, out_c) + (1,) * (len(t.shape) - 2))
        out_bias = (out_bias if out_bias is not None else 0) + np.broadcast_to(b, idx.shape[:-1])
    return Traced(idx, None if out_bias is None else np.ascontiguousarray(out_bias))


# Ops that may appear in an emulation region, and which of their inputs carry data.
TRACEABLE_OPS = frozenset({
    "Identity", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather",
    "Split", "Concat", "ReduceSum", "Add", "Sub", "Sum", "Conv",
})


def propagate(node: NodeProto, traced: list[Traced | None], values: list[np.ndarray | None], opset: int) -> list[Traced]:
    """Apply `node` to traced inputs (`traced[i]` is None where input i is a constant, whose value is `values[i]`)."""
    try:
        return _propagate(node, traced, values, opset)
    except (ValueError, IndexError, TypeError, AttributeError) as exc:  # attributes the op cannot have
        raise NotAChannelMove(f"inconsistent {node.op_type} ({exc})") from None


def _propagate(node: NodeProto, traced: list[Traced | None], values: list[np.ndarray | None], opset: int) -> list[Traced]:
    op = node.op_type
    x = traced[0] if traced else None
    if op in ("Add", "Sub", "Sum"):
        parts = [t for t in traced if t is not None]
        consts = [(i, v) for i, (t, v) in enumerate(zip(traced, values)) if t is None]
        if op == "Sub" and (traced[0] is None or traced[1] is not None):
            raise NotAChannelMove("Sub of traced tensors is not a sum")
        if any(v is None for _, v in consts):
            raise NotAChannelMove(f"{op} mixes in a non-constant tensor")
        out = _sum_traced(parts) if len(parts) > 1 else parts[0]
        for i, v in consts:
            out = _add_constant(out, v, -1.0 if op == "Sub" else 1.0)
        return [out]
    if x is None:
        raise NotAChannelMove(f"{op}'s data input is not traced")
    if any(t is not None for t in traced[1:]) and op not in ("Concat",):
        raise NotAChannelMove(f"{op} uses traced data as a parameter")
    if op == "Identity":
        return [x]
    if op == "Transpose":
        perm = attr(node, "perm", list(range(len(x.shape)))[::-1])
        return [_move(x, lambda a: a.transpose(list(perm) + [a.ndim - 1]))]
    if op == "Reshape":
        target = attr(node, "shape") if opset < 5 else (values[1].tolist() if values[1] is not None else None)
        if target is None:
            raise NotAChannelMove("Reshape target shape is not computable")
        target = _reshape_target(x.shape, target, attr(node, "allowzero", 0))
        return [_move(x, lambda a: a.reshape(target + (a.shape[-1],)))]
    if op == "Flatten":
        axis = attr(node, "axis", 1)
        axis = axis + len(x.shape) if axis < 0 else axis
        target = (prod(x.shape[:axis]), prod(x.shape[axis:]))
        return [_move(x, lambda a: a.reshape(target + (a.shape[-1],)))]
    if op in ("Squeeze", "Unsqueeze"):
        axes = _axes_input(node, traced, values, opset, 13)
        rank = len(x.shape)
        if op == "Squeeze":
            axes = [i for i, d in enumerate(x.shape) if d == 1] if axes is None else [a % rank for a in axes]
            if any(x.shape[a] != 1 for a in axes):
                raise NotAChannelMove("Squeeze of a dim that is not 1")
            return [_move(x, lambda a: np.squeeze(a, axis=tuple(axes)))]
        out_rank = rank + len(axes)
        axes = sorted(a % out_rank for a in axes)

        def unsq(a):
            for ax in axes:
                a = np.expand_dims(a, ax)
            return a
        return [_move(x, unsq)]
    if op == "Slice":
        if opset >= 10 and any(values[i] is None for i in range(1, len(node.input)) if node.input[i]):
            raise NotAChannelMove("Slice bounds are not constant")
        index = _slice_tuple(node, x.shape, values, opset)
        return [_move(x, lambda a: a[index])]
    if op == "Gather":
        if values[1] is None:
            raise NotAChannelMove("Gather indices are not constant")
        axis = attr(node, "axis", 0) % len(x.shape)
        indices = values[1].astype(np.int64)
        indices = np.where(indices < 0, indices + x.shape[axis], indices)
        return [_move(x, lambda a: np.take(a, indices, axis=axis))]
    if op == "Split":
        axis = attr(node, "axis", 0) % len(x.shape)
        dim = x.shape[axis]
        if opset < 13:
            sizes = attr(node, "split")
        elif len(node.input) > 1 and node.input[1]:
            if values[1] is None:
                raise NotAChannelMove("Split sizes are not computable")
            sizes = values[1].tolist()
        else:
            sizes = None
        if sizes is None:
            n = len(node.output)
            chunk = -(-dim // n)
            sizes = [min(chunk, dim - i * chunk) for i in range(n)]
        bounds = np.cumsum([0] + list(sizes))
        return [_move(x, lambda a, s=s, e=e: np.take(a, np.arange(s, e), axis=axis)) for s, e in zip(bounds[:-1], bounds[1:])]
    if op == "Concat":
        if any(t is None for t in traced):
            raise NotAChannelMove("Concat with a non-traced input")
        axis = attr(node, "axis") % len(x.shape)
        idx = np.concatenate(_pad_terms([t.idx for t in traced]), axis=axis)
        bias = None
        if any(t.bias is not None for t in traced):
            bias = np.concatenate([_full_bias(t, t.shape) for t in traced], axis=axis)
        return [Traced(idx, bias)]
    if op == "ReduceSum":
        axes = _axes_input(node, traced, values, opset, 13)
        rank = len(x.shape)
        if not axes:
            if opset >= 13 and attr(node, "noop_with_empty_axes", 0):
                return [x]
            axes = list(range(rank))
        axes = sorted({a % rank for a in axes})
        keep = [a for a in range(rank) if a not in axes]
        keepdims = attr(node, "keepdims", 1)
        kept_shape = tuple(1 if (a in axes) else x.shape[a] for a in range(rank)) if keepdims else tuple(x.shape[a] for a in keep)
        idx = [p.transpose(keep + axes + [rank]).reshape(kept_shape + (-1,)) for p in x.parts]
        bias = None
        if x.bias is not None:
            bias = x.bias.sum(axis=tuple(axes), keepdims=bool(keepdims))
        return [Traced(idx, bias)]
    if op == "Conv":
        matrix = conv_1x1_matrix(node, values[1])
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = values[2]
            if bias is None:
                raise NotAChannelMove("1x1 Conv bias is not a constant")
        return [_conv_1x1(x, matrix, bias)]
    raise NotAChannelMove(f"{op} is not a channel move")


# -- reading the result -------------------------------------------------------------------------

@dataclass(frozen=True)
class ChannelMap:
    """out channel o of the traced tensor = bias[o] + sum of source channels terms[o, :] (-1 = none).

    `layout` is "NC" (channels first) or "NLC" (channels last) for how the traced tensor is laid out.
    """

    terms: np.ndarray  # [C_out, T] int64
    bias: np.ndarray | None  # [C_out] float64
    layout: str


def classify_output(t: Traced, source_shape: tuple[int, ...]) -> ChannelMap:
    """Read a channel map from a traced tensor, or raise NotAChannelMove saying why it is not one.

    The traced tensor must be the source's batch and spatial positions, unchanged, with one
    channel axis (first or last after batch), and each output channel must sum the same source
    channels at every position.
    """
    n, channels, spatial = source_shape[0], source_shape[1], tuple(source_shape[2:])
    shape = t.shape
    if len(shape) != len(source_shape):
        raise NotAChannelMove(f"result has rank {len(shape)}, not the conv's rank {len(source_shape)}")
    layouts = []
    if shape[0] == n and tuple(shape[2:]) == spatial:
        layouts.append("NC")
    if shape[0] == n and tuple(shape[1:-1]) == spatial and len(shape) > 2:
        layouts.append("NLC")
    if not layouts:
        raise NotAChannelMove(f"result shape {list(shape)} does not keep the conv's batch and spatial dims {[n, *spatial]}")
    reason = ""
    for layout in layouts:
        idx, bias = t.idx, t.bias
        if layout == "NLC":
            perm = [0, len(shape) - 1] + list(range(1, len(shape) - 1))
            idx = idx.transpose(perm + [len(shape)])
            bias = None if bias is None else bias.transpose(perm)
        try:
            return _read_map(idx, bias, n, channels, spatial, layout)
        except NotAChannelMove as exc:
            reason = str(exc)
    raise NotAChannelMove(reason)


def _read_map(idx, bias, n, channels, spatial, layout) -> ChannelMap:
    s_count = prod(spatial)
    out_c = idx.shape[1]
    corner = (slice(0, 1), slice(None)) + (slice(0, 1),) * len(spatial)
    first = idx[corner]  # terms of (batch 0, position 0): flat index = channel * s_count
    valid = first >= 0
    if np.any(valid & ((first % s_count != 0) | (first >= channels * s_count))):
        raise NotAChannelMove("it mixes batch or spatial positions with channels")
    # Flat index of (batch b, channel 0, position p) in the source, laid out like idx.
    dtype = idx.dtype
    base = (np.arange(n, dtype=dtype).reshape((n, 1) + (1,) * len(spatial) + (1,)) * (channels * s_count)
            + np.arange(s_count, dtype=dtype).reshape((1, 1) + spatial + (1,)))
    # Fast path: the same terms in the same order at every position (what data-movement ops give):
    # idx - base must equal the first position's terms everywhere. One subtraction, one comparison.
    if not (valid.all() and np.array_equal(np.subtract(idx, base, dtype=dtype), np.broadcast_to(first, idx.shape))):
        _check_positions_unordered(idx, base, channels, s_count, corner)
    terms = np.where(valid, first // s_count, -1).reshape(out_c, -1).astype(np.int64)
    terms = -np.sort(-terms, axis=1)  # present terms first
    keep = np.any(terms >= 0, axis=0)
    terms = terms[:, keep] if keep.any() else terms[:, :1]
    out_bias = None
    if bias is not None:
        first_b = bias[corner]
        if not np.array_equal(np.broadcast_to(first_b, bias.shape), bias):
            raise NotAChannelMove("the added constant is not per-channel")
        out_bias = first_b.reshape(out_c)
    return ChannelMap(terms=terms, bias=out_bias, layout=layout)


def _check_positions_unordered(idx, base, channels, s_count, corner) -> None:
    """Slow path: terms may come in another order at other positions; compare them as sets."""
    valid = idx >= 0
    diff = idx.astype(np.int64) - base
    if np.any(valid & ((diff % s_count != 0) | (diff < 0) | (diff >= channels * s_count))):
        raise NotAChannelMove("it mixes batch or spatial positions with channels")
    chan = np.sort(np.where(valid, diff // s_count, -1), axis=-1)
    if not np.array_equal(np.broadcast_to(chan[corner], chan.shape), chan):
        raise NotAChannelMove("the channels summed differ between positions")
