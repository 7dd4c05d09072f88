"""Derive what a chain of channel-moving ops computes, by propagating element indices.

A depthwise Conv's output `y` (shape [N, C*M, spatial...]) gets a `Traced` twin holding, for
every element, the flat index of the element of `y` it came from. Each supported op is applied
to the index arrays exactly as onnxruntime would apply it to the data: Transpose, Reshape,
Slice, Gather and friends move indices; ReduceSum, Add and a 0/1 1x1 Conv *sum* elements,
which appends index "terms" on a trailing axis. A constant added on the way is tracked as a
bias. Whatever the exporter's layout (NCHW, NHWC with Transposes, sums of slices, frozen 1x1
convs), the result says exactly which elements of `y` each output element sums, and
`classify_output` turns that into a channel map, or into the reason it is not one.

Indices are traced at one probe size of the symbolic dims. What makes the result hold at every
size is the *axis structure* each `Traced` carries beside its indices: each axis as a product of
factors, ints and symbol names. Every op keeps the symbolic factors whole (never sliced, gathered,
summed, squeezed or broadcast, and reshapes only regroup them), or refuses with `SizeDependent`;
the op then acts on the static factors alone, identically at every size, and `classify_output`
checks that the symbolic factors end where the source had them.

`OPS` holds one entry per op: its index propagation, whether it can sum channels, its constant
evaluator; `TRACEABLE_OPS`, `SUMMING_OPS` and `SHAPE_OPS` derive from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Callable

import numpy as np
from onnx import NodeProto

from . import symbolic as sy
from .graph import SHAPE_ONLY_OPS, GraphIndex, attr
from .symbolic import WHOLE_AXIS_END, NotAChannelMove, NotConstant, SizeDependent, Sym, concrete, size_of

INT_MAX = np.iinfo(np.int64).max
Axes = tuple  # per axis, a tuple of factors: ints > 1 and symbol names

__all__ = ["NotAChannelMove", "SizeDependent", "Traced", "source", "ShapeEval", "propagate", "classify_output",
           "ChannelMap", "OPS", "TRACEABLE_OPS", "SUMMING_OPS", "SHAPE_OPS", "conv_1x1_matrix"]


class Traced:
    """Index tensor(s) of shape data_shape + (terms,), -1 marking an absent term; a constant part;
    and the axis structure (`axes`: per axis, its factors; symbol names for symbolic sizes).

    A sum keeps its operands as separate `parts` (the terms of all parts add up) so that a chain
    of Adds costs linear, not quadratic, time; `idx` concatenates them when an op needs one array.
    """

    __slots__ = ("parts", "bias", "axes")

    def __init__(self, idx: np.ndarray | list[np.ndarray], bias: np.ndarray | None = None, axes: Axes | None = None):
        self.parts = list(idx) if isinstance(idx, list) else [idx]
        self.bias = bias  # float64, shape == data_shape, or None
        self.axes = axes if axes is not None else static_axes(self.parts[0].shape[:-1])

    @property
    def idx(self) -> np.ndarray:
        if len(self.parts) > 1:
            self.parts = [np.concatenate(self.parts, axis=-1)]
        return self.parts[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.parts[0].shape[:-1]

    def sym_shape(self) -> list:
        """The shape as sizes (ints, or Syms for symbolic axes)."""
        return [size_of(f) for f in self.axes]


def static_axes(shape) -> Axes:
    return tuple((int(d),) if d != 1 else () for d in shape)


def source(shape: tuple[int, ...], axes: Axes | None = None) -> Traced:
    """The identity trace of a tensor of `shape`: every element is its own single term."""
    dtype = np.int32 if prod(shape) < 2**31 else np.int64
    return Traced(np.arange(prod(shape), dtype=dtype).reshape(tuple(shape) + (1,)), axes=axes)


def _norm(factors) -> tuple:
    """Factors with adjacent ints merged and 1s dropped: equal iff the axes are the same function of the sizes."""
    out: list = []
    for f in factors:
        if isinstance(f, str):
            out.append(f)
        elif f != 1:
            if out and not isinstance(out[-1], str):
                out[-1] *= f
            else:
                out.append(int(f))
    return tuple(out)


def _is_static(factors) -> bool:
    return all(not isinstance(f, str) for f in factors)


def _require_static(t: Traced, axis: int, what: str) -> None:
    if not _is_static(t.axes[axis]):
        raise SizeDependent(f"{what} axis {axis}, whose size {size_of(t.axes[axis])} depends on the input's size")


def regroup(axes: Axes, dims) -> Axes:
    """The factors of a reshape's output axes (`dims`: ints or Syms), cutting the flat factor order
    of `axes`; SizeDependent when a symbolic factor would be split or mixed with another order."""
    runs: list = [1]  # static runs between symbols: [c0, S1, c1, S2, ...]
    for f in (x for a in axes for x in a):
        if isinstance(f, str):
            runs += [f, 1]
        else:
            runs[-1] *= f
    pos, out = 0, []
    for d in dims:
        coef, syms = (d.coef, d.symbols()) if isinstance(d, Sym) else (int(d), {})
        got: list = []
        while syms:
            run = runs[pos]
            if run != 1:
                if coef % run:
                    raise SizeDependent(f"a reshape to {list(dims)} splits a symbolic size")
                coef //= run
                got.append(run)
                runs[pos] = 1
            sym = runs[pos + 1] if pos + 1 < len(runs) else None
            if sym is None or syms.get(sym, 0) < 1:
                raise SizeDependent(f"a reshape to {list(dims)} reorders or splits symbolic sizes")
            syms[sym] -= 1
            syms = {k: v for k, v in syms.items() if v}
            got.append(sym)
            pos += 2
        while coef != 1:
            run = runs[pos]
            if run % coef == 0:
                runs[pos] = run // coef
                got.append(coef)
                coef = 1
            else:
                raise SizeDependent(f"a reshape to {list(dims)} mixes static and symbolic sizes")
        out.append(tuple(got))
    if any(r != 1 for r in runs[pos::2]) or pos != len(runs) - 1:
        raise SizeDependent(f"a reshape to {list(dims)} does not keep the symbolic sizes whole")
    return tuple(out)


# -- constant evaluation of shape subgraphs ------------------------------------------------------

class ShapeEval:
    """Evaluates small integer subgraphs (Shape -> Gather -> Cast -> Slice -> Concat ...) feeding the
    region's parameters, as functions of the symbolic sizes (see symbolic.py). Shapes come from the
    traced tensors' axes and from the graph's inferred shapes (dim_params as symbols, through `aliases`)."""

    _MAX_ELEMENTS = 1 << 16

    def __init__(self, index: GraphIndex, traced_axes: dict[str, Axes], aliases: dict[str, str] | None = None):
        self.ix = index
        self.traced_axes = traced_axes
        self.aliases = aliases or {}
        self.cache: dict[str, np.ndarray | None] = {}
        self.why: dict[str, str] = {}  # why a value is not computable, where it depends on the sizes

    def sym_shape(self, name: str) -> list | None:
        if name in self.traced_axes:
            return [size_of(f) for f in self.traced_axes[name]]
        shape = self.ix.shape(name)
        if shape is None:
            return None
        dims: list = []
        for d in shape:
            if isinstance(d, int):
                dims.append(d)
            elif isinstance(d, str) and d:
                dims.append(Sym.of(self.aliases.get(d, d)))
            else:
                return None
        return dims

    def value(self, name: str, depth: int = 0) -> np.ndarray | None:
        """The value of `name` (an int array, or an object array holding Syms), None if not computable."""
        if name in self.cache:
            return self.cache[name]
        result = None
        dims = self.ix.constant_dims(name)
        if dims is not None:
            if prod(dims) <= self._MAX_ELEMENTS:
                result = self.ix.constant(name)
        elif depth < 48 and name in self.ix.producer:
            try:
                result = self._eval(self.ix.producer[name], depth + 1)
            except SizeDependent as exc:
                self.why[name] = str(exc)
            except (NotConstant, NotAChannelMove, ValueError, IndexError, TypeError, KeyError, OverflowError):
                result = None
        self.cache[name] = result
        return result

    def _eval(self, node: NodeProto, depth: int) -> np.ndarray | None:
        rule = OPS.get(node.op_type)
        if node.domain not in ("", "ai.onnx") or rule is None or rule.evaluate is None or len(node.output) != 1:
            return None
        if rule.shape_only:
            shape = self.sym_shape(node.input[0])
            return None if shape is None else rule.evaluate(node, [shape], self.ix.opset)
        ins = []
        for name in node.input:
            v = self.value(name, depth) if name else None
            if v is None and name:
                if self.why.get(name):
                    raise SizeDependent(self.why[name])
                return None
            ins.append(v)
        return rule.evaluate(node, ins, self.ix.opset)


# -- index propagation ------------------------------------------------------------------------

def _move(t: Traced, fn, axes: Axes) -> Traced:
    """Apply a pure data-movement function (acting on arrays with a trailing terms axis) to every part."""
    bias = None if t.bias is None else fn(t.bias[..., None])[..., 0]
    return Traced([fn(p) for p in t.parts], bias, axes)


@dataclass
class _Ctx:
    """What an op's propagation needs beside its inputs: the opset, and the probe sizes of the symbols."""

    opset: int
    env: dict

    def conc(self, v):
        return concrete(v, self.env)


