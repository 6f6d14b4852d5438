"""The ``kiln`` command line: ``compiler.cli.main`` in-process, and the installed entry point once.

Outputs written by ``kiln run`` are compared with PyTorch on the same inputs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import targets
from compiler import cli, zoo
from conftest import assert_close, export_onnx, run_ort, run_torch, zoo_model

COMMANDS = ["compile", "run", "info", "targets"]


def kiln(capsys, *argv) -> tuple[int, str, str]:
    """Run ``kiln ARGV`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse: --help, usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _kiln_executable() -> str:
    exe = Path(sys.executable).with_name("kiln")
    found = str(exe) if exe.exists() else shutil.which("kiln")
    assert found, "the `kiln` console script is not installed (pip install -e .)"
    return found


@pytest.fixture(scope="module")
def cli_module(tmp_path_factory):
    """``kiln compile zoo:tiny_cnn -o tiny.so --summary``, once for this file."""
    import contextlib
    import io

    path = tmp_path_factory.mktemp("cli") / "tiny.so"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["compile", "zoo:tiny_cnn", "-o", str(path), "--summary"])
    return code, out.getvalue(), path


# ---------------------------------------------------------------- targets


def test_targets_lists_every_description(capsys):
    code, out, err = kiln(capsys, "targets")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["name", "family", "cpu"]
    first_column = [line.split()[0] for line in lines[1:]]
    for name in ("x86", "haswell", "skylake-avx512", "znver3", "znver4", "sapphirerapids"):
        assert name in first_column
    assert sorted(first_column) == sorted(d.name for d in targets.all_descriptions())
    host = next(line for line in lines if line.split()[0] == "x86")
    assert targets.host_description().cpu in host
    hsw = next(line for line in lines if line.split()[0] == "haswell")
    assert "avx2" in hsw and "256b" in hsw


# ---------------------------------------------------------------- compile and run


def test_compile_zoo_model(cli_module):
    code, out, path = cli_module
    assert code == 0
    assert path.exists() and path.stat().st_size > 10_000
    assert f"wrote {path}" in out
    assert "fused kernels" in out and "conv2d" in out  # --summary


def test_run_with_inputs_and_outputs(cli_module, capsys, tmp_path):
    _, _, so = cli_module
    model, (x,) = zoo_model("tiny_cnn")
    x = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    np.savez(tmp_path / "in.npz", x=x.numpy())
    code, out, err = kiln(capsys, "run", so, "--inputs", tmp_path / "in.npz", "--outputs", tmp_path / "out.npz")
    assert code == 0, err
    with np.load(tmp_path / "out.npz") as data:
        assert len(data.files) == 1
        got = data[data.files[0]]
    assert_close(got, run_torch(model, (x,)))
    assert "[1, 10]" in out and "wrote" in out
    # a single array under another name is taken as the only input
    np.savez(tmp_path / "in2.npz", whatever=x.numpy())
    code, _, err = kiln(capsys, "run", so, "--inputs", tmp_path / "in2.npz", "--outputs", tmp_path / "out2.npz")
    assert code == 0, err
    with np.load(tmp_path / "out2.npz") as data:
        np.testing.assert_array_equal(data[data.files[0]], got)


def test_run_random_inputs_prints_shapes(cli_module, capsys):
    _, _, so = cli_module
    code, out, err = kiln(capsys, "run", so, "--benchmark", "3")
    assert code == 0, err
    assert "random inputs" in out
    assert "input  x: [1, 3, 32, 32] float32" in out
    assert "output" in out and "[1, 10] float32" in out
    assert "latency: median" in out and "(3 runs)" in out


def test_run_profile_prints_kernel_table(cli_module, capsys, tmp_path):
    _, _, so = cli_module
    code, out, err = kiln(capsys, "run", so, "--profile")
    assert code == 0, err
    assert "Profile of" in out and "GFLOP/s" in out and "fused_conv2d" in out and "VM built-ins" in out
    np.savez(tmp_path / "in.npz", x=np.ones((1, 3, 32, 32), np.float32))
    code, out, err = kiln(capsys, "run", so, "--inputs", tmp_path / "in.npz", "--profile")
    assert code == 0 and "fused_conv2d" in out, err


def test_run_wrong_input_shape_fails_cleanly(cli_module, capsys, tmp_path):
    _, _, so = cli_module
    np.savez(tmp_path / "bad.npz", x=np.zeros((1, 3, 31, 32), np.float32))
    code, out, err = kiln(capsys, "run", so, "--inputs", tmp_path / "bad.npz")
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "'x'" in err and "[1, 3, 31, 32]" in err and "[1, 3, 32, 32]" in err


def test_installed_entry_point(cli_module, tmp_path):
    """The ``kiln`` executable in a fresh process: runs the module and writes correct outputs."""
    _, _, so = cli_module
    model, (x,) = zoo_model("tiny_cnn")
    np.savez(tmp_path / "in.npz", x=x.numpy())
    proc = subprocess.run([_kiln_executable(), "run", str(so), "--inputs", str(tmp_path / "in.npz"),
                           "--outputs", str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "out.npz") as data:
        assert_close(data[data.files[0]], run_torch(model, (x,)))
    bad = subprocess.run([_kiln_executable(), "compile", "zoo:tiny_cnn", "-t", "x68", "-o", str(tmp_path / "n.so")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "Did you mean 'x86'?" in bad.stderr and "Traceback" not in bad.stderr


def test_compile_dynamic_batch_onnx_with_input_shape(capsys, tmp_path):
    model, (x,) = zoo_model("tiny_cnn")
    onnx_path = export_onnx(model, (x,), tmp_path / "dyn.onnx", input_names=["image"],
                            dynamic_axes={"image": {0: "batch"}})
    # without the shape: a clean error that says how to pass it
    code, _, err = kiln(capsys, "compile", onnx_path, "-o", tmp_path / "no.so")
    assert code == 1 and "--input-shape image:1x3x32x32" in err and "Traceback" not in err
    assert not (tmp_path / "no.so").exists()

    code, out, err = kiln(capsys, "compile", onnx_path, "--input-shape", "image:2x3x32x32", "-o", tmp_path / "dyn.so")
    assert code == 0, err
    xs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    np.savez(tmp_path / "in.npz", image=xs.numpy())
    code, out, err = kiln(capsys, "run", tmp_path / "dyn.so", "--inputs", tmp_path / "in.npz",
                          "--outputs", tmp_path / "out.npz")
    assert code == 0, err
    with np.load(tmp_path / "out.npz") as data:
        got = data[data.files[0]]
    assert got.shape == (2, 10)
    assert_close(got, run_torch(model, (xs,)))
    assert_close(got, run_ort(onnx_path, {"image": xs.numpy()})[0])


# ---------------------------------------------------------------- info


def test_info_zoo_model(capsys):
    code, out, err = kiln(capsys, "info", "zoo:tiny_cnn")
    assert code == 0, err
    model, _ = zoo_model("tiny_cnn")
    assert "input  x: [1, 3, 32, 32] float32" in out
    assert "conv2d" in out and "relu" in out and "matmul" in out  # operators
    assert "batch_norm" not in out.split("fused kernels")[1]
    total = next(line for line in out.splitlines() if line.startswith("total"))
    params = sum(p.numel() for p in model.parameters())  # the model's own count, before folding
    assert f"{params:,}" in total
    assert "MFLOP" in out and "FLOPs" in out
    kernels = out.split("fused kernels for target x86")[1]
    assert sum("conv2d" in line and "relu" in line for line in kernels.splitlines()) == 3


def test_info_lists_zoo(capsys):
    code, out, _ = kiln(capsys, "info", "zoo:")
    assert code == 0
    for name in zoo.names():
        assert name in out


# ---------------------------------------------------------------- help and failures


@pytest.mark.parametrize("argv", [["--help"]] + [[c, "--help"] for c in COMMANDS], ids=lambda a: " ".join(a))
def test_help_exits_zero(capsys, argv):
    code, out, _ = kiln(capsys, *argv)
    assert code == 0
    assert "usage: kiln" in out


def test_tune_takes_compiles_precision_options(capsys, tmp_path):
    """``kiln tune`` lowers the model at the precision the compile will use: it lists --precision and
    --calibration, and refuses an unknown precision before any work, naming the choices."""
    code, out, _ = kiln(capsys, "tune", "--help")
    assert code == 0 and "--precision" in out and "--calibration" in out and "int8" in out
    code, _, err = kiln(capsys, "tune", "zoo:mlp", "--precision", "int4", "--log-dir", tmp_path / "logs")
    assert code == 2 and "--precision" in err and "invalid choice: 'int4'" in err and "fp16" in err
    assert not (tmp_path / "logs").exists()


def test_no_command_is_a_usage_error(capsys):
    code, _, err = kiln(capsys)
    assert code == 2 and "usage: kiln" in err


def test_unknown_target_exit_code(capsys, tmp_path):
    code, out, err = kiln(capsys, "compile", "zoo:tiny_cnn", "--target", "x68", "-o", tmp_path / "x.so")
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "'x68'" in err and "Did you mean 'x86'?" in err and "haswell" in err
    assert not (tmp_path / "x.so").exists()
    assert "compiling" not in out  # the target is checked before any work


def test_missing_files_exit_code(capsys, tmp_path):
    for argv in (["compile", tmp_path / "nope.onnx", "-o", tmp_path / "x.so"],
                 ["run", tmp_path / "nope.so"],
                 ["info", tmp_path / "nope.onnx"]):
        code, _, err = kiln(capsys, *argv)
        assert code == 1, argv
        assert "nope" in err and "Traceback" not in err and err.count("\n") == 1, err


def test_unknown_zoo_model_exit_code(capsys):
    code, _, err = kiln(capsys, "info", "zoo:resnet19")
    assert code == 1 and "Did you mean 'resnet18'?" in err


@pytest.mark.parametrize("shape", ["image1x3x32x32", "image:1x3xbx32", "image:1x0x32", ":1x3", "image:"])
def test_bad_input_shape_is_usage_error(capsys, tmp_path, shape):
    code, _, err = kiln(capsys, "compile", "zoo:tiny_cnn", "--input-shape", shape, "-o", tmp_path / "x.so")
    assert code == 2
    assert "--input-shape" in err and repr(shape) in err and "NAME:DIMxDIM" in err


def test_verbose_shows_traceback(capsys, tmp_path):
    from compiler.errors import UnknownTargetError

    with pytest.raises(UnknownTargetError):
        cli.main(["-v", "compile", "zoo:tiny_cnn", "-t", "x68", "-o", str(tmp_path / "x.so")])


def test_compile_and_export_keep_tvm_log_out_of_the_console(tmp_path):
    """TVM's native warnings ("Scope Saving", "Fast mode segfaults ...") go to the kiln.tvm logger at
    DEBUG; a plain compile prints only Kiln's own lines, and -vv shows TVM's again."""
    out = tmp_path / "bert.so"
    r = subprocess.run([sys.executable, "-m", "compiler", "compile", "zoo:bert", "-o", str(out)],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr[-2000:]
    code = ("import logging, sys, compiler; from compiler import zoo\n"
            "logging.basicConfig(); logging.getLogger('kiln.tvm').setLevel(logging.DEBUG)\n"
            "m, x = zoo.load('bert'); compiler.compile(m, 'x86', example_inputs=x).export(sys.argv[1])\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "b2.so")], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert r.returncode == 0 and "Scope Saving" in r.stderr, r.stderr[-2000:]  # asked for: shown
