"""``FoldAffineIntoConv``: BatchNorm, conv bias and per-channel affine chains fold into conv weights.

Each case is a small torch model with non-trivial BatchNorm statistics. It is checked three ways:
the graph Kiln prepares (``pipeline.prepare`` on ``frontends.import_model``) has no affine op left after
the convolution; the pass alone (no layout change, TVM's plain build, no Kiln schedules) matches
PyTorch; and the full ``compiler.compile`` matches PyTorch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from torch import nn
from tvm import relax

import compiler
import schedules
import targets
from compiler import graph_passes, pipeline
from compiler.analysis import layer_table
from compiler.frontends import import_model
from conftest import assert_close, run_torch

AFFINE = {"add", "subtract", "multiply", "divide"}
LAYOUT_OPS = {"permute_dims", "layout_transform", "reshape"}


def _randomize_bn(bn: nn.BatchNorm2d, gen: torch.Generator) -> None:
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
        bn.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.25)
        bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(n, generator=gen) * 0.2)


class ConvBiasBNReLU(nn.Module):
    """conv (with bias) -> add(extra bias) -> BN -> relu."""

    def __init__(self, groups=1, c_in=8, c_out=8, bias=True, extra_bias=True):
        super().__init__()
        gen = torch.Generator().manual_seed(c_out * 10 + groups)
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups, bias=bias)
        self.extra = nn.Parameter(torch.randn(1, c_out, 1, 1, generator=gen) * 0.3) if extra_bias else None
        self.bn = nn.BatchNorm2d(c_out)
        _randomize_bn(self.bn, gen)

    def forward(self, x):
        y = self.conv(x)
        if self.extra is not None:
            y = y + self.extra
        return torch.relu(self.bn(y))


class ConvScaleChain(nn.Module):
    """conv -> * per-channel scale -> (shift - y) -> / per-channel divisor -> scalar * y."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.register_buffer("scale", torch.rand(1, 6, 1, 1, generator=gen) + 0.5)
        self.register_buffer("shift", torch.randn(1, 6, 1, 1, generator=gen))
        self.register_buffer("div", torch.rand(1, 6, 1, 1, generator=gen) + 0.5)

    def forward(self, x):
        y = self.conv(x) * self.scale
        y = self.shift - y
        return torch.relu(1.5 * (y / self.div))


class ConvUsedTwice(nn.Module):
    """The conv output feeds BN *and* a residual add: folding BN would change the other use."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        _randomize_bn(self.bn, torch.Generator().manual_seed(9))

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(self.bn(y)) + y


class ConvSpatialMultiply(nn.Module):
    """A multiply that is not per channel (varies over H, W) must not be folded."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("mask", torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(3)))

    def forward(self, x):
        return self.conv(x) * self.mask


FOLDED_CASES = {
    "conv_bias_add_bn_relu": (lambda: ConvBiasBNReLU(), (1, 8, 12, 12)),
    "conv_nobias_bn": (lambda: ConvBiasBNReLU(bias=False, extra_bias=False), (1, 8, 12, 12)),
    "grouped_conv_bn": (lambda: ConvBiasBNReLU(groups=2, c_in=8, c_out=12), (1, 8, 10, 10)),
    "depthwise_conv_bn": (lambda: ConvBiasBNReLU(groups=8, c_in=8, c_out=8, bias=False), (1, 8, 10, 10)),
    "conv_affine_chain": (lambda: ConvScaleChain(), (1, 4, 9, 9)),
}


