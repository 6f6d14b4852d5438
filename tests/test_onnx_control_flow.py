"""Control flow and recurrent models: ``constant_inputs`` (inputs frozen to values, so an ``If`` on them
folds to its taken branch), LSTMs inside ``If`` branches, the refusals, and the two zoo families that
broke (issue 13, items 3 and 4): a CRNN text recognizer whose LSTM input comes through shape arithmetic,
and a streaming 1-D conv + LSTMCell model with state in and out. Compared with PyTorch and ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from conftest import assert_close, export_onnx, run_ort, run_torch, zoo_model
from onnx import TensorProto, helper, numpy_helper

import compiler
from compiler.errors import InputShapeError, KilnError, UnsupportedOperatorError

SEQ, FEAT, HIDDEN = 5, 4, 6


def kiln_cli(capsys, *argv) -> tuple[int, str, str]:
    """``kiln ARGV`` in this process: (exit status, stdout, stderr)."""
    from compiler import cli

    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _lstm_branch(tag: str, rng, weights_in_branch: bool) -> tuple[onnx.GraphProto, list]:
    """A branch holding one LSTM over the outer ``x``; its weights are initializers of the branch or
    (returned) of the outer graph."""
    weights = [numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), f"{w}_{tag}")
               for w, shape in (("W", (1, 4 * HIDDEN, FEAT)), ("R", (1, 4 * HIDDEN, HIDDEN)), ("B", (1, 8 * HIDDEN)))]
    node = helper.make_node("LSTM", ["x", f"W_{tag}", f"R_{tag}", f"B_{tag}"], [f"Y_{tag}", f"h_{tag}"],
                            hidden_size=HIDDEN, name=f"lstm_{tag}")
    out = helper.make_tensor_value_info(f"h_{tag}", TensorProto.FLOAT, [1, 1, HIDDEN])
    graph = helper.make_graph([node], tag, [], [out], weights if weights_in_branch else [])
    return graph, [] if weights_in_branch else weights


def vad_model() -> onnx.ModelProto:
    """Silero-VAD-like: ``If (sr == 16000)`` picks one of two LSTMs; ``sr`` is a scalar int64 input."""
    rng = np.random.default_rng(0)
    then_g, outer_then = _lstm_branch("sr16k", rng, weights_in_branch=True)
    else_g, outer_else = _lstm_branch("sr8k", rng, weights_in_branch=False)
    nodes = [helper.make_node("Equal", ["sr", "k16000"], ["is16k"], name="is_16k"),
             helper.make_node("If", ["is16k"], ["h"], then_branch=then_g, else_branch=else_g, name="pick_rate")]
    graph = helper.make_graph(
        nodes, "vad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQ, 1, FEAT]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, HIDDEN])],
        [numpy_helper.from_array(np.array(16000, np.int64), "k16000"), *outer_then, *outer_else])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _x() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(SEQ, 1, FEAT)).astype(np.float32)


def _ort_vad(sr: int) -> np.ndarray:
    return run_ort(vad_model(), {"x": _x(), "sr": np.array(sr, np.int64)})[0]


# ---------------------------------------------------------------- If on a scalar input


@pytest.mark.parametrize("sr", [16000, 8000])
def test_if_on_frozen_scalar_input_inlines_the_branch_and_its_lstm(sr):
    mod = compiler.compile(vad_model(), "x86", tuning_logs=False, constant_inputs={"sr": sr})
    assert [s.name for s in mod.inputs] == ["x"]  # the frozen input is gone
    assert_close(mod(_x()), _ort_vad(sr), what=f"sr={sr}")


def test_if_on_a_runtime_input_compiles_with_the_lstm_of_each_branch():
    """Not frozen, the If stays (Relax control flow) and the LSTM inside each branch is unrolled there."""
    mod = compiler.compile(vad_model(), "x86", tuning_logs=False)
    assert [s.name for s in mod.inputs] == ["x", "sr"]
    for sr in (16000, 8000):
        assert_close(mod(_x(), np.array(sr, np.int64)), _ort_vad(sr), what=f"sr={sr} at run time")


def test_cli_constant_input(tmp_path, capsys):
    path = tmp_path / "vad.onnx"
    onnx.save(vad_model(), path)
    code, out, err = kiln_cli(capsys, "compile", path, "--constant-input", "sr=8000", "-o", tmp_path / "vad.so",
                              "--untuned")
    assert code == 0, err
    assert "sr=8000" in out
    mod = compiler.load(tmp_path / "vad.so")
    assert [s.name for s in mod.inputs] == ["x"]
    assert_close(mod(_x()), _ort_vad(8000))


@pytest.mark.parametrize("arg", ["sr", "sr=", "=3", "sr=fast"])
def test_cli_constant_input_syntax_is_a_usage_error(arg, tmp_path, capsys):
    code, _, err = kiln_cli(capsys, "compile", "zoo:mlp", "--constant-input", arg, "-o", tmp_path / "m.so")
    assert code == 2 and "NAME=VALUE" in err


# ---------------------------------------------------------------- constant_inputs validation


@pytest.mark.parametrize("constants, match", [
    ({"srate": 16000}, r"'srate', which is not an input.*Did you mean 'sr'.*inputs are: x, sr"),
    ({"sr": 16000.5}, r"constant_inputs\['sr'\] = 16000.5 does not fit the input's dtype int64"),
    ({"sr": 2 ** 70}, r"does not fit the input's dtype int64"),
    ({"sr": [16000, 8000]}, r"constant_inputs\['sr'\] has shape \(2,\), but input 'sr' has shape \(\)"),
    ({"sr": "16k"}, r"'16k' is not a number"),
    ({"x": np.zeros((SEQ, 2, FEAT))}, r"shape \(5, 2, 4\), but input 'x' has shape \(5, 1, 4\)"),
])
def test_constant_inputs_are_validated(constants, match):
    with pytest.raises(InputShapeError, match=match):
        compiler.compile(vad_model(), "x86", tuning_logs=False, constant_inputs=constants)


def test_constant_input_also_in_input_shapes_is_refused():
    with pytest.raises(InputShapeError, match="'sr' is both in constant_inputs and in input_shapes"):
        compiler.compile(vad_model(), "x86", constant_inputs={"sr": 8000}, input_shapes={"sr": ()})


def test_scalar_fits_a_one_element_input_and_every_input_can_be_frozen():
    graph = helper.make_graph([helper.make_node("Mul", ["a", "b"], ["y"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 3]),
                               helper.make_tensor_value_info("b", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    graph.node.insert(0, helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT))
    graph.node[1].input[1] = "bf"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    mod = compiler.compile(model, "x86", tuning_logs=False, constant_inputs={"b": 3})
    a = np.arange(3, dtype=np.float32).reshape(1, 3)
    np.testing.assert_array_equal(mod(a), a * 3)


# ---------------------------------------------------------------- refusals


def _loop_model(op: str) -> onnx.ModelProto:
    body_in = [helper.make_tensor_value_info("i", TensorProto.INT64, []),
               helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
               helper.make_tensor_value_info("acc", TensorProto.FLOAT, [2])]
    body = helper.make_graph([helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                              helper.make_node("Add", ["acc", "x"], ["acc_out"])], "body", body_in,
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [2])])
    if op == "Loop":
        node = helper.make_node("Loop", ["n", "", "x"], ["y"], body=body, name="my_loop")
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                  helper.make_tensor_value_info("n", TensorProto.INT64, [])]
    else:
        body = helper.make_graph([helper.make_node("Add", ["s", "e"], ["s_out"]),
                                  helper.make_node("Identity", ["s_out"], ["e_out"])], "body",
                                 [helper.make_tensor_value_info("s", TensorProto.FLOAT, [2]),
                                  helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])],
                                 [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [2]),
                                  helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [3, 2])])
        node = helper.make_node("Scan", ["x", "xs"], ["y", "ys"], body=body, num_scan_inputs=1, name="my_scan")
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                  helper.make_tensor_value_info("xs", TensorProto.FLOAT, [3, 2])]
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op", ["Loop", "Scan"])
def test_loop_and_scan_are_refused_naming_the_node(op):
    with pytest.raises(UnsupportedOperatorError, match=rf"{op} \(control flow.*my_{op.lower()}"):
        compiler.compile(_loop_model(op), "x86", tuning_logs=False,
                         constant_inputs={"n": 3} if op == "Loop" else None)


def test_constant_inputs_on_an_exported_program_is_refused():
    model, inputs = zoo_model("mlp")
    program = torch.export.export(model, inputs)
    with pytest.raises(KilnError, match="cannot apply to an exported program"):
        compiler.compile(program, "x86", constant_inputs={"x": 1})


# ---------------------------------------------------------------- torch route


class RateSwitch(torch.nn.Module):
    """Python control flow on an argument: a frozen ``sr`` picks one of two LSTMs at export time."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lstm16 = torch.nn.LSTM(FEAT, HIDDEN)
        self.lstm8 = torch.nn.LSTM(FEAT, HIDDEN)

    def forward(self, x, sr):
        out, _ = (self.lstm16 if sr == 16000 else self.lstm8)(x)
        return out[-1]


