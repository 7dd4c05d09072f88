"""Sizes that depend on the input's symbolic dims, and the constant evaluator of shape subgraphs.

A symbolic dim (a batch `N`, a spatial `H`) is a `Sym`: a monomial `coef * H * W ...`. Shape
subgraphs (Shape -> Gather -> Concat -> Reshape ...) are evaluated on arrays whose elements may be
`Sym`s, so that a Reshape target computed at run time is known *as a function of the sizes*, not
only at one probe size. Arithmetic that does not stay a monomial, or a comparison that is not the
same at every size (`Max(H, 20)`), raises `SizeDependent`: the analysis then refuses the region
with that reason instead of trusting a value that holds at the probe sizes only.

Each evaluator implements the ONNX definition of its op for every opset and attribute it accepts
(tests compare them with onnx.reference.ReferenceEvaluator); anything else raises `NotConstant`.
"""

from __future__ import annotations

from math import prod

import numpy as np
from onnx import NodeProto, helper

from .graph import attr

# An end bound at least this large spans a whole axis (no tensor axis holds 2^31 elements in practice;
# exporters write 2^31 - 1 or 2^63 - 1 for "to the end").
WHOLE_AXIS_END = 2**31 - 1


class NotAChannelMove(Exception):
    """The op (as configured) does not just move or sum elements; the message says why, `code` in short."""

    code = "not_a_channel_move"

    def __init__(self, message: str = "", code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class SizeDependent(NotAChannelMove):
    """What the op does depends on a symbolic size: proven at the probe sizes only, so refused."""

    code = "size_dependent"


class NotConstant(Exception):
    """The constant evaluator does not (or may not) compute this value."""


class Sym:
    """coef * product of symbolic dims (each >= 1): a size known as a function of the input's sizes."""

    __slots__ = ("coef", "powers")

    def __init__(self, coef: int, powers: tuple[tuple[str, int], ...]):
        self.coef = coef
        self.powers = powers

    @staticmethod
    def of(name: str) -> Sym:
        return Sym(1, ((name, 1),))

    @staticmethod
    def make(coef: int, powers: dict[str, int]) -> int | Sym:
        """A monomial, or a plain int when no symbol is left (or the coefficient is 0)."""
        powers = tuple(sorted((k, v) for k, v in powers.items() if v))
        return Sym(int(coef), powers) if powers and coef else int(coef)

    def symbols(self) -> dict[str, int]:
        return dict(self.powers)

    def at(self, env: dict[str, int]) -> int:
        """The value at concrete sizes `env` (symbol -> size)."""
        missing = [k for k, _ in self.powers if k not in env]
        if missing:
            raise SizeDependent(f"it depends on the size {missing[0]}, which the analysis cannot relate to the "
                                f"depthwise Conv's sizes")
        return self.coef * prod(env[k] ** p for k, p in self.powers)

    def __mul__(self, other):
        if isinstance(other, Sym):
            powers = self.symbols()
            for k, p in other.powers:
                powers[k] = powers.get(k, 0) + p
            return Sym.make(self.coef * other.coef, powers)
        other = _plain_int(other)
        return Sym.make(self.coef * other, self.symbols())

    __rmul__ = __mul__

    def __add__(self, other):
        if isinstance(other, Sym) and other.powers == self.powers:
            return Sym.make(self.coef + other.coef, self.symbols())
        if not isinstance(other, Sym) and _plain_int(other) == 0:
            return self
        raise SizeDependent(f"{self} + {other} is not a product of sizes")

    __radd__ = __add__

    def __neg__(self):
        return Sym(-self.coef, self.powers)

    def __sub__(self, other):
        return self + (-other)

    def __rsub__(self, other):
        return (-self) + other

    def divide(self, other) -> int | Sym:
        """Exact division (by an int or a monomial), else SizeDependent."""
        if isinstance(other, Sym):
            powers = self.symbols()
            for k, p in other.powers:
                if powers.get(k, 0) < p:
                    raise SizeDependent(f"{self} / {other} is not a size at every size")
                powers[k] -= p
            coef = other.coef
        else:
            coef = _plain_int(other)
            powers = self.symbols()
        if coef == 0 or self.coef % coef:
            raise SizeDependent(f"{self} / {other} is not a whole number at every size")
        return Sym.make(self.coef // coef, powers)

    def __eq__(self, other):
        return isinstance(other, Sym) and self.coef == other.coef and self.powers == other.powers

    def __hash__(self):
        return hash((self.coef, self.powers))

    def _compare(self, other):
        raise SizeDependent(f"comparing {self} with {other} depends on the input's size")

    __lt__ = __le__ = __gt__ = __ge__ = _compare

    def __int__(self):
        raise SizeDependent(f"{self} is not one number at every size")

    __index__ = __int__

    def __float__(self):
        raise SizeDependent(f"{self} is not one number at every size")

    def __repr__(self):
        terms = [str(self.coef)] if self.coef != 1 else []
        terms += [k if p == 1 else f"{k}^{p}" for k, p in self.powers]
        return "*".join(terms)


def _plain_int(v) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise SizeDependent(f"{v!r} mixed with a symbolic size")
    return int(v)


def provably_ge(a, b) -> bool:
    """True when a >= b at every size (symbols >= 1); False when not provable."""
    if not isinstance(a, Sym) and not isinstance(b, Sym):
        return int(a) >= int(b)
    if isinstance(a, Sym) and isinstance(b, Sym):
        return a.powers == b.powers and a.coef >= b.coef > 0
    if isinstance(a, Sym):  # c * S >= c >= b
        return a.coef > 0 and a.coef >= int(b)
    return False


def is_symbolic(v) -> bool:
    return isinstance(v, np.ndarray) and v.dtype == object and any(isinstance(e, Sym) for e in v.reshape(-1))


def concrete(v, env: dict[str, int]):
    """`v` with every Sym replaced by its value at sizes `env` (int64)."""
    if v is None or not isinstance(v, np.ndarray) or v.dtype != object:
        return v
    flat = [e.at(env) if isinstance(e, Sym) else int(e) for e in v.reshape(-1)]
    return np.array(flat, dtype=np.int64).reshape(v.shape)


def size_of(factors) -> int | Sym:
    """The size of an axis given as factors (ints and symbol names)."""
    out: int | Sym = 1
    for f in factors:
        out = out * (Sym.of(f) if isinstance(f, str) else f)
    return out


def _syms(arrays) -> bool:
    return any(isinstance(a, np.ndarray) and a.dtype == object for a in arrays)


def _as_objects(arrays):
    return [a.astype(object) if isinstance(a, np.ndarray) and a.dtype != object else a for a in arrays]


# -- evaluators: the ONNX definition of each op, on small constant (or symbolic) arrays -----------

def ev_identity(node: NodeProto, ins: list, opset: int):
    return ins[0]


_CASTABLE = "iufb"


def ev_cast(node: NodeProto, ins: list, opset: int):
    to = helper.tensor_dtype_to_np_dtype(attr(node, "to"))
    x = ins[0]
    if x.dtype == object:
        if to.kind not in "iu":
            raise SizeDependent(f"Cast of a symbolic size to {to}")
        return x
    if to.kind not in _CASTABLE or x.dtype.kind not in _CASTABLE:
        raise NotConstant(f"Cast from {x.dtype} to {to}")
    if x.dtype.kind == "f" and to.kind in "iu":
        info = np.iinfo(to)
        if not np.all(np.isfinite(x)) or np.any(x < info.min) or np.any(x > info.max):
            raise NotConstant("Cast of an out-of-range float to an integer is undefined")
    return np.asarray(x.astype(to))


def ev_gather(node: NodeProto, ins: list, opset: int):
    data, indices = ins[0], ins[1]
    if indices.dtype == object or indices.dtype.kind not in "iu":
        raise NotConstant("Gather indices are not integers")
    axis = attr(node, "axis", 0)
    if not -data.ndim <= axis < data.ndim or (axis < 0 and opset < 11):
        raise NotConstant("Gather axis out of range (negative axes from opset 11)")
    if opset < 11 and np.any(indices < 0):
        raise NotConstant("negative Gather indices before opset 11")
    return np.asarray(np.take(data, indices.astype(np.int64), axis=axis))


def ev_concat(node: NodeProto, ins: list, opset: int):
    arrays = [v for v in ins if v is not None]
    if not arrays or any(a.ndim == 0 for a in arrays) or len({a.ndim for a in arrays}) > 1:
        raise NotConstant("Concat of scalars or of tensors of different ranks")
    axis = attr(node, "axis", None)
    if axis is None or not -arrays[0].ndim <= axis < arrays[0].ndim or (axis < 0 and opset < 11):
        raise NotConstant("Concat axis missing or out of range")
    if _syms(arrays):
        arrays = _as_objects(arrays)
    elif len({a.dtype for a in arrays}) > 1:
        raise NotConstant("Concat of different dtypes")
    return np.concatenate(arrays, axis=axis)


def _axes(node: NodeProto, ins: list, opset: int, input_from: int) -> list[int] | None:
    """The `axes` of Squeeze/Unsqueeze/Reduce*: an attribute before `input_from`, then input 1."""
    if opset < input_from:
        axes = attr(node, "axes")
    else:
        axes = ins[1] if len(ins) > 1 else None
        if axes is not None:
            if axes.dtype == object or axes.dtype.kind not in "iu":
                raise NotConstant("axes are not constant integers")
            axes = axes.reshape(-1).tolist()
    return None if axes is None else [int(a) for a in axes]


def ev_unsqueeze(node: NodeProto, ins: list, opset: int):
    axes = _axes(node, ins, opset, 13)
    if axes is None:
        raise NotConstant("Unsqueeze without axes")
    rank = ins[0].ndim + len(axes)
    if any(not -rank <= a < rank for a in axes) or (opset < 11 and any(a < 0 for a in axes)):
        raise NotConstant("Unsqueeze axes out of range")
    if len({a % rank for a in axes}) != len(axes):
        raise NotConstant("Unsqueeze with repeated axes")
    return np.expand_dims(ins[0], tuple(a % rank for a in axes))


def ev_squeeze(node: NodeProto, ins: list, opset: int):
    axes = _axes(node, ins, opset, 13)
    x = ins[0]
    if axes is None:
        return x.reshape([d for d in x.shape if d != 1])
    if any(not -x.ndim <= a < x.ndim for a in axes) or (opset < 11 and any(a < 0 for a in axes)):
        raise NotConstant("Squeeze axes out of range")
    axes = sorted({a % x.ndim for a in axes})
    if any(x.shape[a] != 1 for a in axes):
        raise NotConstant("Squeeze of a dim that is not 1")
    return x.reshape([d for i, d in enumerate(x.shape) if i not in axes])


def slice_params(node: NodeProto, ins: list, opset: int) -> tuple[list, list, list, list]:
    """starts, ends, axes, steps of a Slice (attributes before opset 10), as ONNX reads them."""
    if opset < 10:
        starts, ends = attr(node, "starts"), attr(node, "ends")
        if starts is None or ends is None:
            raise NotConstant("Slice without starts or ends")
        axes = attr(node, "axes", list(range(len(starts))))
        return list(starts), list(ends), list(axes), [1] * len(starts)
    starts, ends = ins[1], ins[2]
    axes = ins[3] if len(ins) > 3 and ins[3] is not None else None
    steps = ins[4] if len(ins) > 4 and ins[4] is not None else None
    starts, ends = starts.reshape(-1).tolist(), ends.reshape(-1).tolist()
    axes = list(range(len(starts))) if axes is None else [int(a) for a in axes.reshape(-1)]
    steps = [1] * len(starts) if steps is None else [int(s) for s in steps.reshape(-1)]
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise NotConstant("Slice parameters of different lengths")
    return starts, ends, axes, steps


def slice_tuple(shape, starts, ends, axes, steps) -> tuple:
    """numpy indices doing what ONNX's Slice does (bounds clamped as the operator defines)."""
    rank = len(shape)
    index = [slice(None)] * rank
    seen = set()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        start, end, step = int(start), int(end), int(step)
        if not -rank <= axis < rank or axis % rank in seen:
            raise NotAChannelMove("Slice axes out of range or repeated")
        axis %= rank
        seen.add(axis)
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


def ev_slice(node: NodeProto, ins: list, opset: int):
    if opset >= 10 and any(v is not None and (v.dtype == object or v.dtype.kind not in "iu") for v in ins[1:]):
        raise NotConstant("Slice bounds are not constant integers")
    try:
        return ins[0][slice_tuple(ins[0].shape, *slice_params(node, ins, opset))]
    except NotAChannelMove as exc:
        raise NotConstant(str(exc)) from None


def _int_div(a, b):
    """Integer division truncating toward zero (ONNX's, C's); symbolic sizes divide exactly."""
    if isinstance(a, Sym):
        return a.divide(b)
    if isinstance(b, Sym):
        raise SizeDependent(f"{a} / {b} is not a size at every size")
    a, b = int(a), int(b)
    if b == 0:
        raise NotConstant("integer division by zero")
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _sym_max(a, b):
    if not isinstance(a, Sym) and not isinstance(b, Sym):
        return max(int(a), int(b))
    if provably_ge(a, b):
        return a
    if provably_ge(b, a):
        return b
    raise SizeDependent(f"Max({a}, {b}) depends on the input's size")


def _sym_min(a, b):
    if not isinstance(a, Sym) and not isinstance(b, Sym):
        return min(int(a), int(b))
    if provably_ge(b, a):
        return a
    if provably_ge(a, b):
        return b
    raise SizeDependent(f"Min({a}, {b}) depends on the input's size")


_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}


def _broadcastable(node: NodeProto, arrays: list, opset: int, legacy_below: int) -> None:
    if opset < legacy_below and len({a.shape for a in arrays}) > 1:
        raise NotConstant(f"{node.op_type} before opset {legacy_below} broadcasts by its own rules")
    if attr(node, "broadcast", 0):
        raise NotConstant("legacy broadcast attribute")
    np.broadcast_shapes(*(a.shape for a in arrays))


def ev_arith(node: NodeProto, ins: list, opset: int):
    a, b = ins[0], ins[1]
    _broadcastable(node, [a, b], opset, 7)
    op = node.op_type
    if _syms([a, b]):
        a, b = _as_objects([a, b])
        if op == "Div":
            return np.frompyfunc(_int_div, 2, 1)(a, b).astype(object)
        return np.asarray(_BINARY[op](a, b), dtype=object)
    if a.dtype != b.dtype or a.dtype.kind not in "iuf":
        raise NotConstant(f"{op} of {a.dtype} and {b.dtype}")
    if op == "Div":
        if a.dtype.kind in "iu":
            return np.asarray(np.frompyfunc(_int_div, 2, 1)(a, b).astype(a.dtype))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.asarray(np.divide(a, b), dtype=a.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(_BINARY[op](a, b), dtype=a.dtype)


def ev_max_min(node: NodeProto, ins: list, opset: int):
    """Variadic: every input counts (broadcasting from opset 8, equal shapes before)."""
    arrays = [v for v in ins if v is not None]
    if not arrays:
        raise NotConstant(f"{node.op_type} without inputs")
    _broadcastable(node, arrays, opset, 8)
    if _syms(arrays):
        fn = np.frompyfunc(_sym_max if node.op_type == "Max" else _sym_min, 2, 1)
        out = _as_objects(arrays)[0]
        for v in _as_objects(arrays)[1:]:
            out = fn(out, v)
        return np.asarray(out, dtype=object)
    if len({a.dtype for a in arrays}) > 1 or arrays[0].dtype.kind not in "iuf":
        raise NotConstant(f"{node.op_type} of mixed or non-numeric dtypes")
    fn = np.maximum if node.op_type == "Max" else np.minimum
    out = arrays[0]
    for v in arrays[1:]:
        out = fn(out, v)
    return np.asarray(out, dtype=arrays[0].dtype)


def reshape_target(shape, target, allowzero=0) -> tuple:
    """The output shape ONNX's Reshape gives `shape` for `target` (both: ints or Syms)."""
    out: list = [t if isinstance(t, Sym) else int(t) for t in target]
    ints = [t for t in out if not isinstance(t, Sym)]
    if allowzero and 0 in ints and -1 in ints:
        raise NotAChannelMove("Reshape with allowzero has both 0 and -1")
    if any(t < -1 for t in ints) or ints.count(-1) > 1:
        raise NotAChannelMove("Reshape target has invalid dims")
    for i, t in enumerate(out):
        if not isinstance(t, Sym) and t == 0 and not allowzero:
            if i >= len(shape):
                raise NotAChannelMove("Reshape copies a dim that does not exist")
            out[i] = shape[i]
    total = 1
    for d in shape:
        total = total * d
    known = 1
    for d in out:
        if isinstance(d, Sym) or d != -1:
            known = known * d
    if -1 in ints:
        i = next(i for i, d in enumerate(out) if not isinstance(d, Sym) and d == -1)
        out[i] = _exact(total, known, target, shape)
    elif not _same(known, total):
        raise NotAChannelMove(f"Reshape to {list(target)} does not fit {list(shape)}")
    return tuple(out)


def _exact(total, known, target, shape):
    if isinstance(total, Sym):
        return total.divide(known)
    if isinstance(known, Sym) or known == 0 or total % known:
        raise NotAChannelMove(f"Reshape to {list(target)} does not fit {list(shape)}")
    return total // known


def _same(a, b) -> bool:
    return a == b if isinstance(a, Sym) or isinstance(b, Sym) else int(a) == int(b)


def ev_reshape(node: NodeProto, ins: list, opset: int):
    target = attr(node, "shape") if opset < 5 else ins[1]
    if target is None or (opset >= 5 and (target.dtype == object or target.dtype.kind not in "iu")):
        raise NotConstant("Reshape target is not constant")
    target = list(target) if opset < 5 else target.reshape(-1).tolist()
    try:
        return ins[0].reshape(reshape_target(ins[0].shape, target, attr(node, "allowzero", 0) if opset >= 14 else 0))
    except NotAChannelMove as exc:
        raise NotConstant(str(exc)) from None


def ev_reduce_prod(node: NodeProto, ins: list, opset: int):
    """ReduceProd: axes an attribute before opset 18, then an input; empty or absent axes reduce
    every axis, unless noop_with_empty_axes (opset 18) makes it the identity."""
    axes = _axes(node, ins, opset, 18)
    x = ins[0]
    if not axes:
        if opset >= 18 and attr(node, "noop_with_empty_axes", 0):
            return x
        axes = list(range(x.ndim))
    if any(not -x.ndim <= a < x.ndim for a in axes):
        raise NotConstant("ReduceProd axes out of range")
    keepdims = bool(attr(node, "keepdims", 1))
    axes = tuple(sorted({a % x.ndim for a in axes}))
    if x.dtype == object:
        return np.asarray(np.prod(x, axis=axes, keepdims=keepdims), dtype=object)
    return np.asarray(np.prod(x, axis=axes, keepdims=keepdims), dtype=x.dtype)


def ev_shape(node: NodeProto, ins: list, opset: int):
    """Shape: ins[0] is the input's shape (ints or Syms); start/end from opset 15."""
    shape = list(ins[0])
    start, end = (attr(node, "start", 0), attr(node, "end", None)) if opset >= 15 else (0, None)
    values = shape[start:end]
    return _size_array(values)


def ev_size(node: NodeProto, ins: list, opset: int):
    total = 1
    for d in ins[0]:
        total = total * d
    return _size_array([total]).reshape(())


def _size_array(values) -> np.ndarray:
    if any(isinstance(v, Sym) for v in values):
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    return np.array([int(v) for v in values], dtype=np.int64)
