"""Default x86 schedules for convolutions and pooling (schedules/x86/conv.py, pool.py).

Every case goes through Kiln's pipeline (prepare -> fuse -> schedule -> build) on a small torch
module, is compared with torch, and checks that the conv / pool rule really scheduled each fused
conv / pool kernel (a rule returning ``None`` would silently fall back to another rule).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, tirx

import schedules
import targets
from compiler import pipeline
from schedules.x86 import conv as conv_mod
from schedules.x86 import pool as pool_mod

torch.manual_seed(0)
#: The direct convolution schedule is what these tests check: Winograd (tests/test_winograd.py) off.
TARGET = dataclasses.replace(targets.get("x86"), winograd=False)


def _fuse(mod):
    out = pipeline.fuse(mod, TARGET)
    return out[0] if isinstance(out, tuple) else out


def _run(
    model: torch.nn.Module,
    x: torch.Tensor,
    expect_conv: int = 0,
    expect_pool: int = 0,
    prepack: bool = False,
):
    from tvm.relax.frontend.torch import from_exported_program

    model = model.eval()
    with torch.no_grad():
        ref = model(x).numpy()
    mod = from_exported_program(torch.export.export(model, (x,)))
    schedules.install_hooks()  # as pipeline.lower does
    mod = pipeline.prepare(mod, TARGET)
    fused = _fuse(mod)

    # the rules must claim every conv / pool kernel
    tt = TARGET.to_tvm()
    n_conv = n_pool = 0
    for gv, func in fused.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        name = gv.name_hint
        if "conv2d" in name:
            n_conv += 1
            assert conv_mod.Conv2D(TARGET).apply(func, tt, False) is not None, f"conv rule refused {name}"
        elif "pool" in name or name == "mean":  # global pooling becomes mean(axis=[1, 2])
            n_pool += 1
            assert pool_mod.Pool(TARGET).apply(func, tt, False) is not None, f"pool rule refused {name}"
    assert n_conv >= expect_conv and n_pool >= expect_pool, (n_conv, n_pool)

    scheduled = pipeline.schedule(fused, TARGET)
    if prepack:
        # weight repacking blocks lifted out of the kernels and folded into the constants
        with TARGET.to_tvm():
            scheduled = relax.transform.SplitLayoutRewritePreproc()(scheduled)
            scheduled = relax.transform.FoldConstant()(scheduled)
            scheduled = relax.transform.DeadCodeElimination()(scheduled)
        names = [gv.name_hint for gv in scheduled.functions]
        assert any(n.endswith("_prepacked") for n in names), names
        assert not any(n.endswith("_weight_prepack") for n in names), names  # all folded
    ex = pipeline.build(scheduled, TARGET)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()))
    while not hasattr(out, "numpy"):
        out = out[0]
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-5)


def _init(m: torch.nn.Module) -> torch.nn.Module:
    """Informative weights (non-trivial BN statistics)."""
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            c = mod.num_features
            mod.weight.data = torch.rand(c, generator=g) + 0.5
            mod.bias.data = torch.randn(c, generator=g) * 0.1
            mod.running_mean = torch.randn(c, generator=g) * 0.1
            mod.running_var = torch.rand(c, generator=g) + 0.5
    return m


class ConvAct(torch.nn.Module):
    def __init__(self, cin, cout, k, stride=1, pad=None, groups=1, act="relu", bn=False, bias=True):
        super().__init__()
        pad = k // 2 if pad is None else pad
        self.conv = torch.nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=bias)
        self.bn = torch.nn.BatchNorm2d(cout) if bn else torch.nn.Identity()
        self.act = act

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.act == "relu":
            return torch.relu(y)
        if self.act == "relu6":
            return torch.nn.functional.relu6(y)
        if self.act == "silu":
            return torch.nn.functional.silu(y)
        return y


# (name, cin, cout, k, stride, groups, H, W, act, bn)
CONV_CASES = [
    ("3x3_s1", 16, 32, 3, 1, 1, 14, 14, "relu", False),
    ("3x3_s2_odd", 16, 32, 3, 2, 1, 15, 15, "relu", False),
    ("1x1", 24, 40, 1, 1, 1, 7, 7, "relu", False),
    ("1x1_s2", 32, 64, 1, 2, 1, 14, 14, "none", True),
    ("stem_7x7_s2", 3, 16, 7, 2, 1, 32, 32, "relu", True),
    ("3x3_bn_c24", 24, 24, 3, 1, 1, 13, 13, "relu", True),
    ("3x3_cin3_cout3", 3, 3, 3, 1, 1, 9, 11, "none", False),
    ("dw3x3_s1", 32, 32, 3, 1, 32, 14, 14, "relu6", True),
    ("dw3x3_s2", 24, 24, 3, 2, 24, 15, 15, "relu6", True),
    ("grouped_g4", 32, 64, 3, 1, 4, 7, 7, "relu", False),
    ("grouped_g8_small", 32, 32, 3, 1, 8, 8, 8, "silu", False),
    ("3x3_silu", 32, 48, 3, 1, 1, 10, 10, "silu", True),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv(case):
    _, cin, cout, k, s, g, h, w, act, bn = case
    m = _init(ConvAct(cin, cout, k, s, groups=g, act=act, bn=bn))
    _run(m, torch.randn(1, cin, h, w), expect_conv=1)


class Residual(torch.nn.Module):
    """conv-bn-relu, conv-bn + identity, relu; then a conv whose output is another conv's input
    (a conv with no epilogue but the next layer's layout)."""

    def __init__(self, c=32):
        super().__init__()
        self.a = ConvAct(c, c, 3, bn=True)
        self.b = ConvAct(c, c, 3, bn=True, act="none")
        self.c = torch.nn.Conv2d(c, c, 1, bias=False)
        self.d = torch.nn.Conv2d(c, 16, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.b(self.a(x)) + x)
        return self.d(self.c(y))


def test_residual_and_bare_conv():
    _run(_init(Residual()), torch.randn(1, 32, 12, 12), expect_conv=4)


def test_batch2_and_weight_prepack():
    """Batch 2, and the repacked-weight path (SplitLayoutRewritePreproc + FoldConstant)."""
    m = torch.nn.Sequential(ConvAct(16, 64, 3, bn=True), ConvAct(64, 64, 3, stride=2), ConvAct(64, 32, 1))
    _run(_init(m), torch.randn(2, 16, 10, 10), expect_conv=3, prepack=True)


class Pools(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 32, 3, padding=1)
        self.kind = kind

    def forward(self, x):
        y = self.conv(x)
        F = torch.nn.functional
        if self.kind == "maxpool":
            return F.max_pool2d(y, 3, 2, 1)
        if self.kind == "avgpool":
            return F.avg_pool2d(y, 2, 2)
        if self.kind == "avgpool_pad":
            return F.avg_pool2d(y, 3, 2, 1)
        if self.kind == "adaptive_global":
            return torch.flatten(F.adaptive_avg_pool2d(torch.relu(y), (1, 1)), 1)
        if self.kind == "adaptive_3x3":
            return F.adaptive_avg_pool2d(y, (3, 3))
        raise ValueError(self.kind)


@pytest.mark.parametrize("kind", ["maxpool", "avgpool", "avgpool_pad", "adaptive_global", "adaptive_3x3"])
def test_pool(kind):
    _run(Pools(kind), torch.randn(1, 8, 15, 15), expect_conv=1, expect_pool=1)


def test_tile_choice_respects_vector_width():
    """Tiles come from the target: AVX2 (8 lanes, 16 registers) gets smaller register tiles."""
    avx512, avx2 = targets.get("skylake-avx512"), targets.get("haswell")
    assert avx512.vector_lanes("float32") == 16 and avx512.vector_registers == 32
    assert avx2.vector_lanes("float32") == 8 and avx2.vector_registers == 16
    aarch64, armv7 = targets.get("rpi4"), targets.get("armv7")
    assert aarch64.vector_lanes("float32") == 4 and aarch64.vector_registers == 32
    assert armv7.vector_lanes("float32") == 4 and armv7.vector_registers == 16
    for ow in (7, 13, 14, 15, 56, 112):
        for regs in (16, 32):
            r, v = conv_mod.choose_tile(ow, 8, regs, False)
            assert ow % r == 0 and r * v <= regs


def test_unrecognised_returns_none():
    """A matmul is not a convolution nor a pool: both rules decline."""
    from tvm import te

    a = te.placeholder((16, 32), name="A")
    b = te.placeholder((32, 8), name="B")
    k = te.reduce_axis((0, 32), name="k")
    c = te.compute((16, 8), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    func = te.create_prim_func([a, b, c])
    tt = TARGET.to_tvm()
    assert conv_mod.Conv2D(TARGET).apply(func, tt, False) is None
    assert pool_mod.Pool(TARGET).apply(func, tt, False) is None


def test_weight_repack_is_folded_at_compile_time():
    """The conv rule repacks big weights in a ``layout_rewrite_preproc`` block; pipeline.schedule must
    split it out and fold it into the constants, so no built kernel repacks weights per call."""
    import tvm

    import schedules
    from compiler import pipeline

    desc = TARGET
    model = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU()).eval()
    fused = pipeline.lower(model, desc, example_inputs=(torch.randn(1, 64, 56, 56),)).fused

    def preproc_blocks(mod):
        return [gv.name_hint for gv, func in mod.functions_items()
                if isinstance(func, tvm.tirx.PrimFunc) and "layout_rewrite_preproc" in func.script()]

    with desc.to_tvm():
        only_rules = schedules.default_schedule_pass(desc)(
            tvm.IRModule(dict(fused.functions_items()), attrs=fused.attrs))
    assert preproc_blocks(only_rules), "the conv rule no longer repacks this weight: test is moot"
    assert not preproc_blocks(pipeline.schedule(fused, desc))


def test_relu6_keeps_channels_last():
    """ReLU6 (relax.clip) between convolutions stays NHWC after pipeline.prepare: the layout rule
    Kiln installs (schedules.install_hooks) keeps ConvertLayout from wrapping each clip in a pair of
    transposes (MobileNetV2 bounced NCHW<->NHWC twice per block without it)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1), torch.nn.ReLU6(), torch.nn.Conv2d(16, 16, 3, padding=1,
                                                                                            groups=16),
                                torch.nn.ReLU6(), torch.nn.Conv2d(16, 8, 1)).eval()
    text = pipeline.lower(model, TARGET, example_inputs=(torch.randn(1, 8, 12, 12),)).prepared.script()
    # one transpose in (NCHW -> NHWC) and one out, none around the clips
    assert text.count("R.permute_dims") == 2, text


def test_blocking_reads_the_l2_size_of_the_target():
    """Output-channel blocks go outermost when the conv's weights do not fit half of the target's L2
    (``desc.l2_bytes``); rows go outermost when they do. 3x3x128x128 float32 weights are 576 KiB."""
    import re

    from tvm import te, topi

    data = te.placeholder((1, 28, 28, 128), name="data")
    weight = te.placeholder((3, 3, 128, 128), name="weight")
    func = te.create_prim_func([data, weight, topi.nn.conv2d_nhwc(data, weight, 1, 1, 1)])
    base = targets.get("skylake-avx512")
    order = {}
    for l2_kb in (1024, 2048):
        desc = dataclasses.replace(base, l2_kb=l2_kb)
        sch = conv_mod.Conv2D(desc).apply(func, desc.to_tvm(), False)
        order[l2_kb] = re.findall(r"for (\w+) in T.parallel", sch.mod["main"].script())[-1]
    assert order[1024] == "nn_ff_0_yy_fused"  # channel blocks outermost: the weights stay in L2
    assert order[2048] == "nn_yy_ff_0_fused"  # rows outermost: the input rows stay in L1