@pytest.mark.filterwarnings("ignore:The tensor attributes .*_flat_weights")
@pytest.mark.parametrize("sr", [16000, 8000])
def test_torch_constant_inputs_bind_forward_arguments(sr):
    model, x = RateSwitch().eval(), torch.from_numpy(_x())
    mod = compiler.compile(model, "x86", example_inputs=(x,), constant_inputs={"sr": sr}, tuning_logs=False)
    assert [s.name for s in mod.inputs] == ["x"]
    with torch.no_grad():
        assert_close(mod(x.numpy()), model(x, sr).numpy(), what=f"sr={sr}")


def test_torch_constant_inputs_errors():
    model, x = RateSwitch().eval(), torch.from_numpy(_x())
    with pytest.raises(InputShapeError, match=r"'rate', which is not an argument of RateSwitch.forward.*x, sr"):
        compiler.compile(model, "x86", example_inputs=(x,), constant_inputs={"rate": 8000})
    with pytest.raises(InputShapeError, match=r"example_inputs has 3 value\(s\).*takes 1: x"):
        compiler.compile(model, "x86", example_inputs=(x, x, x), constant_inputs={"sr": 8000})


# ---------------------------------------------------------------- zoo families, three routes


def _export(model, inputs, path, dynamo: bool, **kwargs) -> str:
    if not dynamo:
        return export_onnx(model, inputs, path, **kwargs)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), tuple(inputs), str(path), dynamo=True, **kwargs)
    return str(path)