def _const_axes(ctx: _Ctx, node: NodeProto, values, i: int, input_from: int) -> list[int] | None:
    """Constant axes (attribute before `input_from`, then input i); never size-dependent."""
    if ctx.opset < input_from:
        return attr(node, "axes")
    if len(node.input) > i and node.input[i]:
        v = values[i]
        if v is None:
            raise NotAChannelMove(f"{node.op_type} axes are not constant")
        if sy.is_symbolic(v):
            raise SizeDependent(f"{node.op_type} axes depend on the input's size")
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


def _broadcast_axes(operands: list[Axes]) -> Axes:
    """Axes of a broadcast (right-aligned): a symbolic axis may meet only itself or size 1 (a
    broadcast of size 1 is the same at every size); a static size meeting it would not be."""
    rank = max(len(a) for a in operands)
    out = []
    for k in range(rank):
        seen = [a[k - rank + len(a)] for a in operands if k - rank + len(a) >= 0]
        sym = {_norm(f) for f in seen if not _is_static(f)}
        if len(sym) > 1 or (sym and any(_is_static(f) and _norm(f) != () for f in seen)):
            raise SizeDependent("an elementwise op broadcasts a symbolic size")
        out.append(next(iter(sym)) if sym else max(seen, key=lambda f: prod(f)))
    return tuple(out)


