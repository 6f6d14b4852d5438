"""ONNX frontend: real-world export patterns import and match ONNX Runtime; bad input fails clearly.

Models are tiny and built here, with ``torch.onnx.export`` (TorchScript exporter, opset 17) or with
``onnx.helper``; each imported module is built for LLVM and compared with ONNX Runtime.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from compiler.errors import CompileError, InputShapeError, ModelFormatError, UnsupportedOperatorError
from compiler.frontends.onnx import import_onnx

TARGET = tvm.target.Target({"kind": "llvm"})
RTOL, ATOL = 1e-4, 1e-5


# ---------------------------------------------------------------- helpers


def export(module: torch.nn.Module, args: tuple, path, **kwargs) -> str:
    """Export with the TorchScript exporter at opset 17, as many real-world models were."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), dynamo=False, opset_version=17, **kwargs)
    return str(path)


def run_tvm(imported, arrays: list[np.ndarray]) -> list[np.ndarray]:
    ex = tvm.compile(imported.mod, target=TARGET)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in arrays])
    return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]


def run_ort(model, feeds: dict) -> list[np.ndarray]:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)


def assert_matches_ort(model, feeds: dict, **import_kwargs) -> None:
    imported = import_onnx(model, **import_kwargs)
    assert [spec.name for spec in imported.inputs] == list(feeds)
    got = run_tvm(imported, list(feeds.values()))
    want = run_ort(model, feeds)
    assert len(got) == len(want) == len(imported.output_names)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


def op_types(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def make_model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


# ---------------------------------------------------------------- shape subgraphs


class Flatten(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(torch.relu(x).view(x.size(0), -1))


def test_flatten_with_dynamic_batch(tmp_path):
    """Shape->Gather->Unsqueeze->Concat->Reshape with a dynamic batch folds once the batch is fixed."""
    path = export(Flatten(), (torch.randn(2, 3, 4),), tmp_path / "flatten.onnx",
                  input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    assert {"Shape", "Gather", "Unsqueeze", "Concat", "Reshape"} <= op_types(path)
    x = np.random.default_rng(0).standard_normal((3, 3, 4)).astype(np.float32)
    assert_matches_ort(path, {"x": x}, input_shapes={"x": (3, 3, 4)})


class ZerosOnes(torch.nn.Module):
    def forward(self, x):
        z = torch.zeros(x.shape[0], 4)
        return x[:, :4] * 2 + z + torch.ones_like(z), torch.ones_like(x).sum(dim=1)


def test_constant_of_shape_from_computed_shape(tmp_path):
    path = export(ZerosOnes(), (torch.randn(2, 6),), tmp_path / "zeros.onnx",
                  input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    assert "ConstantOfShape" in op_types(path)
    x = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    assert_matches_ort(path, {"x": x}, input_shapes={"x": (5, 6)})


class TinyEncoder(torch.nn.Module):
    """Token and position embeddings, position ids from ``arange(ids.shape[1])``."""

    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(30, 8)
        self.pos = torch.nn.Embedding(16, 8)
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
        return self.norm(self.tok(ids) + self.pos(positions))


def test_range_position_ids_with_int64_tokens(tmp_path):
    path = export(TinyEncoder(), (torch.randint(0, 30, (2, 5)),), tmp_path / "enc.onnx",
                  input_names=["ids"], dynamic_axes={"ids": {0: "batch", 1: "seq"}})
    assert "Range" in op_types(path)
    ids = np.random.default_rng(2).integers(0, 30, (2, 7)).astype(np.int64)
    assert_matches_ort(path, {"ids": ids}, input_shapes={"ids": (2, 7)})


def test_input_dtype_override_inserts_cast(tmp_path):
    """input_dtypes makes the compiled function accept int32 token ids for an int64 model."""
    path = export(TinyEncoder(), (torch.randint(0, 30, (1, 4)),), tmp_path / "enc.onnx", input_names=["ids"])
    imported = import_onnx(path, input_dtypes={"ids": "int32"})
    assert imported.inputs[0].dtype == "int32" and imported.source == "onnx"
    ids = np.random.default_rng(3).integers(0, 30, (1, 4))
    got = run_tvm(imported, [ids.astype(np.int32)])[0]
    np.testing.assert_allclose(got, run_ort(path, {"ids": ids.astype(np.int64)})[0], rtol=RTOL, atol=ATOL)


def test_model_proto_is_not_modified():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [x],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])])
    before = model.SerializeToString()
    imported = import_onnx(model, input_shapes={"x": [2, 3]})
    assert model.SerializeToString() == before
    assert imported.inputs[0].shape == (2, 3) and imported.output_names == ["y"]


