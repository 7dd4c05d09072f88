"""Fuzzing the written forms of grouped convolutions: random valid models of a grouped Conv written with other
ops, whose rewrite to one Conv (`rewrite(model, form="native", verify_result=False)`) must compute what the
original does in onnxruntime (CPU), at two sizes where the model has symbolic dims.

- split: channel slices (Split / Slice with any bounds and steps / Gather, in any channel order, of an NCHW or a
  transposed NHWC tensor) -> G Convs (maybe grouped themselves) -> Concat (in any order, NCHW or NHWC, maybe with
  a repeated input or the output of another Conv) -> maybe an Add, a channel shuffle or a Transpose after it;
- dense: a Conv with block-diagonal weights (or a grouped Conv whose groups split further), channels permuted,
  some kernels zero (and some cases not block-diagonal at all);
- mixed: a depthwise Conv, maybe a channel shuffle, then a 1x1 Conv whose weights keep to groups (or not).

1-D, 2-D and 3-D convs, opsets 11, 13 and 17, float32 and float16. Every third case also runs the round trips
(dw, split, dense forms and back).

    python benchmarks/fuzz_composites.py [--cases 500] [--seed 1] [--keep DIR]

Prints the number of cases per kind, their outcomes (what form="native" did: fused, kept, refused with its code),
and every failure: an output off by more than 1e-5 (float32) or 1e-2 (float16) of the largest reference value, a
written model onnx.checker rejects, or an exception other than the tool's GconvError. Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper
from onnx import helper as H

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import gconv_rewrite as gr  # noqa: E402

ort.set_default_logger_severity(3)
IMAX = 2**63 - 1
SIZES = ({"N": 2, "S0": 7, "S1": 6, "S2": 5}, {"N": 1, "S0": 9, "S1": 8, "S2": 7})  # symbolic dims' values
CHAINS = [("native",), ("dw", "native"), ("split", "native"), ("dense", "native"), ("split", "dense"), ("dw", "split")]


def pick(r, *options):
    return options[int(r.integers(len(options)))]


def i64(*values):
    return np.array(values, dtype=np.int64)


def build(nodes, inits, x_shape, opset, half):
    """The model x -> nodes -> y, float16 if `half` (initializers and Constants cast); y's shape inferred."""
    elem, dtype = (TensorProto.FLOAT16, np.float16) if half else (TensorProto.FLOAT, np.float32)
    for node in nodes:
        if node.op_type == "Constant" and half:
            t = node.attribute[0].t
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name))
    tensors = [numpy_helper.from_array(v.astype(dtype) if v.dtype == np.float32 else v, k) for k, v in inits.items()]
    graph = H.make_graph(nodes, "g", [H.make_tensor_value_info("x", elem, x_shape)],
                         [H.make_tensor_value_info("y", elem, None)], tensors)
    model = H.make_model(graph, opset_imports=[H.make_opsetid("", opset)], ir_version=8)
    inferred = onnx.shape_inference.infer_shapes(model).graph.output[0]
    if inferred.type.tensor_type.HasField("shape"):
        model.graph.output[0].CopyFrom(inferred)
    else:  # a Reshape to a computed shape: y's rank, from a run
        ndim = run(model, feeds(model, SIZES[0], np.random.default_rng(0)))["y"].ndim
        model.graph.output[0].type.CopyFrom(H.make_tensor_type_proto(elem, [None] * ndim))
    return model