def _sum_traced(parts: list[Traced]) -> Traced:
    shape = np.broadcast_shapes(*(p.shape for p in parts))
    axes = _broadcast_axes([p.axes for p in parts])
    idx = [np.broadcast_to(a, shape + (a.shape[-1],)) for p in parts for a in p.parts]
    biases = [p for p in parts if p.bias is not None]
    bias = None
    if biases:
        bias = np.zeros(shape, dtype=np.float64)
        for p in biases:
            bias = bias + p.bias
    return Traced(idx, bias, axes)


def _add_constant(t: Traced, const: np.ndarray, sign: float) -> Traced:
    if const.dtype == object or const.dtype.kind not in "iufb":
        raise SizeDependent("the added constant depends on the input's size")
    axes = _broadcast_axes([t.axes, static_axes(const.shape)])
    shape = np.broadcast_shapes(t.shape, const.shape)
    idx = [np.broadcast_to(a, shape + (a.shape[-1],)) for a in t.parts]
    bias = _full_bias(t, shape) + sign * const.astype(np.float64)
    return Traced(idx, np.ascontiguousarray(np.broadcast_to(bias, shape)), axes)


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
    if attr(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET", "VALID", b"VALID", "SAME_UPPER", b"SAME_UPPER",
                                                "SAME_LOWER", b"SAME_LOWER"):
        raise NotAChannelMove("1x1 Conv has an unknown auto_pad")
    matrix = weight.reshape(weight.shape[0], weight.shape[1])
    if not np.all((matrix == 0) | (matrix == 1)):
        raise NotAChannelMove("1x1 Conv weight is not a 0/1 channel-summing matrix")
    return matrix


def _conv_1x1(t: Traced, matrix: np.ndarray, bias: np.ndarray | None) -> Traced:
    out_c, in_c = matrix.shape
    if len(t.shape) < 3 or t.shape[1] != in_c:
        raise NotAChannelMove("1x1 Conv input is not channel-first with matching channels")
    _require_static(t, 1, "1x1 Conv sums over")
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
    axes = (t.axes[0], static_axes([out_c])[0]) + tuple(t.axes[2:])
    return Traced(idx, None if out_bias is None else np.ascontiguousarray(out_bias), axes)


