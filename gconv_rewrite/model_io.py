"""Load and save models: paths or ModelProtos, external data resolved safely, atomic writes.

The only module that touches the file system for models.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import onnx
import onnx_graphsurgeon as gs
from onnx import ModelProto, TensorProto

from .errors import GconvError
from .graph import infer_value_infos, skeleton

# A path, a ModelProto, or an onnx-graphsurgeon Graph (how TensorRT pipelines hold their models).
ModelSource = ModelProto | gs.Graph | str | os.PathLike
_TWO_GB = 2**31 - 1


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the input that the output must keep."""

    path: str | None
    ir_version: int
    opsets: dict[str, int]
    external_data: bool
    value_infos: dict = field(default_factory=dict, compare=False, repr=False)  # from validation's inference
    weight_bytes: int = 0  # of the main graph's initializers


def iter_tensors(model: ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto of the model: initializers and Constant attributes, in subgraphs and functions too."""
    def from_graph(graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            if node.attribute:
                yield from from_node(node)

    def from_node(node):
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from from_graph(attr.g)
            for g in attr.graphs:
                yield from from_graph(g)

    yield from from_graph(model.graph)
    for fn in model.functions:
        for node in fn.node:
            yield from from_node(node)


def uses_external_data(model: ModelProto) -> bool:
    """True when some tensor keeps its bytes in an external file."""
    return any(t.data_location == TensorProto.EXTERNAL for t in iter_tensors(model))


def check_external_locations(model: ModelProto, base_dir: str) -> None:
    """Refuse external-data locations that resolve outside `base_dir` (absolute, '..', symlinks)."""
    base = os.path.realpath(base_dir)
    for tensor in iter_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if not location:
            raise GconvError(f"tensor '{tensor.name}' has external data without a location")
        if os.path.isabs(location) or location.startswith(("\\", "/")):
            raise GconvError(f"tensor '{tensor.name}': external data location '{location}' is absolute; refused")
        target = os.path.realpath(os.path.join(base, location))
        if os.path.commonpath([base, target]) != base:
            raise GconvError(
                f"tensor '{tensor.name}': external data location '{location}' resolves outside the model's folder; "
                "refused")
        if not os.path.isfile(target):
            raise GconvError(f"tensor '{tensor.name}': external data file '{location}' not found beside the model")


def opsets_of(model: ModelProto) -> dict[str, int]:
    return {(o.domain if o.domain != "ai.onnx" else ""): o.version for o in model.opset_import}


def load(src: ModelSource, weights: bool = True) -> tuple[ModelProto, ModelInfo]:
    """Load a model from a path (with its external data) or copy a ModelProto; never alters `src`.

    weights=False leaves external data on disk (locations still checked): enough to read the
    graph, for example to hand the path to onnxruntime.
    """
    if isinstance(src, gs.Graph):
        src = from_graphsurgeon(src)
    if isinstance(src, ModelProto):
        model = ModelProto()
        model.CopyFrom(src)
        had_external = uses_external_data(model)
        path = None
        if had_external and weights:  # its locations are relative to a folder a ModelProto does not know
            raise GconvError("the ModelProto's weights are in external data that is not loaded: pass the model's "
                             "path, or load it with onnx.load(path) (load_external_data=True)")
    else:
        path = os.fspath(src)
        if not os.path.exists(path):
            raise GconvError(f"{path}: no such file")
        if os.path.isdir(path):
            raise GconvError(f"{path}: is a directory, not an ONNX model")
        if os.path.getsize(path) == 0:
            raise GconvError(f"{path}: empty file, not an ONNX model")
        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends: any failure means not a model
            raise GconvError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {_first_line(exc)})") from None
        if not model.HasField("graph") or model.ir_version == 0:
            raise GconvError(f"{path}: not a valid ONNX model (no graph or IR version)")
        had_external = uses_external_data(model)
        if had_external:
            base_dir = os.path.dirname(os.path.abspath(path))
            check_external_locations(model, base_dir)
        if had_external and weights:
            try:
                onnx.load_external_data_for_model(model, base_dir)
            except Exception as exc:  # noqa: BLE001 - any failure reading the data files is one user error
                raise GconvError(f"{path}: cannot read external data ({_first_line(exc)})") from None
    if not model.HasField("graph"):
        raise GconvError("not a valid ONNX model (no graph)")
    check_strings(model, path or "model")
    _check_versions(model, path or "model")
    infos = validate(model, path or "model")
    return model, ModelInfo(path=path, ir_version=model.ir_version, opsets=opsets_of(model), external_data=had_external,
                            value_infos=infos, weight_bytes=sum(tensor_nbytes(t) for t in model.graph.initializer))


def from_graphsurgeon(graph: gs.Graph) -> ModelProto:
    """A graphsurgeon Graph as a ModelProto, by graphsurgeon's own exporter (which keeps its IR version and opsets);
    the Graph is not changed."""
    try:
        return gs.export_onnx(graph)
    except Exception as exc:  # noqa: BLE001 - e.g. a graph input or output without a dtype
        raise GconvError(f"cannot export the onnx-graphsurgeon Graph ({type(exc).__name__}: {_first_line(exc)})") \
            from None


def to_graphsurgeon(model: ModelProto) -> gs.Graph:
    """A ModelProto as a graphsurgeon Graph, by graphsurgeon's own importer."""
    return gs.import_onnx(model)


def check_strings(message, label: str = "model") -> None:
    """Every string field must be UTF-8: protobuf parses a damaged name without complaint and fails only when it is
    read, deep in the work. Walks messages and string fields only (never copies a tensor's bytes)."""
    try:
        _walk_strings(message)
    except UnicodeDecodeError as exc:
        raise GconvError(f"{label}: not a valid ONNX model (a name or string is not UTF-8 at byte {exc.start}: "
                         "a damaged file?)") from None


def _repeated(fd) -> bool:
    """protobuf 7 has FieldDescriptor.is_repeated; older ones only `label`."""
    return fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED


def _walk_strings(message) -> None:
    for fd in message.DESCRIPTOR.fields:
        if fd.type == fd.TYPE_STRING:  # protobuf hands back bytes (or raises) where the UTF-8 is broken
            values = getattr(message, fd.name)
            for value in values if _repeated(fd) else (values,):
                if isinstance(value, bytes):
                    value.decode()  # raises UnicodeDecodeError, with the position
        elif fd.type == fd.TYPE_MESSAGE:
            if _repeated(fd):
                for item in getattr(message, fd.name):
                    _walk_strings(item)
            elif message.HasField(fd.name):
                _walk_strings(getattr(message, fd.name))


def check_writable(path: str | os.PathLike) -> None:
    """Fail early, with the reason, when `path` cannot be written."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise GconvError(f"{path}: output folder does not exist")
    if os.path.isdir(path):
        raise GconvError(f"{path}: is a directory")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise GconvError(f"{path}: not writable")


def validate(model: ModelProto, label: str = "model") -> dict:
    """onnx.checker and strict shape inference on the model's structure (a weightless copy, so it
    is cheap) and the sizes of its weights; returns the inferred ValueInfos for the analysis."""
    for tensor in iter_tensors(model):
        expected = tensor_nbytes(tensor)
        # Reading raw_data copies it: sizes of weights over 256 MB are left to onnxruntime to check.
        if 0 < expected <= _CHECKED_BYTES and tensor.HasField("raw_data") and len(tensor.raw_data) != expected:
            raise GconvError(f"{label}: tensor '{tensor.name}' holds {len(tensor.raw_data)} bytes, "
                             f"its dims {list(tensor.dims)} need {expected}")
    skel = skeleton(model)
    infos: dict = {}
    try:  # strict: inconsistent types or shapes are bad input (ops without a known schema are skipped)
        infos = infer_value_infos(skel, strict=True)
    except Exception as exc:  # noqa: BLE001 - onnx's inference errors are bad input: one user error
        if not _about_unloaded_data(model, exc):
            raise GconvError(f"{label}: shape inference fails ({_first_line(exc)})") from None
    # The checker insists on a `shape` field on graph inputs/outputs, which onnxruntime treats as
    # optional (absent = unknown shape); do not refuse models that every runtime accepts.
    for vi in list(skel.graph.input) + list(skel.graph.output):
        if vi.type.HasField("tensor_type") and not vi.type.tensor_type.HasField("shape"):
            vi.type.tensor_type.shape.dim.add()
            vi.type.tensor_type.shape.ClearField("dim")
            vi.type.tensor_type.shape.SetInParent()
    try:
        onnx.checker.check_model(skel)
    except onnx.checker.ValidationError as exc:
        if not _about_unloaded_data(model, exc):
            raise GconvError(f"{label}: invalid model ({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - anything else the checker raises also means an invalid model
        raise GconvError(f"{label}: invalid model ({type(exc).__name__}: {_first_line(exc)})") from None
    return infos


def check_input_shapes(model: ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> None:
    """--input-shape must name graph inputs (not initializers) and give each its rank."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = {vi.name: vi for vi in model.graph.input if vi.name not in initializers}
    for name, dims in input_shapes.items():
        if name not in inputs:
            raise GconvError(f"--input-shape names unknown input '{name}' (inputs: {', '.join(inputs)})")
        tt = inputs[name].type.tensor_type
        if inputs[name].type.HasField("tensor_type") and len(dims) != len(tt.shape.dim):
            raise GconvError(f"--input-shape {name}: rank {len(dims)}, but the input has rank {len(tt.shape.dim)}")


