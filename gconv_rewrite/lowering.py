"""The weight algebra of each form, and the nodes that express it. Pure numpy + onnx.helper.

Index conventions (C_in = G*Cig, C_out = G*Cog):
- grouped Conv weight W[g*Cog + m, i, k...] connects input channel c = g*Cig + i to output g*Cog + m;
- the depthwise emulation's channel j = c*Cog + m carries W[g*Cog + m, i] (channel multiplier Cog);
  summing its channels over i gives the grouped conv's output g*Cog + m.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

from .channelmap import ChannelMap


class NotFusable(Exception):
    """A channel map that no single Conv computes; the message says why."""


# -- grouped -> depthwise emulation --------------------------------------------------------------

def expand_weights(weight: np.ndarray, bias: np.ndarray | None, group: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Depthwise kernels [C_in*Cog, 1, k...] (and bias) whose channel sums over Cig give the grouped conv.

    The bias goes to the first in-group channel (i = 0) only, so that the sum adds it once.
    """
    c_out, cig = weight.shape[:2]
    cog = c_out // group
    kernel = weight.shape[2:]
    w = weight.reshape((group, cog, cig) + kernel).transpose((0, 2, 1) + tuple(range(3, 3 + len(kernel))))
    depthwise = np.ascontiguousarray(w).reshape((group * cig * cog, 1) + kernel)
    dw_bias = None
    if bias is not None:
        dw_bias = np.zeros((group, cig, cog), dtype=bias.dtype)
        dw_bias[:, 0, :] = bias.reshape(group, cog)
        dw_bias = dw_bias.reshape(-1)
    return depthwise, dw_bias


def dense_weights(weight: np.ndarray, group: int) -> np.ndarray:
    """Block-diagonal [C_out, C_in, k...] weight of the dense (group=1) Conv equal to the grouped one."""
    c_out, cig = weight.shape[:2]
    cog = c_out // group
    dense = np.zeros((c_out, cig * group) + weight.shape[2:], dtype=weight.dtype)
    for g in range(group):
        dense[g * cog:(g + 1) * cog, g * cig:(g + 1) * cig] = weight[g * cog:(g + 1) * cog]
    return dense


def split_weights(weight: np.ndarray, bias: np.ndarray | None, group: int):
    """Per-group (weight, bias) of the Split -> G Convs -> Concat form."""
    cog = weight.shape[0] // group
    return [(weight[g * cog:(g + 1) * cog], None if bias is None else bias[g * cog:(g + 1) * cog]) for g in range(group)]


# -- channel map -> one Conv ---------------------------------------------------------------------

@dataclass(frozen=True)
class Grouping:
    """How a channel map is one Conv: groups, plus channel permutations when needed.

    The fused Conv reads input channel `in_perm[p]` at its position p (None: identity) and its
    output q is the map's output channel `out_order[q]` (None: identity).
    """

    group: int
    c_in: int
    c_out: int
    in_perm: np.ndarray | None
    out_order: np.ndarray | None
    max_terms: int  # most depthwise channels summed into one (output, input) kernel

    @property
    def cig(self) -> int:
        return self.c_in // self.group

    @property
    def cog(self) -> int:
        return self.c_out // self.group

    @property
    def is_depthwise(self) -> bool:
        return self.group == self.c_in

    def describe(self) -> str:
        if self.is_depthwise:
            text = f"depthwise Conv (Cout={self.c_out}, multiplier {self.cog})"
            if self.max_terms > 1:
                text += f" with kernels summed {self.max_terms} at a time: NOT a grouped conv"
        else:
            text = f"grouped Conv G={self.group} (Cig={self.cig}, Cog={self.cog})"
        if self.in_perm is not None:
            text += " up to an input-channel permutation"
        if self.out_order is not None:
            text += " up to an output-channel permutation"
        return text