# -- the ops, one function each --------------------------------------------------------------------

def _t_sum(node, traced, values, ctx):
    op = node.op_type
    parts = [t for t in traced if t is not None]
    consts = [(i, v) for i, (t, v) in enumerate(zip(traced, values)) if t is None]
    if op == "Sub" and (traced[0] is None or traced[1] is not None):
        raise NotAChannelMove("Sub of traced tensors is not a sum")
    if any(v is None for _, v in consts):
        raise NotAChannelMove(f"{op} mixes in a non-constant tensor")
    out = _sum_traced(parts) if len(parts) > 1 else parts[0]
    for _, v in consts:
        out = _add_constant(out, v, -1.0 if op == "Sub" else 1.0)
    return [out]


def _t_identity(node, traced, values, ctx):
    return [traced[0]]


def _t_transpose(node, traced, values, ctx):
    x = traced[0]
    perm = list(attr(node, "perm", list(range(len(x.shape)))[::-1]))
    if sorted(p % len(x.shape) for p in perm) != list(range(len(x.shape))):
        raise NotAChannelMove("Transpose perm is not a permutation")
    return [_move(x, lambda a: a.transpose(perm + [a.ndim - 1]), tuple(x.axes[p] for p in perm))]


def _t_reshape(node, traced, values, ctx):
    x = traced[0]
    if ctx.opset < 5:
        target = attr(node, "shape")
    else:
        target = values[1]
        if target is None:
            raise NotAChannelMove("Reshape target shape is not computable")
        target = target.reshape(-1).tolist()
    allowzero = attr(node, "allowzero", 0) if ctx.opset >= 14 else 0
    dims = sy.reshape_target(x.sym_shape(), target, allowzero)
    return [_reshape_to(x, dims, ctx)]


def _reshape_to(x: Traced, dims, ctx: _Ctx) -> Traced:
    axes = regroup(x.axes, dims)
    shape = tuple(concrete(np.array([size_of(f)], dtype=object), ctx.env)[0] for f in axes)
    if prod(shape) != prod(x.shape):
        raise NotAChannelMove(f"Reshape to {list(dims)} does not fit {list(x.shape)}")
    return _move(x, lambda a: a.reshape(shape + (a.shape[-1],)), axes)


def _t_flatten(node, traced, values, ctx):
    x = traced[0]
    rank = len(x.shape)
    axis = attr(node, "axis", 1)
    if not -rank <= axis <= rank:
        raise NotAChannelMove("Flatten axis out of range")
    axis = axis + rank if axis < 0 else axis
    sizes = x.sym_shape()
    head, tail = 1, 1
    for d in sizes[:axis]:
        head = head * d
    for d in sizes[axis:]:
        tail = tail * d
    return [_reshape_to(x, [head, tail], ctx)]


def _t_squeeze(node, traced, values, ctx):
    x = traced[0]
    rank = len(x.shape)
    axes = _const_axes(ctx, node, values, 1, 13)
    if axes is None:
        if any(not _is_static(f) for f in x.axes):
            raise SizeDependent("Squeeze without axes removes a symbolic dim wherever it is 1")
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    axes = sorted({a % rank for a in axes})
    if any(x.shape[a] != 1 or not _is_static(x.axes[a]) for a in axes):
        raise NotAChannelMove("Squeeze of a dim that is not 1")
    kept = tuple(f for i, f in enumerate(x.axes) if i not in axes)
    return [_move(x, lambda a: np.squeeze(a, axis=tuple(axes)), kept)]


def _t_unsqueeze(node, traced, values, ctx):
    x = traced[0]
    axes = _const_axes(ctx, node, values, 1, 13)
    if axes is None:
        raise NotAChannelMove("Unsqueeze without axes")
    out_rank = len(x.shape) + len(axes)
    axes = sorted(a % out_rank for a in axes)
    if len(set(axes)) != len(axes):
        raise NotAChannelMove("Unsqueeze with repeated axes")
    new_axes = list(x.axes)
    for ax in axes:
        new_axes.insert(ax, ())

    def unsq(a):
        for ax in axes:
            a = np.expand_dims(a, ax)
        return a
    return [_move(x, unsq, tuple(new_axes))]