def gen_split(r):
    G, cig, cog, k = pick(r, 2, 3, 4), pick(r, 1, 2, 3), pick(r, 1, 2, 4), pick(r, 1, 3)
    C, spatial, opset = G * cig, pick(r, 1, 2, 2, 2, 3), pick(r, 11, 13, 17)
    rank = spatial + 2
    hw = [int(r.integers(5, 8 if spatial < 3 else 7)) for _ in range(spatial)]  # >= a dilated 3x3 kernel
    sym, nhwc_in = r.random() < 0.3, r.random() < 0.2
    to_last, to_first = [0, *range(2, rank), 1], [0, rank - 1, *range(1, rank - 1)]
    inits, nodes, x = {}, [], "x"
    if nhwc_in:
        x_shape = ["N" if sym else 2, *hw, C]
        nodes.append(H.make_node("Transpose", ["x"], ["xn"], perm=to_first))
        x = "xn"
    else:
        x_shape = ["N", C, *(f"S{i}" for i in range(spatial))] if sym else [2, C, *hw]
    order = pick(r, "contig", "perm", "interleave")  # the channels of each group
    pi = {"contig": np.arange(C), "perm": r.permutation(C),
          "interleave": np.arange(C).reshape(cig, G).T.reshape(-1)}[order]  # group g: channels g, g + G, ...
    cax = pick(r, 1, 1 - rank)
    parts = [f"p{g}" for g in range(G)]
    if order == "contig" and r.random() < 0.5:
        if opset >= 13:
            inits["sz"] = i64(*[cig] * G)
            nodes.append(H.make_node("Split", [x, "sz"], parts, axis=cax))
        else:
            nodes.append(H.make_node("Split", [x], parts, axis=cax, split=[cig] * G))
    else:
        for g in range(G):
            sel = pi[g * cig:(g + 1) * cig]
            step = int(sel[1] - sel[0]) if len(sel) > 1 else 1
            if len(set(np.diff(sel))) <= 1 and step != 0 and r.random() < 0.6:  # a Slice, bounds written many ways
                start, end = int(sel[0]), int(sel[-1]) + (1 if step > 0 else -1)
                if step > 0 and end == C and r.random() < 0.5:
                    end = pick(r, IMAX, 2**31 - 1, C + 5)
                if step < 0 and end == -1:
                    end = -IMAX - 1
                elif r.random() < 0.3 and 0 <= end < C:
                    end -= C
                if r.random() < 0.3:
                    start -= C
                inits.update({f"st{g}": i64(start), f"en{g}": i64(end), f"ax{g}": i64(cax), f"sp{g}": i64(step)})
                nodes.append(H.make_node("Slice", [x, f"st{g}", f"en{g}", f"ax{g}", f"sp{g}"], [parts[g]]))
            else:
                inits[f"ix{g}"] = (sel - C if r.random() < 0.3 else sel).astype(np.int64)
                nodes.append(H.make_node("Gather", [x, f"ix{g}"], [parts[g]], axis=cax))
    pg = pick(r, 1, 1, 2) if cig % 2 == 0 and cog % 2 == 0 else 1  # the Convs' own group
    dil = [pick(r, 1, 2) for _ in range(spatial)] if k > 1 else [1] * spatial
    kw = {"strides": [pick(r, 1, 2) for _ in range(spatial)], "dilations": dil, "kernel_shape": [k] * spatial}
    if r.random() < 0.2 and max(dil) == 1:
        kw["auto_pad"] = pick(r, "SAME_UPPER", "SAME_LOWER", "VALID")
    else:
        kw["pads"] = [int(r.integers(0, 2)) for _ in range(2 * spatial)]
    const_w, outs = r.random() < 0.2, []
    for i, g in enumerate(r.permutation(G)):
        wv = r.standard_normal((cog, cig // pg) + (k,) * spatial).astype(np.float32)
        if const_w:
            nodes.append(H.make_node("Constant", [], [f"w{i}"], value=numpy_helper.from_array(wv, f"w{i}v")))
        else:
            inits[f"w{i}"] = wv
        ins = [parts[g], f"w{i}"]
        if r.random() < 0.6:
            inits[f"b{i}"] = r.standard_normal(cog).astype(np.float32)
            ins.append(f"b{i}")
        nodes.append(H.make_node("Conv", ins, [f"c{i}"], name=f"conv{i}", group=pg, **kw))
        outs.append(f"c{i}")
    join_nhwc, extra = r.random() < 0.2, False
    cat_in = [str(o) for o in r.permutation(outs)]
    if join_nhwc:
        nodes += [H.make_node("Transpose", [o], [o + "t"], perm=to_last) for o in cat_in]
        cat_in, cat_axis = [o + "t" for o in cat_in], pick(r, rank - 1, -1)
    else:
        cat_axis = pick(r, 1, 1 - rank)
        if r.random() < 0.15:
            cat_in.append(cat_in[0])  # a repeated input
        if r.random() < 0.2:  # another Conv of x (then Relu or a Mul) joined first or last
            extra, pos = True, int(r.integers(0, 2)) * len(cat_in)
            cat_in.insert(pos, "z")
            inits["wz"] = r.standard_normal((2, C) + (k,) * spatial).astype(np.float32)
            nodes.append(H.make_node("Conv", [x, "wz"], ["zc"], name="convz", **kw))
            if r.random() < 0.5:
                nodes.append(H.make_node("Relu", ["zc"], ["z"]))
            else:
                inits["wz1"] = r.standard_normal((1, 2) + (1,) * spatial).astype(np.float32)
                nodes.append(H.make_node("Mul", ["zc", "wz1"], ["z"]))
    nodes.append(H.make_node("Concat", cat_in, ["j"], axis=cat_axis))
    post, last, total = pick(r, "none", "add", "shuffle", "transpose", "none"), "j", len(cat_in) * cog
    if post == "add" and not join_nhwc and not extra:
        inits["kadd"] = r.standard_normal((total,) + (1,) * spatial).astype(np.float32)
        nodes.append(H.make_node("Add", ["j", "kadd"], ["ja"]))
        last = "ja"
    elif post == "shuffle" and not join_nhwc and not extra and spatial == 2 and total % 2 == 0:
        inits["r1"] = i64(0, 2, total // 2, -1, 1)
        nodes += [H.make_node("Reshape", ["j", "r1"], ["js1"]), H.make_node("Shape", ["j"], ["jshape"]),
                  H.make_node("Transpose", ["js1"], ["js2"], perm=[0, 2, 1, 3, 4]),
                  H.make_node("Reshape", ["js2", "jshape"], ["js3"])]
        last = "js3"
    elif post == "transpose" and not join_nhwc:
        nodes.append(H.make_node("Transpose", ["j"], ["jt"], perm=to_last))
        last = "jt"
    nodes.append(H.make_node("Identity", [last], ["y"]))
    return nodes, inits, x_shape, opset


def gen_dense(r):
    G, cig, cog, k = pick(r, 2, 3, 4), pick(r, 1, 2, 3), pick(r, 1, 2, 3), pick(r, 1, 3)
    spatial, opset = pick(r, 1, 2, 2, 3), pick(r, 11, 13, 17)
    wg = pick(r, 1, 1, 2) if G % 2 == 0 else 1  # the group the Conv is written with
    C_in, C_out, ks = G * cig, G * cog, (k,) * spatial
    full = np.zeros((C_out, C_in) + ks, np.float32)
    for g in range(G):
        full[g * cog:(g + 1) * cog, g * cig:(g + 1) * cig] = r.standard_normal((cog, cig) + ks)
    for zero in ((int(r.integers(C_out)),), (slice(None), int(r.integers(C_in))),
                 (int(r.integers(C_out)), int(r.integers(C_in)))):  # an output row, an input column, a kernel
        if r.random() < 0.3:
            full[zero] = 0
    if r.random() < 0.1:
        full[(int(r.integers(C_out)), int(r.integers(C_in))) + (0,) * spatial] = 1.5  # maybe across groups
    gi, go = C_in // wg, C_out // wg  # permuted within the written groups
    pin = np.concatenate([r.permutation(gi) + j * gi for j in range(wg)]) if r.random() < 0.5 else np.arange(C_in)
    pout = np.concatenate([r.permutation(go) + j * go for j in range(wg)]) if r.random() < 0.5 else np.arange(C_out)
    fp = full[pout][:, pin]
    inits = {"w": np.concatenate([fp[j * go:(j + 1) * go, j * gi:(j + 1) * gi] for j in range(wg)])}
    ins, nodes = ["xp", "w"], []
    if r.random() < 0.5:
        inits["b"] = r.standard_normal(C_out).astype(np.float32)
        ins.append("b")
    hw = [6 if spatial < 3 else 4] * spatial
    if r.random() < 0.5:  # produced by a plain Conv, then Relu or a per-channel Mul
        inits["w0"] = r.standard_normal((C_in, 3) + (1,) * spatial).astype(np.float32)
        nodes.append(H.make_node("Conv", ["x", "w0"], ["p"]))
        if r.random() < 0.5:
            nodes.append(H.make_node("Relu", ["p"], ["xp"]))
        else:
            inits["kk"] = r.standard_normal((C_in,) + (1,) * spatial).astype(np.float32)
            nodes.append(H.make_node("Mul", ["p", "kk"], ["xp"]))
        x_shape = [2, 3, *hw]
    else:
        nodes.append(H.make_node("Identity", ["x"], ["xp"]))
        x_shape = [2, C_in, *hw]
    if r.random() < 0.3:
        x_shape[0] = "N"
    nodes.append(H.make_node("Conv", ins, ["y"], group=wg, pads=[k // 2] * 2 * spatial))
    return nodes, inits, x_shape, opset


def gen_mixed(r):
    C, M, spatial, opset = pick(r, 4, 6, 8), pick(r, 1, 2), pick(r, 1, 2, 2, 3), pick(r, 11, 13, 17)
    mid = C * M
    G = pick(r, *[g for g in (2, 3, 4) if mid % g == 0])
    opg = pick(r, 1, 2, 3)
    cout = G * opg
    mx = np.zeros((cout, mid), np.float32)
    part = r.permutation(mid).reshape(G, mid // G)  # the mixer's rows keep to groups of a random partition
    for g in range(G):
        for o in range(g * opg, (g + 1) * opg):
            cols = part[g][r.random(mid // G) < 0.7]
            mx[o, cols] = r.standard_normal(len(cols))
    if r.random() < 0.2:
        mx[0, part[-1][0]] = 0.5  # across groups
    ones = (1,) * spatial
    inits = {"dw": r.standard_normal((mid, 1) + (3,) * spatial).astype(np.float32),
             "mx": mx.reshape((cout, mid) + ones)}
    dw_in, mx_in = ["x", "dw"], ["m", "mx"]
    if r.random() < 0.5:
        inits["dwb"] = r.standard_normal(mid).astype(np.float32)
        dw_in.append("dwb")
    if r.random() < 0.5:
        inits["mb"] = r.standard_normal(cout).astype(np.float32)
        mx_in.append("mb")
    nodes = [H.make_node("Conv", dw_in, ["d"], group=C, pads=[1] * 2 * spatial, strides=[pick(r, 1, 2)] * spatial)]
    between = pick(r, "none", "transposes", "shuffle")
    if between == "none":
        nodes.append(H.make_node("Identity", ["d"], ["m"]))
    elif between == "transposes":
        nodes += [H.make_node("Transpose", ["d"], ["dt"], perm=[0, *range(2, spatial + 2), 1]),
                  H.make_node("Transpose", ["dt"], ["m"], perm=[0, spatial + 1, *range(1, spatial + 1)])]
    else:
        inits["r1"] = i64(0, 2, mid // 2, -1)
        nodes += [H.make_node("Shape", ["d"], ["dsh"]), H.make_node("Reshape", ["d", "r1"], ["d1"]),
                  H.make_node("Transpose", ["d1"], ["d2"], perm=[0, 2, 1, 3]),
                  H.make_node("Reshape", ["d2", "dsh"], ["m"])]
    nodes.append(H.make_node("Conv", mx_in, ["y"]))
    return nodes, inits, ["N" if r.random() < 0.3 else 2, C, *[7 if spatial < 3 else 5] * spatial], opset


GENERATORS = {"split": gen_split, "dense": gen_dense, "mixed": gen_mixed}
WEIGHTS = [0.5, 0.25, 0.25]


def feeds(model, sizes, rng):
    x = model.graph.input[0]
    shape = [d.dim_value if d.HasField("dim_value") else sizes[d.dim_param] for d in x.type.tensor_type.shape.dim]
    return {x.name: rng.standard_normal(shape).astype(H.tensor_dtype_to_np_dtype(x.type.tensor_type.elem_type))}


def run(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def rel_err(got, ref):
    """The largest difference relative to the largest reference value; inf on another shape or non-finite values."""
    a, b = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    fa, fb = np.isfinite(a), np.isfinite(b)
    if a.shape != b.shape or not np.array_equal(fa, fb) or not np.array_equal(a[~fa], b[~fb]):
        return float("inf")
    if not fb.any():
        return 0.0
    return float(np.max(np.abs(a[fa] - b[fb])) / max(np.max(np.abs(b[fb])), 1e-30))


def outcome_of(result):
    labels = {f"refused {d.code}" if d.action == "skipped" else d.action for d in result.decisions}
    return " + ".join(sorted(labels)) or "nothing found"


def check(model, refs, tol, chains):
    """form="native"'s outcome, and the failures of each chain of rewrites."""
    outcome, failures = None, []
    for chain in chains:
        label, cur, stage = "->".join(chain), model, ""
        try:
            for form in chain:
                stage = f"rewrite(form={form!r})"
                result = gr.rewrite(cur, form=form, verify_result=False)
                if chain == ("native",):
                    outcome = outcome_of(result)
                cur = result.model
                stage = f"onnx.checker on form={form!r}'s model"
                onnx.checker.check_model(cur, full_check=True)
            stage = "onnxruntime on the rewritten model"
            for feed, ref in refs:
                got = run(cur, feed)
                err = max(rel_err(got.get(k), v) for k, v in ref.items()) if set(got) == set(ref) else float("inf")
                if not err <= tol:
                    failures.append(f"[{label}] WRONG OUTPUT: relative error {err:.3g} (tolerance {tol:g}) "
                                    f"at x{list(feed['x'].shape)}")
                    break
        except gr.GconvError as exc:
            if chain == ("native",):
                outcome = f"GconvError: {str(exc)[:80]}"
        except Exception:  # noqa: BLE001 - any other exception, whoever raised it, is a failure to report
            failures.append(f"[{label}] {stage}: {traceback.format_exc(limit=4)}")
    return outcome or "no outcome (failed)", failures


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", type=int, default=500)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", help="folder to keep the generated models that failed")
    args = p.parse_args()
    kinds, outcomes, failures, halves = Counter(), defaultdict(Counter), [], 0
    start = time.monotonic()
    for i in range(args.cases):
        r = np.random.default_rng([args.seed, i])
        kind = str(r.choice(list(GENERATORS), p=WEIGHTS))
        half = r.random() < 0.15
        name = f"{kind}{' float16' if half else ''} case {i} (seed {args.seed})"
        kinds[kind] += 1
        halves += half
        try:
            model = build(*GENERATORS[kind](r), half=half)
            onnx.checker.check_model(model, full_check=True)
            symbolic = any(d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim)
            refs = [(feed, run(model, feed)) for feed in (feeds(model, s, r) for s in SIZES[:1 + symbolic])]
        except Exception as exc:  # noqa: BLE001 - a generated model onnx or onnxruntime rejects: counted, not checked
            outcomes[kind][f"invalid generated model ({type(exc).__name__})"] += 1
            continue
        outcome, problems = check(model, refs, 1e-2 if half else 1e-5, CHAINS if i % 3 == 0 else CHAINS[:1])
        outcomes[kind][outcome] += 1
        if problems:
            failures += [f"{name}: {problem}" for problem in problems]
            if args.keep:
                Path(args.keep).mkdir(parents=True, exist_ok=True)
                onnx.save(model, Path(args.keep) / f"{kind}_{args.seed}_{i}.onnx")
    print(f"{args.cases} cases (seed {args.seed}) in {time.monotonic() - start:.0f} s: "
          + ", ".join(f"{kinds[k]} {k}" for k in GENERATORS) + f"; {halves} of them float16")
    for kind in GENERATORS:
        print(f"  {kind}:")
        for outcome, n in outcomes[kind].most_common():
            print(f"    {n:5d}  {outcome}")
    print(f"{len(failures)} failures")
    for f in failures:
        print("FAILURE:", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
