"""Shared fixtures and helpers: each zoo model is built once, each compile happens once per session.

Helpers (import them with ``from conftest import ...``):

* :func:`assert_close` — compare Kiln's output with a reference (rtol 1e-4 for FP32, atol scaled to
  the reference's magnitude, since absolute error grows with the size of the values);
* :func:`export_onnx` — ``torch.onnx.export`` with the TorchScript exporter at opset 17;
* :func:`run_torch`, :func:`run_ort` — the reference outputs as NumPy arrays.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

RTOL = 1e-4
#: atol = ATOL_SCALE * max|reference|: FP32 rounding differences grow with the magnitude of values.
ATOL_SCALE = 1e-4
REPO = Path(__file__).resolve().parents[1]


def assert_close(got, want, rtol: float = RTOL, atol_scale: float = ATOL_SCALE, what: str = "") -> None:
    """``got`` matches ``want`` (arrays, or tuples of arrays) in shape, dtype kind and value."""
    if isinstance(want, (tuple, list)):
        assert isinstance(got, tuple), f"{what}: expected a tuple of {len(want)} outputs, got {type(got)}"
        assert len(got) == len(want), f"{what}: {len(got)} outputs, expected {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, rtol, atol_scale, f"{what}[{i}]")
        return
    want = np.asarray(want)
    assert isinstance(got, np.ndarray), f"{what}: expected a numpy array, got {type(got)}"
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    assert np.isfinite(got).all(), f"{what}: non-finite values in the output"
    atol = atol_scale * max(float(np.max(np.abs(want))) if want.size else 0.0, 1e-3)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


def run_torch(model, inputs) -> np.ndarray | tuple[np.ndarray, ...]:
    import torch

    with torch.no_grad():
        out = model.eval()(*inputs)
    if isinstance(out, (tuple, list)):
        return tuple(o.detach().numpy() for o in out)
    return out.detach().numpy()


def export_onnx(model, inputs, path, **kwargs) -> str:
    """Export with the TorchScript exporter (``dynamo=False``) at opset 17."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), tuple(inputs), str(path), dynamo=False, opset_version=17, **kwargs)
    return str(path)


def run_ort(model, feeds: dict) -> list[np.ndarray]:
    import onnx
    import onnxruntime as ort

    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)


def onnx_input_names(path) -> list[str]:
    import onnx

    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def numpy_inputs(inputs) -> list[np.ndarray]:
    return [x.detach().numpy() if hasattr(x, "detach") else np.asarray(x) for x in inputs]


def run_fresh_python(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter (it has never seen the model); fail with its stderr."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(REPO))
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


# ---------------------------------------------------------------- zoo models, built and compiled once


@functools.lru_cache(maxsize=None)
def zoo_model(name: str, seed: int = 0):
    """``(model, example_inputs)`` of a zoo model; built once per session (do not mutate it)."""
    from compiler import zoo

    return zoo.load(name, seed=seed)


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="session")
def zoo_onnx(onnx_dir):
    """``zoo_onnx(name)``: the zoo model exported to ONNX (static shapes), exported once."""
    paths: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in paths:
            model, inputs = zoo_model(name)
            paths[name] = export_onnx(model, inputs, onnx_dir / f"{name}.onnx")
        return paths[name]

    return get


@pytest.fixture(scope="session")
def compiled_zoo(zoo_onnx):
    """``compiled_zoo(name, route)``: the zoo model compiled for x86 through ``route`` ("torch" or
    "onnx"), compiled once per session and shared between test files."""
    import compiler

    cache: dict[tuple[str, str], object] = {}

    def get(name: str, route: str = "torch"):
        key = (name, route)
        if key not in cache:
            model, inputs = zoo_model(name)
            if route == "torch":
                cache[key] = compiler.compile(model, "x86", example_inputs=inputs)
            elif route == "onnx":
                cache[key] = compiler.compile(zoo_onnx(name), "x86")
            else:
                raise ValueError(route)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_cnn_so(compiled_zoo, tmp_path_factory) -> Path:
    """zoo tiny_cnn compiled for x86 and exported to a .so (shared by API, CLI and error tests)."""
    path = tmp_path_factory.mktemp("modules") / "tiny_cnn.so"
    compiled_zoo("tiny_cnn").export(path)
    return path


@pytest.fixture(scope="session")
def tuned_logs(tmp_path_factory) -> Path:
    """``kiln tune zoo:mlp --trials 3 --log-dir DIR`` (one trial per kernel, about a minute), once per
    session; read-only: copy it before changing anything."""
    import contextlib
    import io

    from compiler import cli

    root = tmp_path_factory.mktemp("tuning") / "logs"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["tune", "zoo:mlp", "--target", "x86", "--trials", "3", "--log-dir", str(root)])
    assert code == 0, out.getvalue()
    assert "tuned zoo:mlp" in out.getvalue() and "--tuning-logs" in out.getvalue()
    return root