# ---------------------------------------------------------------- LSTM and GRU from torch


class RNNModel(torch.nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        y, state = self.rnn(x)
        return (y, *state) if isinstance(state, tuple) else (y, state)


@pytest.mark.parametrize(
    "rnn",
    [
        torch.nn.LSTM(4, 6),
        torch.nn.LSTM(4, 5, num_layers=2, bidirectional=True, batch_first=True),
        torch.nn.GRU(4, 6, num_layers=2),
    ],
    ids=["lstm", "lstm-2layer-bidirectional-batchfirst", "gru-2layer"],
)
def test_torch_rnn(tmp_path, rnn):
    x = np.random.default_rng(4).standard_normal((3, 2, 4)).astype(np.float32)
    path = export(RNNModel(rnn), (torch.from_numpy(x),), tmp_path / "rnn.onnx", input_names=["x"])
    assert op_types(path) & {"LSTM", "GRU"}
    assert_matches_ort(path, {"x": x})


# ---------------------------------------------------------------- LSTM and GRU from onnx.helper


def rnn_model(op, *, direction="forward", layout=0, peepholes=False, linear_before_reset=0, seed=0):
    """A single LSTM/GRU node with initial states as graph inputs; returns (model, feeds)."""
    rng = np.random.default_rng(seed)
    steps, batch, size, hidden = 3, 2, 4, 5
    gates, dirs = (4 if op == "LSTM" else 3), (2 if direction == "bidirectional" else 1)
    x_shape = [batch, steps, size] if layout else [steps, batch, size]
    h_shape = [batch, dirs, hidden] if layout else [dirs, batch, hidden]
    weights = {"W": (dirs, gates * hidden, size), "R": (dirs, gates * hidden, hidden), "B": (dirs, 2 * gates * hidden)}
    if peepholes:
        weights["P"] = (dirs, 3 * hidden)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in weights.items()]
    states = ["h0", "c0"] if op == "LSTM" else ["h0"]
    inputs = ["x", "W", "R", "B", ""] + states + (["P"] if peepholes else [])
    outputs = ["y", "y_h", "y_c"][: len(states) + 1]
    attrs = {"hidden_size": hidden, "direction": direction, "layout": layout}
    if op == "GRU":
        attrs["linear_before_reset"] = linear_before_reset
    vis = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    vis += [helper.make_tensor_value_info(s, TensorProto.FLOAT, h_shape) for s in states]
    model = make_model([helper.make_node(op, inputs, outputs, name=f"my_{op.lower()}", **attrs)], vis,
                       [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits, opset=14)
    feeds = {"x": rng.standard_normal(x_shape).astype(np.float32)}
    feeds.update({s: rng.standard_normal(h_shape).astype(np.float32) for s in states})
    return model, feeds


def reference_outputs(model, feeds, layout):
    """ONNX Runtime's outputs; for layout 1 (which it lacks) via the equivalent layout-0 model."""
    if not layout:
        return run_ort(model, feeds)
    seq_major = onnx.ModelProto()
    seq_major.CopyFrom(model)
    for attr in seq_major.graph.node[0].attribute:
        if attr.name == "layout":
            attr.i = 0
    for vi in seq_major.graph.input:
        dims = vi.type.tensor_type.shape.dim
        dims[0].dim_value, dims[1].dim_value = dims[1].dim_value, dims[0].dim_value
    swapped = {k: np.ascontiguousarray(v.swapaxes(0, 1)) for k, v in feeds.items()}
    y, *states = run_ort(seq_major, swapped)
    return [y.transpose(2, 0, 1, 3)] + [s.swapaxes(0, 1) for s in states]


@pytest.mark.parametrize(
    "op, kwargs",
    [
        ("LSTM", {"direction": "reverse", "peepholes": True}),
        ("LSTM", {"direction": "bidirectional", "layout": 1, "peepholes": True}),
        ("GRU", {"direction": "forward", "linear_before_reset": 0}),
        ("GRU", {"direction": "bidirectional", "layout": 1, "linear_before_reset": 1}),
    ],
    ids=["lstm-reverse-peepholes", "lstm-bidirectional-layout1", "gru-lbr0", "gru-bidirectional-layout1"],
)
def test_onnx_rnn_with_initial_states(op, kwargs):
    model, feeds = rnn_model(op, **kwargs)
    imported = import_onnx(model)
    got = run_tvm(imported, list(feeds.values()))
    want = reference_outputs(model, feeds, kwargs.get("layout", 0))
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


def test_rnn_unsupported_attributes_are_listed():
    model, _ = rnn_model("LSTM")
    node = model.graph.node[0]
    node.attribute.extend([helper.make_attribute("clip", 3.0),
                           helper.make_attribute("activations", ["Relu", "Tanh", "Tanh"])])
    with pytest.raises(UnsupportedOperatorError) as info:
        import_onnx(model)
    msg = str(info.value)
    assert "clip" in msg and "activations=Relu" in msg and "my_lstm" in msg


def test_rnn_with_runtime_weights_is_rejected():
    """Unrolling needs constant weights; a GRU whose W is a graph input is reported, not mis-built."""
    model, _ = rnn_model("GRU")
    weight = next(init for init in model.graph.initializer if init.name == "W")
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(weight.dims)))
    model.graph.initializer.remove(weight)
    with pytest.raises(UnsupportedOperatorError, match="GRU with non-constant weights.*my_gru"):
        import_onnx(model)


