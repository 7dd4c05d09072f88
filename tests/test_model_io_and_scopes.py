"""Loading and saving (external data, unsafe locations, atomic writes), preservation of
everything outside the rewritten regions, and convs inside subgraphs and functions."""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import gconv_rewrite as gr
from gconv_rewrite import model_io
from gconv_rewrite.errors import GconvError

from helpers import MODELS, op_counts, run_ort

C, G, H = 8, 4, 6


def conv_weight(seed, c_out=C, cig=C // G):
    return np.random.default_rng(seed).standard_normal((c_out, cig, 3, 3)).astype(np.float32)


def if_model():
    """A grouped Conv inside each branch of an If, weights from the outer scope."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, H, H])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, H, H])

    def branch(name, w):
        out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, C, H, H])
        return helper.make_graph([helper.make_node("Conv", ["x", w], [f"{name}_y"], name=f"{name}_conv", group=G,
                                                   pads=[1, 1, 1, 1])], name, [], [out])

    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then", "w1"),
                            else_branch=branch("else", "w2"))
    graph = helper.make_graph([node], "g", [x, cond], [y], [numpy_helper.from_array(conv_weight(1), "w1"),
                                                             numpy_helper.from_array(conv_weight(2), "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_grouped_convs_inside_if_branches_are_rewritten_both_ways():
    model = if_model()
    expanded = gr.rewrite(model, "expand", verify_result=False)
    assert sorted((d.action, d.graph) for d in expanded.decisions) == [
        ("expanded", "main/if/else"), ("expanded", "main/if/then")]
    onnx.checker.check_model(expanded.model, full_check=True)
    x = np.random.default_rng(0).standard_normal((1, C, H, H)).astype(np.float32)
    for cond in (True, False):
        feed = {"x": x, "cond": np.array(cond)}
        np.testing.assert_allclose(run_ort(expanded.model, feed)["y"], run_ort(model, feed)["y"], rtol=1e-5, atol=1e-5)
    back = gr.rewrite(expanded.model, "fuse", verify_result=False)
    assert [d.action for d in back.decisions] == ["fused", "fused"]
    for branch in back.model.graph.node[0].attribute:
        assert [n.op_type for n in branch.g.node] == ["Conv"]
    weights = sorted(numpy_helper.to_array(t).tobytes() for a in back.model.graph.node[0].attribute
                     for t in a.g.initializer)
    assert weights == sorted(numpy_helper.to_array(t).tobytes() for t in model.graph.initializer)  # bit for bit


def test_grouped_conv_in_a_function_is_reported_not_rewritten():
    fn = helper.make_function("local", "f", ["x", "w"], ["y"],
                              [helper.make_node("Conv", ["x", "w"], ["y"], group=G)],
                              [helper.make_opsetid("", 17)])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, H, H])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("f", ["x", "w"], ["y"], domain="local")], "g", [x], [y],
                              [numpy_helper.from_array(conv_weight(1), "w")])
    model = helper.make_model(graph, functions=[fn], ir_version=8,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    result = gr.rewrite(model, "expand", verify_result=False)
    assert [d.action for d in result.decisions] == ["skipped"]
    assert result.decisions[0].code == "in_function"


def test_everything_outside_the_region_is_preserved():
    model = onnx.load(MODELS / "resnext_emulated_tf.onnx")
    onnx.helper.set_model_props(model, {"author": "me", "license": "x"})
    model.doc_string = "doc"
    model.graph.doc_string = "graph doc"
    result = gr.rewrite(model, "fuse", verify_result=False).model
    assert result.ir_version == model.ir_version and list(result.opset_import) == list(model.opset_import)
    assert {p.key: p.value for p in result.metadata_props} == {"author": "me", "license": "x"}
    assert (result.doc_string, result.graph.doc_string) == ("doc", "graph doc")
    assert [i.SerializeToString() for i in result.graph.input] == [i.SerializeToString() for i in model.graph.input]
    assert [o.SerializeToString() for o in result.graph.output] == [o.SerializeToString() for o in model.graph.output]
    untouched = {n.name: n.SerializeToString() for n in model.graph.node
                 if n.op_type in ("Relu", "BatchNormalization", "Add")}
    after = {n.name: n.SerializeToString() for n in result.graph.node if n.name in untouched}
    assert after == untouched


def test_input_model_proto_is_never_modified():
    model = onnx.load(MODELS / "resnext_emulated_nchw.onnx")
    before = model.SerializeToString()
    gr.rewrite(model, "fuse", verify_result=True, provider="cpu")
    gr.rewrite(model, "expand", verify_result=False)
    assert model.SerializeToString() == before


def test_external_data_round_trip(tmp_path):
    model = onnx.load(MODELS / "resnext_native.onnx")
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    onnx.save_model(model, src, save_as_external_data=True, location="weights.bin", size_threshold=0)
    result = gr.rewrite(src, "expand", verify_result=True, provider="cpu")
    assert result.verification.passed and result.source.external_data
    out = tmp_path / "out" / "rewritten.onnx"
    out.parent.mkdir()
    result.save(out)
    assert sorted(os.listdir(out.parent)) == ["rewritten.onnx", "rewritten.onnx.data"]
    reloaded = onnx.load(out)
    onnx.checker.check_model(str(out), full_check=True)
    assert op_counts(reloaded)["ReduceSum"] == 2


@pytest.mark.parametrize("location", ["../escape.bin", "/etc/passwd", "sub/../../escape.bin"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, location):
    model = onnx.load(MODELS / "resnext_native.onnx")
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(GconvError, match="refused"):
        model_io.load(path)


def test_external_data_symlink_escaping_the_folder_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 64)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "w.bin").symlink_to(secret)
    model = onnx.load(MODELS / "resnext_native.onnx")
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "w.bin"
    (folder / "m.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(GconvError, match="outside the model's folder"):
        model_io.load(folder / "m.onnx")


@pytest.mark.parametrize("external", [False, True])
def test_a_write_that_fails_part_way_leaves_no_file(tmp_path, monkeypatch, external):
    """The disk fills up after the first chunk: the previous OUT stays, nothing else is left."""
    model = onnx.load(MODELS / "resnext_native.onnx")
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous content")

    def disk_full(f, data):
        f.write(bytes(memoryview(data)[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_io, "_write_chunks", disk_full)
    before = model.SerializeToString()
    with pytest.raises(GconvError, match="No space left"):
        model_io.save(model, out, external_data=external)
    assert out.read_bytes() == b"previous content"
    assert os.listdir(tmp_path) == ["out.onnx"]
    assert model.SerializeToString() == before  # the model in memory is intact


def test_saving_with_external_data_leaves_the_model_intact(tmp_path):
    model = onnx.load(MODELS / "resnext_native.onnx")
    before = model.SerializeToString()
    model_io.save(model, tmp_path / "m.onnx", external_data=True)
    assert model.SerializeToString() == before
    reloaded = onnx.load(tmp_path / "m.onnx")
    assert [numpy_helper.to_array(t).tobytes() for t in reloaded.graph.initializer] == [
        numpy_helper.to_array(t).tobytes() for t in model.graph.initializer]


def test_a_run_killed_mid_write_leaves_no_file_and_its_leftovers_are_cleaned(tmp_path):
    """SIGKILL during the write: OUT never appears; the next save removes the dead run's temporary folder."""
    import signal
    import subprocess
    import sys
    model = onnx.load(MODELS / "resnext_native.onnx")
    out = tmp_path / "out.onnx"
    # A child that starts an atomic save and is killed while its temporary file is half written.
    child = subprocess.Popen([sys.executable, "-c", f"""
import os, time, onnx
from gconv_rewrite import model_io
def stall(f, data):
    f.write(bytes(memoryview(data)[:1000])); f.flush(); print('writing', flush=True); time.sleep(60)
model_io._write_chunks = stall
model_io.save(onnx.load({str(MODELS / 'resnext_native.onnx')!r}), {str(out)!r})
"""], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert not out.exists() and len(leftovers) == 1 and leftovers[0].startswith(f".gconv-{child.pid}-")
    model_io.save(model, out)
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    assert onnx.load(out).SerializeToString() == model.SerializeToString()


def test_unsupported_versions_and_inconsistent_models_are_refused(tmp_path):
    model = onnx.load(MODELS / "resnext_native.onnx")
    for field, value, message in (("ir_version", 99, "unsupported IR version 99"),):
        bad = onnx.ModelProto()
        bad.CopyFrom(model)
        setattr(bad, field, value)
        with pytest.raises(GconvError, match=message):
            model_io.load(bad)
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    bad.opset_import[0].version = 99
    with pytest.raises(GconvError, match="unsupported opset 99"):
        model_io.load(bad)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    i = helper.make_tensor_value_info("i", TensorProto.INT64, [2, 3])
    graph = helper.make_graph([helper.make_node("Add", ["x", "i"], ["y"])], "g", [x, i],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    inconsistent = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(GconvError, match="shape inference fails"):
        model_io.load(inconsistent)


def test_weights_a_rewritten_body_no_longer_reads_are_dropped_from_the_outer_graph():
    expanded = gr.rewrite(if_model(), "expand", verify_result=False).model
    assert sorted(t.name for t in expanded.graph.initializer) == []  # w1, w2 now live as dw weights in the bodies
    onnx.checker.check_model(expanded)
    x = np.random.default_rng(0).standard_normal((1, C, H, H)).astype(np.float32)
    for cond in (True, False):
        feed = {"x": x, "cond": np.array(cond)}
        np.testing.assert_allclose(run_ort(expanded, feed)["y"], run_ort(if_model(), feed)["y"], rtol=1e-5, atol=1e-5)


def test_sparse_initializers_and_external_constants_and_subgraph_weights(tmp_path):
    """Valid models with a sparse initializer, or with Constant-node / If-body weights stored as
    external data, are rewritten and verified; saving moves those weights out too."""
    model = if_model()
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    # put the outer weights into the If bodies as initializers, then save everything externally
    for attr_ in model.graph.node[0].attribute:
        body = attr_.g
        name = body.node[0].input[1]
        body.initializer.extend(t for t in model.graph.initializer if t.name == name)
    del model.graph.initializer[:]
    onnx.save_model(model, src, save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
                    size_threshold=0)
    result = gr.rewrite(src, "expand", provider="cpu", latency=False)
    assert result.verification.passed and result.count("expanded") == 2
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    result.save(out)
    header = onnx.load(out, load_external_data=False)
    inline = [t for a in header.graph.node[0].attribute for t in a.g.initializer
              if t.data_location != TensorProto.EXTERNAL and len(t.raw_data) >= 1024]
    assert inline == []
    onnx.checker.check_model(str(out))
    sparse = onnx.load(MODELS / "resnext_native.onnx")
    dense = sparse.graph.initializer[0]
    values = numpy_helper.to_array(dense).reshape(-1)
    nz = np.flatnonzero(values)
    sp = helper.make_sparse_tensor(numpy_helper.from_array(values[nz], dense.name),
                                   numpy_helper.from_array(nz.astype(np.int64), dense.name + "_idx"), list(dense.dims))
    sparse.graph.sparse_initializer.append(sp)
    del sparse.graph.initializer[0]
    onnx.checker.check_model(sparse)
    assert [f.status for f in gr.inspect(sparse).findings] == ["native", "native"]


def test_external_save_moves_constant_node_weights_too(tmp_path):
    w = np.random.default_rng(0).standard_normal((64, 8, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
             helper.make_node("Conv", ["x", "w"], ["y"], group=8, pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 5, 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    before = model.SerializeToString()
    model_io.save(model, tmp_path / "c.onnx", external_data=True)
    assert model.SerializeToString() == before
    assert (tmp_path / "c.onnx.data").stat().st_size == w.nbytes
    assert (tmp_path / "c.onnx").stat().st_size < 2000
    x = np.random.default_rng(1).standard_normal((1, 64, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(run_ort(str(tmp_path / "c.onnx"), {"x": x})["y"], run_ort(model, {"x": x})["y"])


def test_a_modelproto_without_its_external_data_is_refused_with_the_remedy(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(onnx.load(MODELS / "resnext_native.onnx"), path, save_as_external_data=True, location="m.bin",
                    size_threshold=0)
    header = onnx.load(path, load_external_data=False)
    for call in (gr.inspect, gr.rewrite):
        with pytest.raises(GconvError, match="external data that is not loaded: pass the model's path"):
            call(header)
    assert [f.status for f in gr.inspect(path).findings] == ["native", "native"]  # the path works
    assert [f.status for f in gr.inspect(onnx.load(path)).findings] == ["native", "native"]  # so does a loaded proto
