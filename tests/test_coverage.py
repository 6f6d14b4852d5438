"""Architectures that failed to compile with internal errors, each through the PyTorch and ONNX routes,
compared with PyTorch; and that TVM's layout conversion no longer gives up on them (a silent fallback
to the model's own layouts costs speed)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, export_onnx, run_torch

import compiler
from compiler import zoo


class Conv1dStack(torch.nn.Module):
    """A voice-activity front end: reflect pad, a strided "STFT" convolution, magnitude of its two
    halves, four 1-D convolutions, squeeze(-1). Each convolution compiled alone; the chain hit
    ``std::bad_alloc`` in TVM's layout conversion (squeeze with a negative axis)."""

    def __init__(self):
        super().__init__()
        self.stft = torch.nn.Conv1d(1, 258, 256, stride=128)
        self.c1 = torch.nn.Conv1d(129, 128, 3, padding=1)
        self.c2 = torch.nn.Conv1d(128, 64, 3, stride=2, padding=1)
        self.c3 = torch.nn.Conv1d(64, 64, 3, stride=2, padding=1)
        self.c4 = torch.nn.Conv1d(64, 128, 3, padding=1)

    def forward(self, x):
        y = self.stft(F.pad(x.unsqueeze(1), (0, 64), mode="reflect"))
        mag = torch.sqrt(y[:, :129] ** 2 + y[:, 129:] ** 2)
        h = torch.relu(self.c1(mag))
        h = torch.relu(self.c2(h))
        h = torch.relu(self.c3(h))
        return torch.relu(self.c4(h)).squeeze(-1)


def _zoo(name: str):
    return lambda: zoo.load(name)


def _local(cls, shape):
    def build():
        torch.manual_seed(0)
        return cls().eval(), (torch.randn(*shape),)

    return build


_MODELS = {
    "conv1d_stack": _local(Conv1dStack, (1, 576)),
    # zoo families that broke (vit: std::bad_alloc) or were missing; rnet: torch's decomposed PReLU
    "vit": _zoo("vit"),
    "mobilenetv3": _zoo("mobilenetv3"),
    "efficientnet": _zoo("efficientnet"),
    "rnet": _zoo("rnet"),
    "yolo11": _zoo("yolo11"),
}
#: Long compiles (a minute or more on two cores) run with the slow set only.
_SLOW = {"yolo11"}
ROUTES = ["torch", "onnx", "onnx-dynamo"]


def _cases():
    for name in sorted(_MODELS):
        for route in ROUTES:
            slow = name in _SLOW or route == "onnx-dynamo"
            yield pytest.param(name, route, marks=[pytest.mark.slow] if slow else [], id=f"{name}-{route}")


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("name,route", list(_cases()))
def test_architecture_compiles_with_target_layouts_and_matches(name, route, tmp_path, caplog):
    model, inputs = _MODELS[name]()
    with caplog.at_level(logging.WARNING, logger="compiler.pipeline"):
        if route == "torch":
            mod = compiler.compile(model, target="x86", example_inputs=inputs)
        elif route == "onnx":
            mod = compiler.compile(export_onnx(model, inputs, tmp_path / f"{name}.onnx"), target="x86")
        else:
            path = tmp_path / f"{name}.onnx"
            torch.onnx.export(model, inputs, str(path), dynamo=True, opset_version=18, external_data=False)
            mod = compiler.compile(str(path), target="x86")
    assert not [r for r in caplog.records if "layout conversion failed" in r.getMessage()]
    gen = torch.Generator().manual_seed(5)
    fresh = tuple(torch.randn(x.shape, generator=gen) for x in inputs)
    assert_close(mod(*[x.numpy() for x in fresh]), run_torch(model, fresh), what=f"{name} via {route}")
