"""Every user mistake Kiln recognises raises the right ``KilnError`` subclass with a message that
names the bad value (and the valid choices), in the API and as one clean line from the CLI.

ONNX-frontend details (dangling names, dtype overrides, converter failures) are covered in
test_onnx_frontend.py; here each error goes through ``compiler.compile``/``compiler.load``/the CLI.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

import compiler
import compiler.artifact
import targets
from compiler import cli
from compiler.errors import (IncompatibleModuleError, InputShapeError, KilnError, ModelFormatError, TargetError,
                             UnknownTargetError, UnsupportedOperatorError)
from conftest import export_onnx, zoo_model


def _cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _assert_one_clean_line(err: str) -> None:
    assert err.count("\n") == 1, err
    assert "Traceback" not in err and err.startswith("kiln ")


@pytest.fixture(scope="module")
def good_onnx(tmp_path_factory) -> Path:
    model, inputs = zoo_model("mlp")
    return Path(export_onnx(model, inputs, tmp_path_factory.mktemp("err") / "mlp.onnx"))


# ---------------------------------------------------------------- malformed models


@pytest.mark.parametrize("cut", ["half", "tail", "head"])
def test_truncated_onnx(good_onnx, tmp_path, capsys, cut):
    data = good_onnx.read_bytes()
    n = {"half": len(data) // 2, "tail": len(data) - 5, "head": 12}[cut]
    bad = tmp_path / f"truncated_{cut}.onnx"
    bad.write_bytes(data[:n])
    with pytest.raises(ModelFormatError) as info:
        compiler.compile(str(bad))
    assert "truncated_" in str(info.value)
    code, err = _cli(capsys, "compile", bad, "-o", tmp_path / "x.so")
    assert code == 1
    _assert_one_clean_line(err)
    assert str(bad) in err
    assert not (tmp_path / "x.so").exists()


def test_garbage_onnx_through_cli(tmp_path, capsys):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ModelFormatError):
        compiler.compile(bad)
    code, err = _cli(capsys, "info", bad)
    assert code == 1
    _assert_one_clean_line(err)
    assert "garbage.onnx" in err


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelFormatError, match="nope.onnx"):
        compiler.compile(str(tmp_path / "nope.onnx"))


def test_wrong_kind_of_model():
    with pytest.raises(ModelFormatError) as info:
        compiler.compile(42)
    msg = str(info.value)
    assert "int" in msg and "torch.nn.Module" in msg and "ONNX" in msg and "zoo:" in msg


# ---------------------------------------------------------------- unsupported operators


class FFTModel(torch.nn.Module):
    def forward(self, x):
        return torch.fft.fft(x).real + 1


def test_unsupported_torch_operator():
    with pytest.raises(UnsupportedOperatorError) as info:
        compiler.compile(FFTModel(), example_inputs=(torch.randn(4, 8),))
    err = info.value
    assert isinstance(err, KilnError)
    msg = str(err)
    assert "PyTorch" in msg and "fft" in msg
    ops = {op for op, _ in err.ops}
    assert any("fft" in op for op in ops), ops
    # every listed operator carries the graph node it came from
    assert all(node for _, node in err.ops), err.ops
    assert "<unnamed>" not in msg


def test_two_unsupported_onnx_operators_named_at_once(tmp_path, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="ok_relu"),
             helper.make_node("Frobnicate", ["a"], ["b"], name="frob_node"),
             helper.make_node("Sigmoid", ["b"], ["c"], name="ok_sigmoid"),
             helper.make_node("Wibble", ["c"], ["y"], name="wibble_node")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedOperatorError) as info:
        compiler.compile(model)
    msg = str(info.value)
    for part in ("Frobnicate", "Wibble", "frob_node", "wibble_node", "2 unsupported"):
        assert part in msg
    assert "ok_relu" not in msg and "ok_sigmoid" not in msg

    import onnx

    path = tmp_path / "two_ops.onnx"
    onnx.save(model, path)
    code, err = _cli(capsys, "compile", path, "-o", tmp_path / "x.so")
    assert code == 1
    _assert_one_clean_line(err)
    assert "Frobnicate" in err and "Wibble" in err


# ---------------------------------------------------------------- shapes and inputs


def test_symbolic_onnx_input_needs_a_shape(tmp_path):
    model, inputs = zoo_model("mlp")
    path = export_onnx(model, inputs, tmp_path / "dyn.onnx", input_names=["features"],
                       dynamic_axes={"features": {0: "batch"}})
    with pytest.raises(InputShapeError) as info:
        compiler.compile(path)
    msg = str(info.value)
    assert "'features'" in msg and "batch" in msg
    assert "input_shapes={'features': (1, 64)}" in msg and "--input-shape features:1x64" in msg
    with pytest.raises(InputShapeError) as info:
        compiler.compile(path, input_shapes={"feature": (1, 64)})
    assert "'feature'" in str(info.value) and "Did you mean 'features'?" in str(info.value)
    with pytest.raises(InputShapeError, match="dimension 1"):
        compiler.compile(path, input_shapes={"features": (1, 65)})


def test_module_without_example_inputs():
    with pytest.raises(InputShapeError) as info:
        compiler.compile(torch.nn.Linear(3, 2))
    assert "example_inputs" in str(info.value)


def test_wrong_inputs_to_run(compiled_zoo):
    mod = compiled_zoo("mlp")
    good = np.zeros((1, 64), np.float32)
    with pytest.raises(InputShapeError) as info:
        mod.run(np.zeros((2, 64), np.float32))
    msg = str(info.value)
    assert "'x'" in msg and "[2, 64]" in msg and "[1, 64]" in msg
    with pytest.raises(InputShapeError, match=r"takes 1 input\(s\) \(x\); got 2"):
        mod.run(good, good)
    with pytest.raises(InputShapeError, match=r"takes 1 input"):
        mod.run()
    with pytest.raises(InputShapeError) as info:
        mod.run(y=good)
    assert "'y'" in str(info.value) and "'x'" in str(info.value)
    with pytest.raises(InputShapeError, match="complex128.*float32"):
        mod.run(good.astype(np.complex128))
    with pytest.raises(InputShapeError):
        mod.benchmark(np.zeros((1, 63), np.float32), repeat=1)


# ---------------------------------------------------------------- targets


def test_unknown_target_suggests_closest():
    with pytest.raises(UnknownTargetError) as info:
        compiler.compile("zoo:tiny_cnn", target="x68")
    err = info.value
    assert isinstance(err, KilnError)
    assert "'x68'" in str(err) and "Did you mean 'x86'?" in str(err)
    for name in ("x86", "haswell", "znver4", "sapphirerapids"):
        assert name in err.known and name in str(err)
    with pytest.raises(UnknownTargetError, match="Did you mean 'znver3'"):
        targets.get("znver33")


def test_target_kind_not_buildable_is_a_target_error():
    """A description whose family/kind pair has no pipeline is refused up front and clearly (every shipped
    target builds: x86, ARM, MCU, CUDA)."""
    odd = dataclasses.replace(targets.get("h100"), name="odd-gpu", kind="llvm")
    with pytest.raises(TargetError) as info:
        compiler.compile(torch.nn.Linear(3, 2), target=odd, example_inputs=(torch.randn(1, 3),))
    assert "'odd-gpu'" in str(info.value) and "x86" in str(info.value)


def _write_toml(tmp_path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


GOOD_TOML = 'name = "t"\nfamily = "x86"\nkind = "llvm"\ntriple = "x86_64-linux-gnu"\ncpu = "haswell"\n'


def test_target_toml_errors(tmp_path):
    assert targets._load_file(_write_toml(tmp_path, GOOD_TOML)).cpu == "haswell"
    with pytest.raises(TargetError) as info:  # a typo'd key
        targets._load_file(_write_toml(tmp_path, GOOD_TOML + "vector_bitz = 256\n"))
    assert "vector_bitz" in str(info.value) and "vector_bits" in str(info.value) and "bad.toml" in str(info.value)
    with pytest.raises(TargetError) as info:  # a missing required key
        targets._load_file(_write_toml(tmp_path, GOOD_TOML.replace('kind = "llvm"\n', "")))
    assert "'kind'" in str(info.value)
    with pytest.raises(TargetError) as info:  # not TOML at all
        targets._load_file(_write_toml(tmp_path, GOOD_TOML + "cores = [4\n"))
    assert "bad.toml" in str(info.value)


@pytest.mark.parametrize("line", ['cores = "eight"', 'features = "avx2"', "vector_bits = 25.6", "name = 3"])
def test_target_toml_wrong_value_type(tmp_path, line):
    """A value of the wrong type is a TargetError naming the key, not a description that breaks later
    (``features = "avx2"`` would make ``has("avx")`` true: substring of a string)."""
    key = line.split()[0]
    text = "\n".join(row for row in GOOD_TOML.splitlines() if not row.startswith(key + " ")) + "\n" + line + "\n"
    with pytest.raises(TargetError) as info:
        targets._load_file(_write_toml(tmp_path, text))
    assert repr(key) in str(info.value) or key in str(info.value)


# ---------------------------------------------------------------- loading modules


def test_load_module_for_another_architecture(tiny_cnn_so, tmp_path, capsys):
    data = bytearray(tiny_cnn_so.read_bytes())
    assert data[:4] == b"\x7fELF" and data[18:20] == (62).to_bytes(2, "little")
    data[18:20] = (183).to_bytes(2, "little")  # EM_AARCH64
    arm = tmp_path / "arm.so"
    arm.write_bytes(bytes(data[:-compiler.artifact._SEAL_LEN]))
    compiler.artifact.seal(arm)  # a well-formed module for another architecture, not a damaged one
    with pytest.raises(IncompatibleModuleError) as info:
        compiler.load(arm)
    msg = str(info.value)
    assert "aarch64" in msg and "x86_64" in msg and "arm.so" in msg
    code, err = _cli(capsys, "run", arm)
    assert code == 1 and "aarch64" in err
    _assert_one_clean_line(err)


def _tiny_compiled():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    return model, torch.randn(1, 4)


def test_load_module_from_another_kiln_version(tmp_path, monkeypatch):
    model, x = _tiny_compiled()
    import compiler.artifact

    monkeypatch.setattr(compiler.artifact, "__version__", "9.9.0")
    compiler.compile(model, example_inputs=(x,)).export(tmp_path / "future.so")
    monkeypatch.setattr(compiler.artifact, "__version__", "0.1.7")  # same minor: compatible
    compiler.compile(model, example_inputs=(x,)).export(tmp_path / "patch.so")
    monkeypatch.undo()

    with pytest.raises(IncompatibleModuleError) as info:
        compiler.load(tmp_path / "future.so")
    msg = str(info.value)
    assert "9.9.0" in msg and compiler.__version__ in msg and "recompile" in msg
    same_minor = compiler.load(tmp_path / "patch.so")
    np.testing.assert_allclose(same_minor(x.numpy()), model(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_load_module_needing_cpu_features_this_machine_lacks(tmp_path):
    model, x = _tiny_compiled()
    host = targets.host_description()
    future = dataclasses.replace(host, name="future-x86", host=False, features=host.features + ("avx10.2",))
    compiler.compile(model, target=future, example_inputs=(x,)).export(tmp_path / "future.so")
    with pytest.raises(IncompatibleModuleError) as info:
        compiler.load(tmp_path / "future.so")
    assert "avx10.2" in str(info.value) and "future-x86" in str(info.value)


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_load_shared_library_not_from_kiln(tmp_path, capsys):
    src = tmp_path / "plain.c"
    src.write_text("int answer(void) { return 42; }\n")
    lib = tmp_path / "plain.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    with pytest.raises(IncompatibleModuleError) as info:
        compiler.load(lib)
    assert "plain.so" in str(info.value) and "no Kiln metadata" in str(info.value)
    code, err = _cli(capsys, "run", lib)
    assert code == 1
    _assert_one_clean_line(err)


def test_load_non_elf_file(tmp_path):
    for name, data in (("text.so", b"hello, I am not a library\n" * 10), ("empty.so", b""), ("short.so", b"\x7fEL")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ModelFormatError) as info:
            compiler.load(path)
        assert name in str(info.value) and "ELF" in str(info.value)
    with pytest.raises(ModelFormatError, match="missing.so"):
        compiler.load(tmp_path / "missing.so")


def test_load_corrupt_metadata(tiny_cnn_so, tmp_path):
    data = bytearray(tiny_cnn_so.read_bytes())
    start = data.find(b"KILN-METADATA-V1:") + len(b"KILN-METADATA-V1:")
    data[start:start + 8] = b"!!!!!!!!"  # not base64 / not JSON any more
    bad = tmp_path / "corrupt.so"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError) as info:
        compiler.load(bad)
    assert "corrupt.so" in str(info.value) and "metadata" in str(info.value)
