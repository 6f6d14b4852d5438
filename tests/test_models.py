"""Every zoo model through both routes, compared with PyTorch (and ONNX Runtime for ONNX).

* PyTorch route: ``compiler.compile(module, example_inputs=...)``;
* ONNX route: ``torch.onnx.export(..., dynamo=False, opset_version=17)``, then compile the file.

The big models are ``slow``; tiny_cnn, mlp and lstm run in the quick set through both routes.
Each (model, route) is compiled once per session (``compiled_zoo`` in conftest) and run on the
example inputs and on fresh random inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_close, numpy_inputs, onnx_input_names, run_ort, run_torch, zoo_model

FAST = ["tiny_cnn", "mlp", "lstm"]
SLOW = ["resnet18", "mobilenetv2", "yolo", "bert"]
MODELS = [pytest.param(n, id=n) for n in FAST] + [pytest.param(n, id=n, marks=pytest.mark.slow) for n in SLOW]

pytestmark = pytest.mark.filterwarnings("ignore:The tensor attributes .*_flat_weights")  # nn.LSTM export


def _fresh_inputs(inputs, seed=123):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for x in inputs:
        if x.is_floating_point():
            out.append(torch.randn(x.shape, generator=gen, dtype=x.dtype))
        else:  # token ids: stay inside the vocabulary the examples were drawn from
            out.append(torch.randint(0, int(x.max()) + 1, x.shape, generator=gen, dtype=x.dtype))
    return tuple(out)


def _check_outputs_informative(got, want):
    """Guard against a comparison that passes trivially (all zeros, constant)."""
    assert float(np.std(want)) > 1e-3
    assert not np.allclose(got, got.flat[0])


@pytest.mark.parametrize("name", MODELS)
def test_torch_route(name, compiled_zoo):
    model, inputs = zoo_model(name)
    mod = compiled_zoo(name, "torch")
    assert [s.shape for s in mod.inputs] == [tuple(x.shape) for x in inputs]
    assert [s.dtype for s in mod.inputs] == [str(x.dtype).removeprefix("torch.") for x in inputs]
    for xs in (inputs, _fresh_inputs(inputs)):
        want = run_torch(model, xs)
        got = mod(*numpy_inputs(xs))
        assert_close(got, want, what=f"{name} (torch route)")
        _check_outputs_informative(got, want)


@pytest.mark.parametrize("name", MODELS)
def test_onnx_route(name, compiled_zoo, zoo_onnx):
    model, inputs = zoo_model(name)
    path = zoo_onnx(name)
    mod = compiled_zoo(name, "onnx")
    assert [s.name for s in mod.inputs] == onnx_input_names(path)
    for xs in (inputs, _fresh_inputs(inputs, seed=321)):
        arrays = numpy_inputs(xs)
        got = mod(*arrays)
        want_torch = run_torch(model, xs)
        (want_ort,) = run_ort(path, dict(zip(onnx_input_names(path), arrays)))
        assert_close(got, want_ort, what=f"{name} (onnx route) vs onnxruntime")
        assert_close(got, want_torch, what=f"{name} (onnx route) vs torch")
        _check_outputs_informative(got, want_torch)


@pytest.mark.parametrize("name", MODELS)
def test_routes_agree_on_structure(name, compiled_zoo):
    """Both routes compile the same network: same input/output shapes, and BatchNorm is folded."""
    a, b = compiled_zoo(name, "torch").summary(), compiled_zoo(name, "onnx").summary()
    assert [s.shape for s in a.inputs] == [s.shape for s in b.inputs]
    assert [s.shape for s in a.outputs] == [s.shape for s in b.outputs]
    for s in (a, b):
        assert s.flops > 0 and s.params > 0
        assert not any(op.startswith("batch_norm") for k in s.kernels for op in k.ops)
    # the same convolutions and matmuls, whichever frontend: FLOPs within 10 %
    assert abs(a.flops - b.flops) <= 0.1 * max(a.flops, b.flops), (a.flops, b.flops)