def shapes_at(model: ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict:
    """The model's value shapes when its graph inputs have `input_shapes` (--input-shape): what the
    cost model plans with where the model's own spatial dims are symbolic. The model is not changed."""
    check_input_shapes(model, input_shapes)
    skel = skeleton(model)
    inputs = {vi.name: vi for vi in skel.graph.input}
    for name, dims in input_shapes.items():
        for axis, (d, size) in enumerate(zip(inputs[name].type.tensor_type.shape.dim, dims)):
            if d.HasField("dim_value") and d.dim_value != size:
                raise GconvError(f"--input-shape {name}: dim {axis} is {size}, but the model fixes it to {d.dim_value}")
            d.Clear()
            d.dim_value = size
    try:
        return infer_value_infos(skel, strict=False)
    except Exception as exc:  # noqa: BLE001 - inference failing on the given shapes is one user error
        raise GconvError(f"--input-shape: shape inference fails with these shapes ({_first_line(exc)})") from None


def _about_unloaded_data(model: ModelProto, exc: Exception) -> bool:
    """An error only because tensors were left on disk (load(weights=False)): not the model's fault.
    Their locations were checked at load; onnxruntime reads them from the model's folder."""
    text = str(exc)
    return uses_external_data(model) and ("external" in text.lower() or "should be stored in" in text)


def _check_versions(model: ModelProto, label: str) -> None:
    if not 3 <= model.ir_version <= onnx.IR_VERSION:
        raise GconvError(f"{label}: unsupported IR version {model.ir_version} (this onnx {onnx.__version__} "
                         f"reads 3..{onnx.IR_VERSION})")
    newest = onnx.defs.onnx_opset_version()
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and not 1 <= op.version <= newest:
            raise GconvError(f"{label}: unsupported opset {op.version} "
                             f"(this onnx {onnx.__version__} knows 1..{newest})")


def save(model: ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> None:
    """Write `model` to `path` atomically: nothing appears at `path` unless the whole write succeeded.

    External data (used when asked, or when the model exceeds protobuf's 2 GB limit) is written
    beside `path` as `<name>.data` with a relative location.
    """
    path = os.fspath(path)
    target_dir = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(target_dir):
        raise GconvError(f"{path}: output folder does not exist")
    if external_data is None:
        external_data = needs_external_data(model)
    _remove_stale_temporaries(target_dir)
    try:
        tmp_dir = tempfile.mkdtemp(prefix=f".gconv-{os.getpid()}-", dir=target_dir)
    except OSError as exc:
        raise GconvError(f"{path}: cannot write to the output folder ({exc.strerror})") from None
    try:
        name = os.path.basename(path)
        tmp_model = os.path.join(tmp_dir, name)
        data_name = name + ".data"
        if external_data:
            _write_with_external_data(model, tmp_model, os.path.join(tmp_dir, data_name), data_name)
        else:
            _write_file(tmp_model, model.SerializeToString())
        if external_data:
            os.replace(os.path.join(tmp_dir, data_name), os.path.join(target_dir, data_name))
        os.replace(tmp_model, path)
        _fsync_dir(target_dir)
    except OSError as exc:
        raise GconvError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        for leftover in Path(tmp_dir).glob("*"):
            leftover.unlink(missing_ok=True)
        os.rmdir(tmp_dir)


def _remove_stale_temporaries(folder: str) -> None:
    """Remove what a killed run (SIGKILL, power loss) left: `.gconv-<pid>-*` of processes that are gone."""
    for entry in Path(folder).glob(".gconv-*-*"):
        try:
            pid = int(entry.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        for leftover in entry.glob("*"):
            leftover.unlink(missing_ok=True)
        try:
            entry.rmdir()
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_CHUNK = 64 << 20


def _write_chunks(f, data) -> None:
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        f.write(view[start:start + _CHUNK])


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        _write_chunks(f, data)
        f.flush()
        os.fsync(f.fileno())


def _copy_fields(src, dst, skip: str) -> None:
    """Copy every set field of `src` to `dst` except `skip` (ListFields reads no weight it skips)."""
    for descriptor, value in src.ListFields():
        if descriptor.name == skip:
            continue
        if hasattr(value, "ListFields"):  # a message
            getattr(dst, descriptor.name).CopyFrom(value)
        elif isinstance(value, (str, bytes, int, float, bool)):
            setattr(dst, descriptor.name, value)
        else:  # a repeated field
            getattr(dst, descriptor.name).extend(value)


def _write_with_external_data(model: ModelProto, model_path: str, data_path: str, location: str,
                              threshold: int = 1024) -> None:
    """Initializers of >= `threshold` bytes go to `data_path`; `model` itself is not touched.

    (onnx.save_model's external-data path empties the tensors of the model it is given, and
    protobuf arenas keep cleared bytes alive, so moving data out and back would cost two extra
    copies.) A small header model refers to the data file; memory stays at the model plus the
    largest tensor while it is written.
    """
    header = ModelProto()
    _copy_fields(model, header, skip="graph")
    src, graph = model.graph, header.graph
    _copy_fields(src, graph, skip="initializer")
    with open(data_path, "wb") as data:
        for tensor in src.initializer:
            if not _movable(tensor, threshold):
                graph.initializer.append(tensor)
                continue
            ref = graph.initializer.add()  # built field by field: copying the tensor would copy its bytes
            ref.name, ref.data_type = tensor.name, tensor.data_type
            ref.dims.extend(tensor.dims)
            if tensor.doc_string:
                ref.doc_string = tensor.doc_string
            _write_external(ref, tensor.raw_data, data, location)
        for node in graph.node:  # the header's own copies: Constant values and subgraph initializers
            _externalize_node(node, data, location, threshold)
        data.flush()
        os.fsync(data.fileno())
    try:
        serialized = header.SerializeToString()
    except Exception as exc:  # noqa: BLE001 - protobuf's 2 GB limit, even with the weights moved out
        raise GconvError(f"the model's graph alone exceeds protobuf's 2 GB limit ({_first_line(exc)})") from None
    _write_file(model_path, serialized)


def _movable(tensor: TensorProto, threshold: int) -> bool:
    return (tensor.data_location != TensorProto.EXTERNAL and tensor.HasField("raw_data")
            and tensor_nbytes(tensor) >= threshold)


def _write_external(ref: TensorProto, raw: bytes, data, location: str) -> None:
    """Append `raw` to the data file and make `ref` point at it."""
    offset = data.tell()
    _write_chunks(data, raw)
    ref.ClearField("raw_data")
    ref.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
        entry = ref.external_data.add()
        entry.key, entry.value = key, value


def _externalize_tensor(tensor: TensorProto, data, location: str, threshold: int) -> None:
    """Move one tensor's bytes to `data` in place (used on the header's copies only)."""
    if _movable(tensor, threshold):
        _write_external(tensor, tensor.raw_data, data, location)


def _externalize_node(node, data, location: str, threshold: int) -> None:
    for attr in node.attribute:
        if attr.HasField("t"):
            _externalize_tensor(attr.t, data, location, threshold)
        for t in attr.tensors:
            _externalize_tensor(t, data, location, threshold)
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for t in sub.initializer:
                _externalize_tensor(t, data, location, threshold)
            for inner in sub.node:
                _externalize_node(inner, data, location, threshold)


_CHECKED_BYTES = 256 << 20


def tensor_nbytes(tensor: TensorProto) -> int:
    """Bytes of a tensor's data from its dims and type (without touching the data, which would copy it)."""
    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return 0
    n = 1
    for d in tensor.dims:
        n *= d
    bits = {TensorProto.INT4: 4, TensorProto.UINT4: 4}.get(tensor.data_type)
    if bits:
        return (n * bits + 7) // 8
    try:
        return n * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return 0


def needs_external_data(model: ModelProto) -> bool:
    """True when the model is too big for one protobuf (2 GB)."""
    total = 0
    for tensor in iter_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            total += tensor_nbytes(tensor)
        if total > _TWO_GB - (64 << 20):  # leave room for the graph itself
            return True
    return False


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        _fsync(path)
    except OSError:  # some file systems cannot fsync a directory; the rename is still atomic
        pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