# ---------------------------------------------------------------- errors


def test_symbolic_input_without_shape(tmp_path):
    path = export(Flatten(), (torch.randn(2, 3, 4),), tmp_path / "f.onnx",
                  input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    with pytest.raises(InputShapeError) as info:
        import_onnx(path)
    msg = str(info.value)
    assert "'x'" in msg and "batch" in msg
    assert "input_shapes={'x': (1, 3, 4)}" in msg and "--input-shape x:1x3x4" in msg


def test_input_shapes_names_unknown_input():
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 3])
    model = make_model([helper.make_node("Relu", ["pixels"], ["y"])], [x],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    with pytest.raises(InputShapeError) as info:
        import_onnx(model, input_shapes={"pixel": (1, 3)})
    assert "'pixel'" in str(info.value) and "pixels" in str(info.value)
    with pytest.raises(InputShapeError, match="rank"):
        import_onnx(model, input_shapes={"pixels": (1, 3, 1)})
    with pytest.raises(InputShapeError, match="float128"):
        import_onnx(model, input_dtypes={"pixels": "float128"})


def test_unsupported_operators_listed_at_once():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    nodes = [
        helper.make_node("FooBar", ["x"], ["a"], name="foo_1"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Baz", ["b"], ["c"], name="baz_1"),
        helper.make_node("FooBar", ["c"], ["y"], name="foo_2"),
    ]
    model = make_model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    with pytest.raises(UnsupportedOperatorError) as info:
        import_onnx(model)
    msg = str(info.value)
    for part in ("FooBar", "Baz", "foo_1", "foo_2", "baz_1"):
        assert part in msg
    assert "relu" not in msg
    assert {op for op, _ in info.value.ops} == {"FooBar", "Baz"}


@pytest.fixture
def exported(tmp_path):
    return export(Flatten(), (torch.randn(1, 3, 4),), tmp_path / "ok.onnx", input_names=["x"])


def test_truncated_file(tmp_path, exported):
    data = open(exported, "rb").read()
    for cut in (len(data) // 2, len(data) - 7, 10):
        bad = tmp_path / f"cut{cut}.onnx"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError) as info:
            import_onnx(bad)
        assert str(bad) in str(info.value)


def test_garbage_and_empty_files(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf\x00\xff" * 20)
    with pytest.raises(ModelFormatError, match="garbage.onnx"):
        import_onnx(garbage)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelFormatError, match="no ONNX graph"):
        import_onnx(empty)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFormatError, match="does not exist"):
        import_onnx(tmp_path / "nope.onnx")


def test_dangling_reference_is_a_format_error():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    model = make_model([helper.make_node("Add", ["x", "lost_weight"], ["y"], name="add")], [x],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    with pytest.raises(ModelFormatError, match="lost_weight"):
        import_onnx(model)


def test_converter_failure_names_the_node():
    """A data-dependent Reshape cannot be folded; TVM's failure comes back as a CompileError."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
              helper.make_tensor_value_info("shape", TensorProto.INT64, [2])]
    model = make_model([helper.make_node("Reshape", ["x", "shape"], ["y"], name="dyn_reshape")], inputs,
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    with pytest.raises(CompileError, match="dyn_reshape"):
        import_onnx(model)
