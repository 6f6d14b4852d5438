"""INT8 post-training quantization (compiler/quantize.py): calibration data, the rewrite, the stated
tolerance against FP32 on x86, precision validation and the CLI. The microcontroller builds of the
same models under QEMU are in ``test_mcu.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import compiler
import targets
from compiler import quantize
from compiler.errors import CompileError, InputShapeError, KilnError
from compiler.frontends import TensorSpec

#: The tolerance compiler/quantize.py states: relative L2 error of the int8 output against the FP32
#: output, on inputs like the calibration data, and top-1 agreement for classifiers.
MAX_REL_L2 = 0.05
MIN_TOP1 = 0.9


def rel_l2(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def calib_like(shape, n: int, seed: int) -> np.ndarray:
    """``n`` examples of ``shape`` (batch 1) from the distribution the tests calibrate on, stacked."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n,) + tuple(shape[1:]), generator=g).numpy()


# -- calibration data ------------------------------------------------------------------------------

SPEC = [TensorSpec("x", (1, 4), "float32")]


def test_calibration_forms_are_normalised_to_batches():
    one = np.ones((1, 4), "float32")
    assert len(quantize.calibration_batches([one, one, one], SPEC)) == 3
    assert len(quantize.calibration_batches(np.zeros((6, 4)), SPEC)) == 6  # stacked examples are split
    assert len(quantize.calibration_batches([(np.zeros((2, 4)),)], SPEC)) == 2  # tuples per batch
    assert len(quantize.calibration_batches({"x": np.zeros((5, 4))}, SPEC)) == 5  # an .npz-like mapping
    assert len(quantize.calibration_batches([torch.zeros(1, 4)], SPEC)) == 1
    (batch,) = quantize.calibration_batches([np.zeros((1, 4), "float64")], SPEC)
    assert batch[0].dtype == np.float32 and batch[0].shape == (1, 4)


def test_calibration_errors_name_the_problem():
    with pytest.raises(quantize.MissingCalibrationError, match="calibration"):
        quantize.calibration_batches(None, SPEC)
    with pytest.raises(quantize.MissingCalibrationError, match="empty"):
        quantize.calibration_batches([], SPEC)
    with pytest.raises(InputShapeError, match=r"\[1, 5\].*\[1, 4\]"):
        quantize.calibration_batches([np.zeros((1, 5))], SPEC)
    with pytest.raises(InputShapeError, match="takes 1 input"):
        quantize.calibration_batches([(np.zeros((1, 4)), np.zeros((1, 4)))], SPEC)
    with pytest.raises(InputShapeError, match="inputs are"):
        quantize.calibration_batches({"a": np.zeros((1, 4)), "b": np.zeros((1, 4))}, SPEC)


# -- precision validation ------------------------------------------------------------------------------

def test_int8_without_calibration_is_a_clear_error():
    model = torch.nn.Linear(4, 2).eval()
    for target in ("x86", "cortex-m4"):
        with pytest.raises(quantize.MissingCalibrationError, match=r"precision='int8' needs calibration") as err:
            compiler.compile(model, target=target, example_inputs=(torch.randn(1, 4),), precision="int8")
        assert isinstance(err.value, KilnError) and "--calibration" in str(err.value)


def test_calibration_without_int8_is_refused():
    with pytest.raises(CompileError, match="precision='int8' only"):
        compiler.compile(torch.nn.Linear(4, 2), target="x86", example_inputs=(torch.randn(1, 4),),
                         calibration=[np.zeros((1, 4), "float32")])


@pytest.mark.parametrize("target,precision,choices", [
    ("cortex-m4", "int4", ("fp32", "fp16", "int8")),  # unknown precision: every choice
    ("cortex-m4", "fp16", ("fp32", "int8")),  # known, not on this target: the target's choices
    ("h100", "int8", ("fp32", "fp16")),
])
def test_unsupported_precision_names_the_valid_choices(target, precision, choices):
    from compiler import precision as precisions

    with pytest.raises(KilnError) as err:
        precisions.check_precision(precision, targets.get(target))
    msg = str(err.value)
    assert repr(precision) in msg and all(c in msg for c in choices), msg