def _whole(start, end, step, size) -> bool:
    """A Slice bound that spans the whole axis of `size` (maybe symbolic) at every size."""
    if isinstance(start, Sym) or step != 1 or not (int(start) == 0 or int(start) <= -WHOLE_AXIS_END):
        return False
    return (not isinstance(end, Sym) and int(end) >= WHOLE_AXIS_END) or sy.provably_ge(end, size)


def _t_slice(node, traced, values, ctx):
    x = traced[0]
    if ctx.opset >= 10 and any(values[i] is None for i in range(1, len(node.input)) if node.input[i]):
        raise NotAChannelMove("Slice bounds are not constant")
    starts, ends, axes, steps = sy.slice_params(node, values, ctx.opset)
    rank = len(x.shape)
    new_axes = list(x.axes)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = int(axis) % rank
        size = size_of(x.axes[axis])
        if isinstance(step, Sym):
            raise SizeDependent("Slice step depends on the input's size")
        if _whole(start, end, step, size):
            continue
        _require_static(x, axis, "Slice cuts a part of")
        if isinstance(start, Sym) or (isinstance(end, Sym) and not sy.provably_ge(end, size)):
            raise SizeDependent("Slice bounds depend on the input's size")
    conc = [[int(ctx.conc(np.array([v], dtype=object))[0]) if isinstance(v, Sym) else int(v) for v in vs]
            for vs in (starts, ends, axes, steps)]
    index = sy.slice_tuple(x.shape, *conc)
    for axis, sl in enumerate(index):
        if sl != slice(None) and _is_static(x.axes[axis]):
            new_axes[axis] = static_axes([len(range(*sl.indices(x.shape[axis])))])[0]
    return [_move(x, lambda a: a[index], tuple(new_axes))]


def _t_gather(node, traced, values, ctx):
    x = traced[0]
    if values[1] is None:
        raise NotAChannelMove("Gather indices are not constant")
    if sy.is_symbolic(values[1]):
        raise SizeDependent("Gather indices depend on the input's size")
    axis = attr(node, "axis", 0) % len(x.shape)
    _require_static(x, axis, "Gather picks from")
    indices = values[1].astype(np.int64)
    if np.any((indices < -x.shape[axis]) | (indices >= x.shape[axis])):
        raise NotAChannelMove("Gather indices out of range")
    indices = np.where(indices < 0, indices + x.shape[axis], indices)
    axes = tuple(x.axes[:axis]) + static_axes(indices.shape) + tuple(x.axes[axis + 1:])
    return [_move(x, lambda a: np.take(a, indices, axis=axis), axes)]