def _compile_route(name: str, route: str, tmp_path):
    model, inputs = zoo_model(name)
    if route == "torch":
        return compiler.compile(model, "x86", example_inputs=inputs, tuning_logs=False), None
    if route == "onnx-dynamo" or name != "crnn":
        path = _export(model, inputs, tmp_path / f"{name}.onnx", dynamo=route == "onnx-dynamo")
        return compiler.compile(path, "x86", tuning_logs=False), path
    # CRNN, TorchScript exporter with a dynamic batch and width: the LSTM input then comes through
    # Shape/Gather/Unsqueeze/Concat/Reshape/Transpose, as in real exports; input_shapes fixes it.
    path = export_onnx(model, inputs, tmp_path / "crnn.onnx", input_names=["image"], output_names=["logp"],
                       dynamic_axes={"image": {0: "batch", 3: "width"}, "logp": {0: "time", 1: "batch"}})
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"Shape", "Gather", "Reshape", "Transpose", "LSTM"} <= ops, ops
    return compiler.compile(path, "x86", tuning_logs=False, input_shapes={"image": (1, 1, 32, 128)}), path


@pytest.mark.filterwarnings("ignore:The tensor attributes .*_flat_weights")
@pytest.mark.parametrize("route", [pytest.param("torch", marks=pytest.mark.slow), "onnx",
                                   pytest.param("onnx-dynamo", marks=pytest.mark.slow)])
def test_crnn_text_recognizer(route, tmp_path):
    mod, path = _compile_route("crnn", route, tmp_path)
    model, inputs = zoo_model("crnn")
    want = run_torch(model, inputs)
    assert want.shape == (32, 1, 37)
    assert_close(mod(inputs[0].numpy()), want, what=f"crnn via {route}")
    if path is not None:
        feeds = {onnx.load(path).graph.input[0].name: inputs[0].numpy()}
        assert_close(mod(inputs[0].numpy()), run_ort(path, feeds)[0], what=f"crnn via {route} vs ONNX Runtime")


@pytest.mark.filterwarnings("ignore:The tensor attributes .*_flat_weights")
@pytest.mark.parametrize("route", ["torch", "onnx", "onnx-dynamo"])
def test_streaming_vad_state_round_trip(route, tmp_path):
    """Two chunks, the state of the first fed back into the second, against PyTorch."""
    mod, _ = _compile_route("streaming_vad", route, tmp_path)
    model, (chunk, h, c) = zoo_model("streaming_vad")
    assert [s.name for s in mod.inputs][:1] and len(mod.inputs) == 3
    nxt = torch.randn(chunk.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want1 = model(chunk, h, c)
        want2 = model(nxt, want1[1], want1[2])
    got1 = mod(chunk.numpy(), h.numpy(), c.numpy())
    got2 = mod(nxt.numpy(), got1[1], got1[2])
    assert_close(got1, tuple(w.numpy() for w in want1), what=f"first chunk via {route}")
    assert_close(got2, tuple(w.numpy() for w in want2), what=f"second chunk via {route}")


def test_onnx_backend_freezes_inputs_and_skips_their_values():
    """``KilnBackend.prepare(model, constant_inputs=...)``: a conformance case that passes ``k`` as an
    input (TopK) compiles with it frozen, and ``run`` takes the case's full input list."""
    from onnx.backend.test.case.node import collect_testcases

    from compiler.onnx_backend import KilnBackend, compare

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case = next(c for c in collect_testcases("") if c.name == "test_top_k")
    inputs, expected = case.data_sets[0]
    rep = KilnBackend.prepare(case.model, constant_inputs={"k": inputs[1]})
    assert [s.name for s in rep.module.inputs] == ["x"]
    compare(rep.run(inputs), expected, case.rtol, case.atol)
