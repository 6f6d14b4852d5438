"""Tests for the built-in model zoo: loading, determinism, informative weights, errors."""

from __future__ import annotations

import pytest
import torch

from compiler import zoo
from compiler.errors import KilnError

EXPECTED_INPUTS = {
    "bert": [((1, 128), torch.int64)],
    "crnn": [((1, 1, 32, 128), torch.float32)],
    "dbnet": [((1, 3, 256, 256), torch.float32)],
    "efficientnet": [((1, 3, 224, 224), torch.float32)],
    "lstm": [((1, 10, 16), torch.float32)],
    "mlp": [((1, 64), torch.float32)],
    "mobilenetv2": [((1, 3, 224, 224), torch.float32)],
    "mobilenetv3": [((1, 3, 224, 224), torch.float32)],
    "resnet18": [((1, 3, 224, 224), torch.float32)],
    "rnet": [((1, 3, 24, 24), torch.float32)],
    "streaming_vad": [((1, 512), torch.float32), ((1, 64), torch.float32), ((1, 64), torch.float32)],
    "tiny_cnn": [((1, 3, 32, 32), torch.float32)],
    "vit": [((1, 3, 224, 224), torch.float32)],
    "yolo": [((1, 3, 320, 320), torch.float32)],
    "yolo11": [((1, 3, 320, 320), torch.float32)],
}
EXPECTED_OUTPUT = {
    "bert": (1, 128, 384),
    "crnn": (32, 1, 37),
    "dbnet": (1, 2, 256, 256),
    "efficientnet": (1, 1000),
    "lstm": (1, 10),
    "mlp": (1, 10),
    "mobilenetv2": (1, 1000),
    "mobilenetv3": (1, 1000),
    "resnet18": (1, 1000),
    "rnet": ((1, 2), (1, 4)),
    "streaming_vad": ((1, 2), (1, 64), (1, 64)),
    "tiny_cnn": (1, 10),
    "vit": (1, 1000),
    "yolo": (1, 84, 2100),
    "yolo11": (1, 84, 2100),
}


@pytest.fixture(scope="module")
def loaded() -> dict[str, tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]:
    return {name: zoo.load(name) for name in zoo.names()}


def _run(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The output; several outputs (a model with state out) flattened and concatenated."""
    with torch.no_grad():
        out = model(*inputs)
    return torch.cat([o.reshape(-1) for o in out]) if isinstance(out, tuple) else out


def _shape(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]):
    with torch.no_grad():
        out = model(*inputs)
    return tuple(tuple(o.shape) for o in out) if isinstance(out, tuple) else tuple(out.shape)


def _other_inputs(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1234)
    out = []
    for x in inputs:
        if x.is_floating_point():
            out.append(torch.randn(x.shape, generator=gen, dtype=x.dtype))
        else:
            out.append(torch.randint(0, int(x.max()) + 1, x.shape, generator=gen, dtype=x.dtype))
    return tuple(out)


def test_names_sorted_and_complete() -> None:
    assert zoo.names() == sorted(EXPECTED_INPUTS)


@pytest.mark.parametrize("name", sorted(EXPECTED_INPUTS))
def test_loads_in_eval_mode_with_expected_inputs(name: str, loaded) -> None:
    model, inputs = loaded[name]
    assert isinstance(model, torch.nn.Module)
    assert not any(m.training for m in model.modules())
    assert [(tuple(x.shape), x.dtype) for x in inputs] == EXPECTED_INPUTS[name]
    assert _shape(model, inputs) == EXPECTED_OUTPUT[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_INPUTS))
def test_deterministic_per_seed(name: str, loaded) -> None:
    model, inputs = loaded[name]
    again, inputs_again = zoo.load(name, seed=0)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert all(torch.equal(a, b) for a, b in zip(inputs, inputs_again))
    assert torch.equal(_run(model, inputs), _run(again, inputs_again))

    other, other_inputs = zoo.load(name, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(inputs, other_inputs))


@pytest.mark.parametrize("name", sorted(EXPECTED_INPUTS))
def test_outputs_informative(name: str, loaded) -> None:
    model, inputs = loaded[name]
    out = _run(model, inputs)
    assert torch.isfinite(out).all()
    std = out.std().item()
    assert 1e-2 < std < 1e3, std
    assert out.unique().numel() > out.numel() // 2  # not constant, not heavily saturated
    other = _run(model, _other_inputs(inputs))
    rel = ((out - other).norm() / out.norm()).item()
    assert rel > 1e-2, f"output barely depends on the input (relative change {rel:.2e})"


def test_global_rng_untouched() -> None:
    state = torch.get_rng_state()
    zoo.load("tiny_cnn", seed=7)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.filterwarnings("ignore:The tensor attributes .*_flat_weights")  # nn.LSTM under torch.export
@pytest.mark.parametrize("name", ["tiny_cnn", "mlp", "lstm"])
def test_small_models_export(name: str, loaded) -> None:
    model, inputs = loaded[name]
    ep = torch.export.export(model, inputs)
    torch.testing.assert_close(_run(ep.module(), inputs), _run(model, inputs))


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(zoo.UnknownModelError) as info:
        zoo.load("resnet19")
    err = info.value
    assert isinstance(err, KilnError)
    msg = str(err)
    assert "'resnet19'" in msg and "Did you mean 'resnet18'?" in msg
    for name in zoo.names():
        assert name in msg