def _input(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _ops(mod) -> list[str]:
    return [row.op for row in layer_table(mod)]


def _after_convs(ops: list[str]) -> list[str]:
    """The ops that follow the first conv, layout shuffles dropped."""
    first = next(i for i, op in enumerate(ops) if op == "nn.conv2d")
    return [op for op in ops[first:] if op not in LAYOUT_OPS]


def _fold_only(mod):
    """The graph steps of ``pipeline.prepare`` up to the fold, without the layout conversion."""
    seq = tvm.transform.Sequential([
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.FoldConstant(),
        graph_passes.FoldAffineIntoConv,
        relax.transform.FoldConstant(),
        relax.transform.DeadCodeElimination(),
    ])
    return seq(mod)


def _run_plain_tvm(mod, x: np.ndarray) -> np.ndarray:
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
    return out[0].numpy() if not hasattr(out, "numpy") else out.numpy()


@pytest.mark.parametrize("case", sorted(FOLDED_CASES))
def test_affine_chain_folds_into_conv(case):
    factory, shape = FOLDED_CASES[case]
    torch.manual_seed(0)
    model = factory().eval()
    x = _input(shape)
    want = run_torch(model, (x,))
    imported = import_model(model, example_inputs=(x,))
    assert AFFINE & set(_ops(imported.mod)) or "nn.batch_norm" in _ops(imported.mod)

    # 1. the pass alone: one conv, then exactly one bias add (and the relu), nothing else
    folded = _fold_only(imported.mod)
    after = _after_convs(_ops(folded))
    assert after[:2] == ["nn.conv2d", "add"], after
    assert not AFFINE & set(after[2:]), after
    assert after.count("nn.conv2d") == 1
    assert_close(_run_plain_tvm(folded, x.numpy()), want, what=f"{case}: FoldAffineIntoConv (plain TVM build)")

    # 2. Kiln's prepared graph (with the x86 layout conversion) has the same shape
    schedules.install_hooks()  # as pipeline.lower does before prepare
    prepared = pipeline.prepare(imported.mod, targets.get("x86"))
    after = _after_convs(_ops(prepared))
    assert after[:2] == ["nn.conv2d", "add"], after
    assert not AFFINE & set(after[2:]), after
    assert "nn.batch_norm" not in _ops(prepared)

    # 3. the whole compiler, on new inputs too
    mod = compiler.compile(model, example_inputs=(x,))
    assert_close(mod(x.numpy()), want, what=case)
    x2 = _input(shape, seed=1)
    assert_close(mod(x2.numpy()), run_torch(model, (x2,)), what=case)
    conv_kernels = [k for k in mod.summary().kernels if any(op.startswith("conv2d") for op in k.ops)]
    assert len(conv_kernels) == 1


def test_folded_weights_are_scaled_per_output_channel():
    """conv without bias -> BN: folded weight = W * gamma / sqrt(var + eps), bias = beta - mean * that."""
    torch.manual_seed(0)
    model = ConvBiasBNReLU(bias=False, extra_bias=False).eval()
    x = _input((1, 8, 12, 12))
    folded = _fold_only(import_model(model, example_inputs=(x,)).mod)
    conv = next(b.value for blk in folded["main"].body.blocks for b in blk.bindings
                if isinstance(b.value, relax.Call) and getattr(b.value.op, "name", "") == "relax.nn.conv2d")
    weight = conv.args[1].value.numpy()
    bn = model.bn
    k = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    np.testing.assert_allclose(weight, model.conv.weight.detach().numpy() * k[:, None, None, None],
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("model_cls", [ConvUsedTwice, ConvSpatialMultiply])
def test_not_folded_when_unsafe(model_cls):
    torch.manual_seed(0)
    model = model_cls().eval()
    shape = (1, 4, 8, 8) if model_cls is ConvUsedTwice else (1, 3, 8, 8)
    x = _input(shape)
    want = run_torch(model, (x,))
    imported = import_model(model, example_inputs=(x,))
    folded = _fold_only(imported.mod)
    # the conv keeps its original weights: nothing was folded into it
    conv = next(b.value for blk in folded["main"].body.blocks for b in blk.bindings
                if isinstance(b.value, relax.Call) and getattr(b.value.op, "name", "") == "relax.nn.conv2d")
    np.testing.assert_array_equal(conv.args[1].value.numpy(), model.conv.weight.detach().numpy())
    # the affine ops are still there after the conv
    assert {"multiply"} & set(_after_convs(_ops(folded)))
    assert_close(_run_plain_tvm(folded, x.numpy()), want, what="fold only")
    mod = compiler.compile(model, example_inputs=(x,))
    assert_close(mod(x.numpy()), want)
    x2 = _input(shape, seed=2)
    assert_close(mod(x2.numpy()), run_torch(model, (x2,)))


def test_prepare_is_deterministic():
    """Tuning keys records by structural hash of prepare+fuse output: it must not vary run to run."""
    torch.manual_seed(0)
    model = ConvBiasBNReLU().eval()
    x = _input((1, 8, 12, 12))
    d = targets.get("x86")
    a = pipeline.lower(model, d, example_inputs=(x,)).fused
    b = pipeline.lower(model, d, example_inputs=(x,)).fused
    assert tvm_ffi.structural_hash(a) == tvm_ffi.structural_hash(b)
    tvm.ir.assert_structural_equal(a, b)


def test_schedule_does_not_modify_its_input():
    """``pipeline.schedule`` must leave the fused module alone (the kernel table and tuning read it)."""
    torch.manual_seed(0)
    model = nn.Linear(48, 20).eval()
    d = targets.get("x86")
    fused = pipeline.lower(model, d, example_inputs=(torch.randn(5, 48),)).fused
    before = tvm_ffi.structural_hash(fused)
    scheduled = pipeline.schedule(fused, d)
    assert tvm_ffi.structural_hash(fused) == before
    assert tvm_ffi.structural_hash(scheduled) != before


# ---------------------------------------------------------------- PReLUFromWhere


class ConvPReLU(nn.Module):
    def __init__(self, shared: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3)
        self.act = nn.PReLU() if shared else nn.PReLU(12)
        with torch.no_grad():  # slopes that differ per channel and from PyTorch's 0.25
            self.act.weight.copy_(torch.linspace(-0.5, 0.9, self.act.weight.numel()))

    def forward(self, x):
        return self.act(self.conv(x))


@pytest.mark.parametrize("shared", [False, True], ids=["per-channel", "shared"])
def test_prelu_from_torch_fuses_into_its_conv(shared):
    """torch.export's prelu (where(x > 0, x, alpha * x)) becomes nn.prelu and fuses into the conv:
    one kernel, no transposes around it, PyTorch's numbers, NaN kept."""
    torch.manual_seed(0)
    model = ConvPReLU(shared).eval()
    x = torch.randn(1, 3, 16, 16)
    prepared = pipeline.prepare(import_model(model, example_inputs=(x,)).mod, targets.get("x86"))
    ops = {row.op for row in layer_table(prepared)}
    assert "nn.prelu" in ops and not ops & {"where", "greater"}, ops
    mod = compiler.compile(model, example_inputs=(x,))
    kernels = mod.summary().kernels
    assert len([k for k in kernels if "conv2d" in k.name]) == 1
    assert any("conv2d" in k.name and "prelu" in k.name for k in kernels), [k.name for k in kernels]
    # the only transposes are the model's own NCHW input and output (before: six more around the PReLU)
    assert sum("transpose" in k.name for k in kernels) == 2, [k.name for k in kernels]
    x2 = torch.randn(1, 3, 16, 16)
    assert_close(mod(x2.numpy()), run_torch(model, (x2,)))
    x2[0, 0, 5, 5] = float("nan")
    got, want = mod(x2.numpy()), np.asarray(run_torch(model, (x2,)))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got).any()