def _t_split(node, traced, values, ctx):
    x = traced[0]
    axis = attr(node, "axis", 0) % len(x.shape)
    dim = x.shape[axis]
    if ctx.opset < 13:
        sizes = attr(node, "split")
    elif len(node.input) > 1 and node.input[1]:
        if values[1] is None:
            raise NotAChannelMove("Split sizes are not computable")
        if sy.is_symbolic(values[1]):
            raise SizeDependent("Split sizes depend on the input's size")
        sizes = values[1].tolist()
    else:
        sizes = None
    if sizes is None:
        n = len(node.output)
        chunk = -(-dim // n)
        sizes = [min(chunk, dim - i * chunk) for i in range(n)]
    if sum(sizes) != dim or any(s < 0 for s in sizes) or len(sizes) != len(node.output):
        raise NotAChannelMove("Split sizes do not add up to the axis")
    if len(sizes) > 1:
        _require_static(x, axis, "Split cuts")
    bounds = np.cumsum([0] + list(sizes))
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        axes = x.axes if len(sizes) == 1 else x.axes[:axis] + static_axes([e - s]) + x.axes[axis + 1:]
        outs.append(_move(x, lambda a, s=s, e=e: np.take(a, np.arange(s, e), axis=axis), axes))
    return outs


def _t_concat(node, traced, values, ctx):
    x = traced[0]
    if any(t is None for t in traced):
        raise NotAChannelMove("Concat with a non-traced input")
    axis = attr(node, "axis") % len(x.shape)
    for t in traced:
        _require_static(t, axis, "Concat joins along")
        if [_norm(f) for i, f in enumerate(t.axes) if i != axis] != [_norm(f) for i, f in enumerate(x.axes)
                                                                      if i != axis]:
            raise SizeDependent("Concat joins tensors whose other sizes differ as functions of the input's size")
    idx = np.concatenate(_pad_terms([t.idx for t in traced]), axis=axis)
    bias = None
    if any(t.bias is not None for t in traced):
        bias = np.concatenate([_full_bias(t, t.shape) for t in traced], axis=axis)
    axes = x.axes[:axis] + static_axes([idx.shape[axis]]) + x.axes[axis + 1:]
    return [Traced(idx, bias, axes)]


def _t_reduce_sum(node, traced, values, ctx):
    x = traced[0]
    axes = _const_axes(ctx, node, values, 1, 13)
    rank = len(x.shape)
    if not axes:
        if ctx.opset >= 13 and attr(node, "noop_with_empty_axes", 0):
            return [x]
        axes = list(range(rank))
    axes = sorted({a % rank for a in axes})
    for a in axes:
        _require_static(x, a, "ReduceSum sums over")
    keep = [a for a in range(rank) if a not in axes]
    keepdims = attr(node, "keepdims", 1)
    kept_shape = tuple(1 if (a in axes) else x.shape[a] for a in range(rank)) if keepdims \
        else tuple(x.shape[a] for a in keep)
    kept_axes = tuple(() if a in axes else x.axes[a] for a in range(rank)) if keepdims \
        else tuple(x.axes[a] for a in keep)
    idx = [p.transpose(keep + axes + [rank]).reshape(kept_shape + (-1,)) for p in x.parts]
    bias = None
    if x.bias is not None:
        bias = x.bias.sum(axis=tuple(axes), keepdims=bool(keepdims))
    return [Traced(idx, bias, kept_axes)]


def _admit_conv(node: NodeProto, constant) -> str | None:
    """Only a 0/1 1x1 Conv joins a region (it sums channels); any other Conv ends it, saying why."""
    try:
        conv_1x1_matrix(node, constant(node.input[1]))
    except NotAChannelMove as exc:
        return str(exc)
    return None


def _t_conv(node, traced, values, ctx):
    matrix = conv_1x1_matrix(node, values[1])
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = values[2]
        if bias is None:
            raise NotAChannelMove("1x1 Conv bias is not a constant")
    return [_conv_1x1(traced[0], matrix, bias)]


@dataclass(frozen=True)
class OpRule:
    """Everything the analysis knows about one op."""

    trace: Callable | None = None  # index propagation: (node, traced, values, ctx) -> outputs' Traced
    sums: bool = False  # it can sum or regroup channels (a depthwise Conv followed by none emulates nothing)
    joins: bool = False  # several inputs may be traced (sums, concatenations)
    evaluate: Callable | None = None  # constant evaluation with ONNX's semantics: (node, inputs, opset)
    shape_only: bool = False  # reads only its input's shape (its evaluator gets the shape)
    admit: Callable | None = None  # before growing a region through it: (node, constant lookup) -> why not, or None


OPS: dict[str, OpRule] = {
    "Identity": OpRule(_t_identity, evaluate=sy.ev_identity),
    "Transpose": OpRule(_t_transpose),
    "Reshape": OpRule(_t_reshape, sums=True, evaluate=sy.ev_reshape),
    "Flatten": OpRule(_t_flatten),
    "Squeeze": OpRule(_t_squeeze, evaluate=sy.ev_squeeze),
    "Unsqueeze": OpRule(_t_unsqueeze, evaluate=sy.ev_unsqueeze),
    "Slice": OpRule(_t_slice, evaluate=sy.ev_slice),
    "Gather": OpRule(_t_gather, evaluate=sy.ev_gather),
    "Split": OpRule(_t_split),
    "Concat": OpRule(_t_concat, joins=True, evaluate=sy.ev_concat),
    "ReduceSum": OpRule(_t_reduce_sum, sums=True),
    "Add": OpRule(_t_sum, sums=True, joins=True, evaluate=sy.ev_arith),
    "Sub": OpRule(_t_sum, joins=True, evaluate=sy.ev_arith),
    "Sum": OpRule(_t_sum, sums=True, joins=True),
    "Conv": OpRule(_t_conv, sums=True, admit=_admit_conv),
    "Mul": OpRule(evaluate=sy.ev_arith),
    "Div": OpRule(evaluate=sy.ev_arith),
    "Max": OpRule(evaluate=sy.ev_max_min),
    "Min": OpRule(evaluate=sy.ev_max_min),
    "Cast": OpRule(evaluate=sy.ev_cast),
    "ReduceProd": OpRule(evaluate=sy.ev_reduce_prod),
    "Shape": OpRule(evaluate=sy.ev_shape, shape_only=True),
    "Size": OpRule(evaluate=sy.ev_size, shape_only=True),
}
# Ops that may appear in an emulation region.
TRACEABLE_OPS = frozenset(op for op, r in OPS.items() if r.trace is not None)
# Ops that sum or regroup channels: a depthwise Conv followed by none of them emulates nothing.
SUMMING_OPS = frozenset(op for op, r in OPS.items() if r.sums)
# Ops whose output the constant evaluator computes from constants and shapes.
SHAPE_OPS = frozenset(op for op, r in OPS.items() if r.evaluate is not None)
# Several traced inputs allowed.
JOINING_OPS = frozenset(op for op, r in OPS.items() if r.joins)
assert SHAPE_ONLY_OPS == frozenset(op for op, r in OPS.items() if r.shape_only)


def propagate(node: NodeProto, traced: list[Traced | None], values: list[np.ndarray | None], opset: int,
              env: dict | None = None) -> list[Traced]:
    """Apply `node` to traced inputs (`traced[i]` is None where input i is a constant, whose value is
    `values[i]`, maybe holding Syms); `env` gives the symbols' probe sizes."""
    rule = OPS.get(node.op_type)
    if rule is None or rule.trace is None:
        raise NotAChannelMove(f"{node.op_type} is not a channel move")
    x = traced[0] if traced else None
    if node.op_type not in JOINING_OPS:
        if x is None:
            raise NotAChannelMove(f"{node.op_type}'s data input is not traced")
        if any(t is not None for t in traced[1:]):
            raise NotAChannelMove(f"{node.op_type} uses traced data as a parameter")
    try:
        return rule.trace(node, traced, values, _Ctx(opset, env or {}))
    except (ValueError, IndexError, TypeError, AttributeError, ZeroDivisionError) as exc:
        raise NotAChannelMove(f"inconsistent {node.op_type} ({exc})") from None


# -- reading the result -------------------------------------------------------------------------

@dataclass(frozen=True)
class ChannelMap:
    """out channel o of the traced tensor = bias[o] + sum of source channels terms[o, :] (-1 = none).

    `layout` is "NC" (channels first) or "NLC" (channels last) for how the traced tensor is laid out.
    """

    terms: np.ndarray  # [C_out, T] int64
    bias: np.ndarray | None  # [C_out] float64
    layout: str


def classify_output(t: Traced, source_shape: tuple[int, ...], source_axes: Axes | None = None) -> ChannelMap:
    """Read a channel map from a traced tensor, or raise NotAChannelMove saying why it is not one.

    The traced tensor must be the source's batch and spatial positions, unchanged, with one
    channel axis (first or last after batch), and each output channel must sum the same source
    channels at every position. With `source_axes`, its symbolic sizes must also sit where the
    source had them (so that the map read at the probe sizes holds at every size).
    """
    cmap = _classify(t, source_shape)
    if source_axes is not None:
        _check_axes(t.axes, source_axes, cmap.layout)
    return cmap


def _check_axes(axes: Axes, source_axes: Axes, layout: str) -> None:
    """Batch and spatial axes must be the source's, as functions of the sizes; channels static."""
    channel = 1 if layout == "NC" else len(axes) - 1
    positions = [a for i, a in enumerate(axes) if i != channel]
    wanted = [a for i, a in enumerate(source_axes) if i != 1]
    if [_norm(a) for a in positions] != [_norm(a) for a in wanted] or not _is_static(axes[channel]):
        raise SizeDependent(f"its batch and spatial dims are {[size_of(a) for a in positions]}, not the conv's "
                            f"{[size_of(a) for a in wanted]} at every size")


def _classify(t: Traced, source_shape: tuple[int, ...]) -> ChannelMap:
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
        raise NotAChannelMove(f"result shape {list(shape)} does not keep the conv's batch and spatial dims "
                              f"{[n, *spatial]}")
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
