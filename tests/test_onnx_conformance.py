"""ONNX's own operator conformance cases (shipped inside the onnx wheel) through Kiln's ONNX backend.

Every case is an ONNX model with inputs and expected outputs; ``compiler.onnx_backend.KilnBackend`` is
the standard ``onnx.backend.base.Backend`` interface, and outputs are compared exactly as ONNX's
backend test runner compares them. ``scripts/onnx_conformance.py`` runs the whole collection and
tabulates it (with ``--ort`` next to ONNX Runtime).

The quick set holds the cases that were silent wrong answers or killed the compiling process; the
``slow`` test runs all of the collection (about 5 minutes on 2 cores), each case in a forked child,
and asserts that none dies, none returns wrong numbers without an error, and every failure is a
``KilnError``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import compiler
from compiler.errors import UnsupportedOperatorError
from compiler.onnx_backend import KilnBackend, compare


def _collect():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the collection's own NumPy overflow warnings
        from onnx.backend.test.case.node import collect_testcases

        return {c.name: c for c in collect_testcases("")}


CASES = _collect()

#: Outputs that came back wrong without any error, or compiles that killed the process (SIGFPE), with
#: what fixed them.
FIXED = {
    r"test_isinf_(positive|negative)": "IsInf's detect_positive/detect_negative (frontends/onnx_ops.py)",
    r"test_spacetodepth_crd_mode_example": "SpaceToDepth mode='CRD'",
    r"test_convtranspose_output_shape": "ConvTranspose output_shape",
    r"test_mod_float_edge_cases_fmod_0_float(16|32|64)": "float Mod: signs, zeros, infinities",
    r"test_mod_.*_mixed_sign_fmod_0": "float Mod with mixed signs",
    r"test_layer_normalization_\w+": "LayerNormalization's Mean and InvStdDev outputs",
    r"test_batchnorm_(example|epsilon)_training_mode": "BatchNormalization training_mode=1",
    r"test_split_to_sequence_nokeepdims": "sequence outputs come back as lists",
    r"test_attention_\w*(fp16|bf16)\w*_expanded": "half precision computed per operator in float32 (HalfComputeInFloat)",
    r"test_attention_\w*(nan_robustness|fullymasked|structural_empty|softmax_precision)\w*_expanded":
        "max of a row of -inf is -inf (compiler/legalize.py)",
    r"test_causal_conv_with_state_silu_fp16_expanded": "half precision convolution",
    r"test_dynamicquantizelinear\w*_expanded": "rank-0 stack killed ConvertLayout with SIGFPE (StackAsConcat)",
    r"test_(max|min|sum|mean)_(example|two_inputs)": "several-input Max/Min/Sum/Mean import as stacks",
    r"test_dropout_default(_mask)?(_ratio)?": "inference Dropout: identity and an all-true bool mask",
    r"test_clip_\w+": "rank-0 inputs stay rank 0",
}

#: Cases that are refused with an UnsupportedOperatorError naming the attribute, instead of a wrong answer.
REFUSED = {"test_roialign_mode_max": "mode='max'", "test_training_dropout": "training_mode"}


def _names(pattern: str) -> list[str]:
    found = sorted(n for n in CASES if re.fullmatch(pattern, n))
    assert found, f"no conformance case matches {pattern!r}"
    return found


FIXED_CASES = sorted({n for pattern in FIXED for n in _names(pattern)})


@pytest.mark.parametrize("name", FIXED_CASES)
def test_fixed_case(name):
    case = CASES[name]
    rep = KilnBackend.prepare(case.model)
    for inputs, expected in case.data_sets:
        compare(rep.run(inputs), expected, case.rtol, case.atol)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_case_names_the_attribute(name):
    with pytest.raises(UnsupportedOperatorError, match=re.escape(REFUSED[name])):
        KilnBackend.prepare(CASES[name].model)


def test_backend_interface_runs_named_inputs_and_reports_device():
    case = CASES["test_add"]
    rep = KilnBackend.prepare(case.model)
    inputs, expected = case.data_sets[0]
    names = [i.name for i in case.model.graph.input]
    compare(rep.run(dict(zip(names, inputs))), expected, case.rtol, case.atol)
    assert KilnBackend.supports_device("CPU") and not KilnBackend.supports_device("CUDA")


def test_a_converter_result_onnx_disagrees_with_is_refused(monkeypatch):
    """The importer checks every node's result against ONNX's shape inference: a converter that
    returns the wrong shape (as TVM's did for ConvTranspose's output_shape) is refused, not run."""
    from compiler.frontends import onnx_ops

    def wrong(bb, inputs, attr, opset, default):  # drops the last row, as a buggy converter might
        x = inputs[0]
        return onnx_ops.relax.op.strided_slice(x, axes=[0], begin=[0], end=[1])

    monkeypatch.setitem(onnx_ops.CONVERTERS, "Relu", wrong)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="the_relu")], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedOperatorError, match=r"Relu.*shape \(1, 3\), ONNX infers \(2, 3\).*the_relu"):
        compiler.compile(model, "x86", tuning_logs=False)


def test_data_dependent_output_shape_is_a_clear_error():
    with pytest.raises(compiler.errors.CompileError, match="'result' depends on the input data"):
        KilnBackend.prepare(CASES["test_nonzero_example"].model)


def test_internal_failure_names_the_stage_and_the_kernel(monkeypatch):
    """The last line of defence: an error escaping a step (here planted in scheduling) reaches the user
    as a CompileError naming the step and the fused kernel with its operators, the original kept as
    __cause__."""
    from compiler import pipeline

    real = pipeline.schedule

    def failing(mod, target, database=None):
        kernel = next(gv.name_hint for gv in mod.get_global_vars() if gv.name_hint != "main")
        raise RuntimeError(f"Check failed: (x) is false: in function {kernel}: something TVM did not expect")

    monkeypatch.setattr(pipeline, "schedule", failing)
    case = CASES["test_relu"]
    with pytest.raises(compiler.errors.CompileError, match=r"scheduling failed in kernel relu: "
                       r"RuntimeError: Check failed: \(x\) is false") as info:
        KilnBackend.prepare(case.model)
    assert isinstance(info.value.__cause__, RuntimeError)
    monkeypatch.setattr(pipeline, "schedule", real)


def test_max_of_minus_infinity_is_minus_infinity():
    """TVM started max reductions at -3.4e38 (min at +3.4e38): a fully masked attention row came out
    finite. Through both routes, against PyTorch and NumPy."""
    import torch

    class RowMax(torch.nn.Module):
        def forward(self, x):
            return torch.max(x, dim=1).values

    x = torch.tensor([[1.0, -float("inf"), 3.0], [-float("inf")] * 3, [float("inf")] * 3])
    mod = compiler.compile(RowMax(), "x86", example_inputs=(x,), tuning_logs=False)
    np.testing.assert_array_equal(mod(x.numpy()), RowMax()(x).numpy())

    graph = helper.make_graph(
        [helper.make_node("ReduceMax", ["x"], ["hi"], keepdims=0, axes=[1]),
         helper.make_node("ReduceMin", ["x"], ["lo"], keepdims=0, axes=[1])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("hi", onnx.TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("lo", onnx.TensorProto.FLOAT, [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    hi, lo = KilnBackend.run_model(model, [x.numpy()])
    np.testing.assert_array_equal(hi, x.numpy().max(axis=1))
    np.testing.assert_array_equal(lo, x.numpy().min(axis=1))


def test_stack_of_scalars_does_not_kill_the_process():
    """TVM 0.27's layout inference for relax.stack divides by zero on rank-0 inputs (SIGFPE) in every
    ConvertLayout call; Kiln rewrites stacks first. Run in a child process so a regression is a
    failure, not a dead test process."""
    script = textwrap.dedent("""
        import numpy as np, onnx
        from onnx import helper
        from compiler.onnx_backend import KilnBackend
        graph = helper.make_graph(
            [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
             helper.make_node("ReduceMin", ["x"], ["n"], keepdims=0),
             helper.make_node("Max", ["m", "n", "z"], ["y"])], "g",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [6]),
             helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        x, z = np.array([1, -2, 5, 0, 3, 4], np.float32), np.array(4.5, np.float32)
        print("RESULT", float(KilnBackend.run_model(model, [x, z])[0]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit status {proc.returncode} (negative: killed by that signal)\n{proc.stderr[-2000:]}"
    assert "RESULT 5.0" in proc.stdout


@pytest.mark.slow
def test_whole_collection_no_crash_no_silent_wrong_answer(tmp_path):
    """All of ONNX's node cases (about 1,900) through scripts/onnx_conformance.py, each compiled and run
    in a forked child of a fresh process: none may kill its process or time out, none may return wrong
    outputs without raising, and every failure must be a KilnError (a clear refusal), not another
    exception. The pass rate is in the README."""
    out = tmp_path / "cases.jsonl"
    script = Path(__file__).resolve().parent.parent / "scripts" / "onnx_conformance.py"
    proc = subprocess.run([sys.executable, str(script), "--timeout", "240", "--jsonl", str(out)],
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(CASES)
    bad = [f"{r['name']}: {r['kiln']} {r['message'][:160]}" for r in rows if r["kiln"] not in ("pass", "kiln_error")]
    assert not bad, f"{len(bad)} case(s) crashed, failed outside KilnError or were silently wrong:\n" + "\n".join(bad)