def test_int8_is_accepted_on_cpu_and_mcu_targets():
    from compiler import precision as precisions

    for name in ("x86", "rpi4", "cortex-m3", "cortex-m4", "cortex-m55"):
        precisions.check_precision("int8", targets.get(name))


# -- the rewrite, on x86 -----------------------------------------------------------------------------

def test_rewrite_quantizes_weights_per_channel_and_keeps_float_io():
    from compiler import pipeline

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    lowered = pipeline.lower(model, targets.get("cortex-m4"), example_inputs=(torch.randn(1, 8),))
    imported, prepared = lowered.imported, lowered.prepared
    qmod, report = quantize.quantize(prepared, calib_like((1, 8), 16, 0), imported.inputs)
    assert [op.split()[0] for op in report.ops] == ["matmul", "matmul"]
    assert all("int32 bias" in op for op in report.ops)
    assert list(report.activations.values())[0]["dtype"] == "int8"  # the (signed) model input
    assert any(a["dtype"] == "uint8" for a in report.activations.values())  # after the ReLU
    text = qmod["main"].script()
    assert 'out_dtype="int32"' in text and 'dtype="int8"' in text
    main = qmod["main"]
    ret = main.ret_ty.fields if hasattr(main.ret_ty, "fields") else [main.ret_ty]
    assert str(main.params[0].ty.dtype) == "float32" and all(str(r.dtype) == "float32" for r in ret)
    consts = [c for c in _constants(main) if str(c.ty.dtype) == "int8"]
    assert len(consts) == 2
    for c in consts:  # symmetric per output channel: every column reaches +-127
        w = c.value.numpy().astype(np.int32)
        assert np.all(np.abs(w).max(axis=0) == 127)


def _constants(func):
    from tvm import relax

    found = []

    def visit(e):
        if type(e).__name__ in ("GenericConst", "Constant"):
            found.append(e)
        elif isinstance(e, relax.Call):
            for a in e.args:
                visit(a)

    for block in func.body.blocks:
        for b in block.bindings:
            visit(b.value)
    return found


@pytest.mark.parametrize("name", ["mlp", "tiny_cnn"])
def test_int8_on_x86_within_the_stated_tolerance(name):
    from compiler import zoo

    model, inputs = zoo.load(name)
    shape = tuple(inputs[0].shape)
    q = compiler.compile(model, target="x86", example_inputs=inputs, precision="int8",
                         calibration=calib_like(shape, 32, 1))
    f = compiler.compile(model, target="x86", example_inputs=inputs)
    assert q.meta["precision"] == "int8" and q.meta["quantization"]["ops"]
    tests = calib_like(shape, 10, 2)
    errs, agree = [], 0
    for x in tests:
        x = x[None]
        got, want = q(x), f(x)
        assert got.dtype == np.float32 and got.shape == want.shape
        errs.append(rel_l2(got, want))
        agree += int(got.argmax() == want.argmax())
    print(f"{name} int8 vs fp32 on x86: rel L2 mean {np.mean(errs):.4f} max {max(errs):.4f}, top-1 {agree}/10")
    assert np.mean(errs) < MAX_REL_L2
    assert agree >= MIN_TOP1 * len(tests)


def test_cli_compiles_int8_with_a_calibration_npz(tmp_path, capsys):
    from compiler.cli import main

    np.savez(tmp_path / "calib.npz", x=calib_like((1, 64), 16, 3))
    out = tmp_path / "mlp_int8.so"
    assert main(["compile", "zoo:mlp", "--precision", "int8", "--calibration", str(tmp_path / "calib.npz"),
                 "-o", str(out), "--untuned"]) == 0
    assert compiler.load(out).meta["precision"] == "int8"
    assert main(["compile", "zoo:mlp", "--precision", "int8", "-o", str(tmp_path / "x.so"), "--untuned"]) == 1
    assert "needs calibration" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a calibration file that does not exist: usage error
        main(["compile", "zoo:mlp", "--precision", "int8", "--calibration", str(tmp_path / "nope.npz"),
              "-o", str(out)])
    assert exit_info.value.code == 2
