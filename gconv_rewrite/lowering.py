"""The weight algebra of each form, and the nodes that express it. Pure numpy + onnx.helper.

`emit` writes one grouped conv in any exact form (the rewriter's edits and the single-conv
probe models that tuning times both come from it: what is measured is what is written).

Index conventions (C_in = G*Cig, C_out = G*Cog):
- grouped Conv weight W[g*Cog + m, i, k...] connects input channel c = g*Cig + i to output g*Cog + m;
- the depthwise emulation's channel j = c*Cog + m carries W[g*Cog + m, i] (channel multiplier Cog);
  summing its channels over i gives the grouped conv's output g*Cog + m.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from math import gcd

import numpy as np
import onnx
from onnx import NodeProto, TensorProto, helper, numpy_helper

from .channelmap import ChannelMap
from .geometry import FORMS, Probe
from .graph import NameGen


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
    return [(weight[g * cog:(g + 1) * cog], None if bias is None else bias[g * cog:(g + 1) * cog])
            for g in range(group)]


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
    valid = terms >= 0
    rows = np.broadcast_to(np.arange(terms.shape[0])[:, None], terms.shape)[valid]
    return solve_pairs(rows, terms[valid] // multiplier, terms.shape[0], c_in)


def solve_pairs(out: np.ndarray, inp: np.ndarray, c_out: int, c_in: int) -> Grouping:
    """A grouped Conv whose connections include every (output, input) channel pair given (pairs may
    repeat: a kernel that sums several): the most groups that need no channel permutation, else the
    finest grouping up to permutations (a permutation costs a Gather where it cannot be folded);
    NotFusable when there is none.

    One solver for every form a model arrives in: the pairs come from an emulation's channel map,
    from a block-diagonal weight's nonzero blocks, or from the slices a split form's convs read.
    """
    out = np.asarray(out, dtype=np.int64)
    inp = np.asarray(inp, dtype=np.int64)
    max_terms = _most_repeated(out * c_in + inp)
    for g in (g for g in range(gcd(c_in, c_out), 1, -1) if c_in % g == 0 and c_out % g == 0):
        if np.array_equal(inp // (c_in // g), out // (c_out // g)):
            return Grouping(g, c_in, c_out, None, None, max_terms)
    return _grouping_up_to_permutation(out, inp, c_in, c_out, max_terms)


def _most_repeated(keys: np.ndarray) -> int:
    """How often the most frequent key occurs (0 for none), without a table as large as the key range."""
    if not keys.size:
        return 0
    keys = np.sort(keys)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1], True])
    return int(np.diff(starts).max())


def _components(out: np.ndarray, inp: np.ndarray, c_in: int, c_out: int) -> np.ndarray:
    """Connected component (its smallest input channel) of every input channel, in the bipartite graph
    of the pairs: labels spread along pairs and are shortcut by pointer jumping, all vectorised."""
    label = np.arange(c_in)
    while True:
        reach = np.full(c_out, c_in, dtype=np.int64)
        np.minimum.at(reach, out, label[inp])
        new = label.copy()
        np.minimum.at(new, inp, reach[out])
        while True:  # jump: a label's own label is smaller or equal
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            return label
        label = new


def _grouping_up_to_permutation(out, inp, c_in, c_out, max_terms) -> Grouping:
    read = np.zeros(c_out, dtype=bool)
    read[out] = True
    if not read.all():
        raise NotFusable(f"output channel {int(np.argmin(read))} sums nothing")
    roots = _components(out, inp, c_in, c_out)
    out_roots = np.full(c_out, -1, dtype=np.int64)
    out_roots[out] = roots[inp]
    used = np.zeros(c_in, dtype=bool)
    used[inp] = True
    if not used.all():
        raise NotFusable(f"input channel {int(np.argmin(used))} reaches no output")
    in_ids, in_sizes = np.unique(roots, return_counts=True)
    out_sizes = np.bincount(out_roots, minlength=c_in)[in_ids]
    sizes = set(zip(in_sizes.tolist(), out_sizes.tolist()))
    if len(sizes) != 1:
        raise NotFusable(f"its channel groups have unequal sizes {sorted(sizes)}")
    if len(in_ids) == 1:
        raise NotFusable("every output sums across all input channels: a dense Conv, not a grouped one")
    first_out = np.full(c_in, c_out, dtype=np.int64)
    np.minimum.at(first_out, out_roots, np.arange(c_out))
    rank = np.empty(c_in, dtype=np.int64)  # groups ordered by their first output channel
    order = np.argsort(first_out[in_ids], kind="stable")
    rank[in_ids[order]] = np.arange(len(in_ids))
    in_perm = np.lexsort((np.arange(c_in), rank[roots])).astype(np.int64)
    out_order = np.lexsort((np.arange(c_out), rank[out_roots])).astype(np.int64)
    identity_in = np.array_equal(in_perm, np.arange(c_in))
    identity_out = np.array_equal(out_order, np.arange(c_out))
    return Grouping(len(in_ids), c_in, c_out, None if identity_in else in_perm,
                    None if identity_out else out_order, max_terms)


def fuse_weights(grouping: Grouping, cmap: ChannelMap, dw_weight: np.ndarray, dw_bias: np.ndarray | None,
                 multiplier: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Weight [C_out, Cig, k...] (and bias) of the Conv an emulation's channel map fuses to, in the
    fused Conv's channel order."""
    terms = cmap.terms
    o_idx, t_idx = np.nonzero(terms >= 0)
    j = terms[o_idx, t_idx]
    bias = None
    if dw_bias is not None or cmap.bias is not None:
        bias = Bias(o_idx, dw_bias[j] if dw_bias is not None else None, cmap.bias)
    return place_kernels(grouping, o_idx, j // multiplier, dw_weight[:, 0], j, bias, dw_weight.dtype)


@dataclass(frozen=True)
class Bias:
    """A fused Conv's bias: `values[i]` added to output `out[i]` (None: none), plus `extra` per output."""

    out: np.ndarray
    values: np.ndarray | None
    extra: np.ndarray | None = None


def place_kernels(grouping: Grouping, out: np.ndarray, inp: np.ndarray, kernels: np.ndarray, which: np.ndarray,
                  bias: Bias | None, dtype) -> tuple[np.ndarray, np.ndarray | None]:
    """Weight [C_out, Cig, k...] (and bias) of the grouped Conv that connects output `out[i]` to input
    `inp[i]` with kernel `kernels[which[i]]`, in the grouped Conv's channel order.

    Sums run in float64 and are cast once, so a kernel that lands alone is copied bit for bit.
    """
    c_out = grouping.c_out
    cig, cog = grouping.cig, grouping.cog
    pos_in = _inverse(grouping.in_perm, grouping.c_in)
    pos_out = _inverse(grouping.out_order, c_out)
    q = pos_out[out]
    p = pos_in[inp] - (q // cog) * cig
    acc = np.zeros((c_out, cig) + kernels.shape[1:], dtype=np.float64)
    np.add.at(acc, (q, p), kernels[which].astype(np.float64))
    with np.errstate(over="ignore"):  # an overflow is refused by the caller (`overflows`), not warned about
        weight = acc.astype(dtype)
    if bias is None:
        return weight, None
    total = np.zeros(c_out, dtype=np.float64)
    if bias.values is not None:
        np.add.at(total, pos_out[bias.out], np.asarray(bias.values, dtype=np.float64))
    if bias.extra is not None:
        total[pos_out] += bias.extra
    with np.errstate(over="ignore"):
        return weight, total.astype(dtype)


def overflows(weight: np.ndarray, bias: np.ndarray | None) -> bool:
    """A fused weight or bias that is not finite (float16: a product or sum of finite kernels beyond
    65504): the fused Conv would not compute what the region does."""
    return not np.isfinite(weight).all() or (bias is not None and not np.isfinite(bias).all())


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


# -- the forms -----------------------------------------------------------------------------------

def emit(form: str, opset: int, out_shape, x: str, weight: np.ndarray, bias: np.ndarray | None, group: int,
         template: NodeProto, out: str, base: str, names: NameGen) -> tuple[list[NodeProto], list]:
    """Nodes and initializers computing the grouped Conv (weight, bias, group, template's attributes)
    of `x` into `out`, in the given form. `out_shape`: `out`'s shape where known (the dw form's
    Reshapes are constants when its spatial dims are static, else read at run time); `opset`: the
    graph's default opset (Split and ReduceSum take their sizes as inputs from 13)."""
    def const(suffix, array):
        name = names(f"{base}.{suffix}")
        inits.append(tensor(name, array))
        return name

    inits: list = []
    node_name = template.name or names(f"{base}/conv")
    if form == "native":
        inputs = [x, const("weight", weight)] + ([const("bias", bias)] if bias is not None else [])
        return [conv_node(template, inputs, out, group, node_name)], inits
    if form == "dense":
        inputs = [x, const("dense_weight", dense_weights(weight, group))] + (
            [const("bias", bias)] if bias is not None else [])
        return [conv_node(template, inputs, out, 1, node_name)], inits
    if form == "split":
        cig = weight.shape[1]
        parts = [names(f"{base}.in{g}") for g in range(group)]
        outs = [names(f"{base}.out{g}") for g in range(group)]
        if opset >= 13:
            sizes = names(f"{base}.split_sizes")
            inits.append(int64_tensor(sizes, [cig] * group))
            new = [helper.make_node("Split", [x, sizes], parts, name=names(f"{base}/split"), axis=1)]
        else:
            new = [helper.make_node("Split", [x], parts, name=names(f"{base}/split"), axis=1, split=[cig] * group)]
        for g, (w, b) in enumerate(split_weights(weight, bias, group)):
            inputs = [parts[g], const(f"weight{g}", w)] + ([const(f"bias{g}", b)] if b is not None else [])
            new.append(conv_node(template, inputs, outs[g], 1, names(f"{node_name}/group{g}")))
        new.append(helper.make_node("Concat", outs, [out], name=names(f"{base}/concat"), axis=1))
        return new, inits
    return _emit_dw(opset, out_shape, x, weight, bias, group, template, out, base, names, node_name, inits)


def _emit_dw(opset, out_shape, x, weight, bias, group, template, out, base, names, node_name, inits):
    """Depthwise Conv (multiplier Cog) + Reshape [N,G,Cig,Cog,spatial] + ReduceSum + Reshape [N,Cout,spatial]."""
    c_out, cig = weight.shape[:2]
    g, cog, rank = group, c_out // group, weight.ndim - 2
    depthwise, dw_bias = expand_weights(weight, bias, g)
    w_name = names(f"{base}.dw_weight")
    inits.append(tensor(w_name, depthwise))
    inputs = [x, w_name]
    if dw_bias is not None:
        b_name = names(f"{base}.dw_bias")
        inits.append(tensor(b_name, dw_bias))
        inputs.append(b_name)
    dw_out = names(f"{base}.dw_out")
    new = [conv_node(template, inputs, dw_out, g * cig, node_name)]
    spatial = list(out_shape[2:]) if out_shape is not None and len(out_shape) == rank + 2 else None
    head5, head_out = [0, g, cig, cog], [0, c_out]
    shape_a, shape_b = names(f"{base}.grouped_shape"), names(f"{base}.out_shape")
    if spatial is not None and all(isinstance(d, int) and d > 0 for d in spatial):
        inits += [int64_tensor(shape_a, head5 + spatial), int64_tensor(shape_b, head_out + spatial)]
    else:  # dynamic spatial dims: read them from the depthwise output at run time
        dims, sp = names(f"{base}.dw_shape"), names(f"{base}.spatial")
        idx, h5, ho = names(f"{base}.spatial_axes"), names(f"{base}.head_grouped"), names(f"{base}.head_out")
        inits += [int64_tensor(idx, list(range(2, 2 + rank))), int64_tensor(h5, head5), int64_tensor(ho, head_out)]
        new += [helper.make_node("Shape", [dw_out], [dims], name=names(f"{base}/shape")),
                helper.make_node("Gather", [dims, idx], [sp], name=names(f"{base}/spatial"), axis=0),
                helper.make_node("Concat", [h5, sp], [shape_a], name=names(f"{base}/grouped_shape"), axis=0),
                helper.make_node("Concat", [ho, sp], [shape_b], name=names(f"{base}/out_shape"), axis=0)]
    grouped, summed = names(f"{base}.grouped"), names(f"{base}.summed")
    reduce, reduce_inits = reduce_sum_node(grouped, [2], summed, names(f"{base}/reduce_sum"), opset,
                                           names(f"{base}.reduce_axes"))
    inits += reduce_inits
    new += [helper.make_node("Reshape", [dw_out, shape_a], [grouped], name=names(f"{base}/reshape_grouped")),
            reduce,
            helper.make_node("Reshape", [summed, shape_b], [out], name=names(f"{base}/reshape_out"))]
    return new, inits


# -- single-conv probe models ----------------------------------------------------------------------

def probe_model(probe: Probe, seed: int = 0) -> onnx.ModelProto:
    """The single-node native model of `probe` (float weights with a bias): input x -> Conv -> output y."""
    rng = np.random.default_rng(seed)
    np_dtype = np.dtype(probe.dtype)
    elem = helper.np_dtype_to_tensor_dtype(np_dtype)
    fan_in = probe.cig * math.prod(probe.kernel)
    w = (rng.standard_normal((probe.c_out, probe.cig) + probe.kernel) / math.sqrt(fan_in)).astype(np_dtype)
    b = rng.standard_normal(probe.c_out).astype(np_dtype)
    attrs = dict(group=probe.group, kernel_shape=list(probe.kernel), strides=list(probe.strides),
                 dilations=list(probe.dilations))
    if probe.pads is not None:
        attrs["pads"] = list(probe.pads)
    else:
        attrs["auto_pad"] = probe.auto_pad
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)
    x = helper.make_tensor_value_info("x", elem, [probe.batch, probe.c_in, *probe.spatial])
    y = helper.make_tensor_value_info("y", elem, [probe.batch, probe.c_out, *probe.output_spatial()])
    graph = helper.make_graph([node], "probe", [x], [y],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def form_models(probe: Probe) -> dict[str, onnx.ModelProto]:
    """The probe in every exact form it has, each written by `emit`, as the rewriter writes it.

    Only a grouped conv (1 < G < C_in, C_out a multiple of G) with float weights has other forms
    than native: the same convs the rewriter rewrites."""
    native = probe_model(probe)
    models = {"native": native}
    if not (probe.is_grouped and probe.c_out % probe.group == 0 and np.dtype(probe.dtype).kind == "f"):
        return models
    conv = native.graph.node[0]
    weight, bias = (numpy_helper.to_array(t) for t in native.graph.initializer)
    out_shape = (probe.batch, probe.c_out) + probe.output_spatial()
    for form in FORMS[1:]:
        nodes, inits = emit(form, 17, out_shape, "x", weight, bias, probe.group, conv, "y", "conv", NameGen(native))
        model = onnx.ModelProto()
        model.CopyFrom(native)
        del model.graph.node[:], model.graph.initializer[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(inits)
        models[form] = model
    return models