def solve_grouping(cmap: ChannelMap, multiplier: int, c_in: int) -> Grouping:
    """The finest Conv (largest group count) that computes `cmap`; raises NotFusable otherwise."""
    terms = cmap.terms
    c_out = terms.shape[0]
    valid = terms >= 0
    src = np.where(valid, terms // multiplier, -1)
    max_terms = _max_terms_per_kernel(src, valid, c_in)
    rows = np.arange(c_out)[:, None]
    divisors = [g for g in range(gcd(c_in, c_out), 1, -1) if c_in % g == 0 and c_out % g == 0]
    for g in divisors:
        cig, cog = c_in // g, c_out // g
        if np.all(~valid | (src // cig == rows // cog)):
            return Grouping(g, c_in, c_out, None, None, max_terms)
    return _grouping_up_to_permutation(src, valid, c_in, c_out, max_terms)


def _max_terms_per_kernel(src, valid, c_in) -> int:
    if not valid.any():
        return 0
    rows = np.broadcast_to(np.arange(src.shape[0])[:, None], src.shape)[valid]
    keys = rows * c_in + src[valid]
    return int(np.bincount(keys).max())


def _grouping_up_to_permutation(src, valid, c_in, c_out, max_terms) -> Grouping:
    parent = np.arange(c_in)

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for o in range(c_out):
        chans = src[o][valid[o]]
        if len(chans) == 0:
            raise NotFusable(f"output channel {o} sums nothing")
        root = find(chans[0])
        for c in chans[1:]:
            r = find(c)
            if r != root:
                parent[r] = root
    roots = np.array([find(c) for c in range(c_in)])
    out_roots = np.array([roots[src[o][valid[o]][0]] for o in range(c_out)])
    groups = {}
    for c, r in enumerate(roots):
        groups.setdefault(r, [[], []])[0].append(c)
    for o, r in enumerate(out_roots):
        groups[r][1].append(o)
    sizes = {(len(i), len(o)) for i, o in groups.values()}
    if any(len(o) == 0 for _, o in groups.values()):
        unused = next(i for i, o in groups.values() if not o)
        raise NotFusable(f"input channel {unused[0]} reaches no output")
    if len(sizes) != 1:
        raise NotFusable(f"its channel groups have unequal sizes {sorted(sizes)}")
    if len(groups) == 1:
        raise NotFusable("every output sums across all input channels: a dense Conv, not a grouped one")
    ordered = sorted(groups.values(), key=lambda io: min(io[1]))
    in_perm = np.array([c for i, _ in ordered for c in sorted(i)], dtype=np.int64)
    out_order = np.array([o for _, o in ordered for o in sorted(o)], dtype=np.int64)
    identity_in = np.array_equal(in_perm, np.arange(c_in))
    identity_out = np.array_equal(out_order, np.arange(c_out))
    return Grouping(len(groups), c_in, c_out, None if identity_in else in_perm,
                    None if identity_out else out_order, max_terms)


def fuse_weights(grouping: Grouping, cmap: ChannelMap, dw_weight: np.ndarray, dw_bias: np.ndarray | None,
                 multiplier: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Weight [C_out, Cig, k...] (and bias) of the fused Conv, in the fused Conv's channel order.

    Sums run in float64 and are cast once, so a kernel that receives a single depthwise
    kernel is copied bit for bit.
    """
    terms = cmap.terms
    c_out = terms.shape[0]
    cig, cog = grouping.cig, grouping.cog
    pos_in = _inverse(grouping.in_perm, grouping.c_in)
    pos_out = _inverse(grouping.out_order, c_out)
    o_idx, t_idx = np.nonzero(terms >= 0)
    j = terms[o_idx, t_idx]
    q = pos_out[o_idx]
    p = pos_in[j // multiplier] - (q // cog) * cig
    kernel = dw_weight.shape[2:]
    acc = np.zeros((c_out, cig) + kernel, dtype=np.float64)
    np.add.at(acc, (q, p), dw_weight[j, 0].astype(np.float64))
    weight = acc.astype(dw_weight.dtype)
    bias = None
    if dw_bias is not None or cmap.bias is not None:
        total = np.zeros(c_out, dtype=np.float64)
        if dw_bias is not None:
            np.add.at(total, q, dw_bias[j].astype(np.float64))
        if cmap.bias is not None:
            total[pos_out] += cmap.bias
        bias = total.astype(dw_weight.dtype)
    return weight, bias


def _inverse(perm: np.ndarray | None, n: int) -> np.ndarray:
    if perm is None:
        return np.arange(n)
    inv = np.empty(n, dtype=np.int64)
    inv[perm] = np.arange(n)
    return inv


# -- node builders -------------------------------------------------------------------------------

def conv_node(template: NodeProto, inputs: list[str], output: str, group: int, name: str) -> NodeProto:
    """A Conv with the template's spatial attributes (kernel, strides, pads, dilations, auto_pad)."""
    node = helper.make_node("Conv", inputs, [output], name=name)
    for a in template.attribute:
        if a.name != "group":
            node.attribute.append(a)
    node.attribute.append(helper.make_attribute("group", group))
    return node


def tensor(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def int64_tensor(name: str, values) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def reduce_sum_node(data: str, axes: list[int], output: str, name: str, opset: int,
                    axes_name: str) -> tuple[NodeProto, list[TensorProto]]:
    """ReduceSum(keepdims=0) with axes as an attribute before opset 13 and as an input from 13."""
    if opset < 13:
        return helper.make_node("ReduceSum", [data], [output], name=name, axes=axes, keepdims=0), []
    return (helper.make_node("ReduceSum", [data, axes_name], [output], name=name, keepdims=0),
            [int64_tensor(axes_name, axes)])
