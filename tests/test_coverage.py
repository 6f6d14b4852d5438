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


class TinyViT(torch.nn.Module):
    """Patch embedding (16x16 stride 16), class token, position embedding, a pre-norm GELU transformer
    encoder, linear head: ``std::bad_alloc`` at compile time before."""

    def __init__(self, d: int = 192):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, d, 16, stride=16)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = torch.nn.Parameter(torch.randn(1, 197, d) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(d, 3, 768, dropout=0.0, activation="gelu", batch_first=True,
                                                 norm_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, 1000)

    def forward(self, x):
        p = self.patch(x).flatten(2).transpose(1, 2)
        p = torch.cat([self.cls.expand(x.shape[0], -1, -1), p], 1) + self.pos
        return self.head(self.norm(self.enc(p))[:, 0])


_MODELS = {
    "conv1d_stack": (Conv1dStack, (1, 576)),
    "vit": (TinyViT, (1, 3, 224, 224)),
}


@pytest.mark.parametrize("route", ["torch", "onnx"])
@pytest.mark.parametrize("name", sorted(_MODELS))
def test_architecture_compiles_with_target_layouts_and_matches(name, route, tmp_path, caplog):
    torch.manual_seed(0)
    cls, shape = _MODELS[name]
    model, inputs = cls().eval(), (torch.randn(*shape),)
    with caplog.at_level(logging.WARNING, logger="compiler.pipeline"):
        if route == "onnx":
            mod = compiler.compile(export_onnx(model, inputs, tmp_path / f"{name}.onnx"), target="x86")
        else:
            mod = compiler.compile(model, target="x86", example_inputs=inputs)
    assert not [r for r in caplog.records if "layout conversion failed" in r.getMessage()]
    assert_close(mod(inputs[0].numpy()), run_torch(model, inputs), what=f"{name} via {route}")
