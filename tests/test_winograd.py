"""Winograd convolutions (``compiler/winograd.py``, ``schedules/x86/winograd.py``).

* the F(2, 3) and F(4, 3) matrices compute a 3-tap correlation exactly (float64);
* a model whose 3x3 layers cover F(4, 3), F(2, 3), a padding-free layer and layers that must stay
  direct (stride 2, 7x7 map, few channels, depthwise) is rewritten exactly where it should be, and the
  compiled module matches PyTorch with and without the rewrite (``winograd=False`` in the target);
* the transform kernels get Kiln's schedule (unrolled cases, epilogue fused into the output transform).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
from torch import nn

import compiler
import targets
from compiler import winograd
from conftest import assert_close, run_torch


@pytest.mark.parametrize("m", sorted(winograd.MATRICES))
def test_matrices_compute_a_correlation(m):
    bt, g, at = (np.array(x, dtype=np.float64) for x in winograd.MATRICES[m])
    rng = np.random.default_rng(m)
    for _ in range(5):
        d, w = rng.standard_normal(m + 2), rng.standard_normal(3)
        want = np.array([d[i:i + 3] @ w for i in range(m)])
        np.testing.assert_allclose(at @ ((g @ w) * (bt @ d)), want, rtol=1e-12, atol=1e-12)


def test_weight_transform_matches_matrices():
    w = np.random.default_rng(0).standard_normal((3, 3, 4, 5)).astype(np.float32)
    u = winograd.transform_weights(w, 4)
    g = np.array(winograd.MATRICES[4][1], dtype=np.float64)
    assert u.shape == (36, 4, 5) and u.dtype == np.float32
    np.testing.assert_allclose(u.reshape(6, 6, 4, 5)[:, :, 1, 2], g @ w[:, :, 1, 2] @ g.T, rtol=1e-6)


@pytest.mark.parametrize("size, m", [(56, 4), (16, 4), (28, 4), (14, 2), (12, 2), (10, 2), (7, None), (15, None)])
def test_tile_size(size, m):
    assert winograd.tile_size(size, size) == m


class Mixed(nn.Module):
    """3x3 layers of every kind: F(4,3) with a residual add, F(2,3), padding 0, and layers that stay direct."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.stem = nn.Conv2d(3, 32, 3, padding=1)             # 3 input channels: direct
        self.a = nn.Conv2d(32, 32, 3, padding=1)               # 16x16: F(4, 3), residual add + ReLU fused
        self.b = nn.Conv2d(32, 48, 3, padding=1, stride=2)     # stride 2: direct
        self.c = nn.Conv2d(48, 48, 3, padding=1)               # 8x8: F(2, 3) (below MIN_F4_SIZE)
        self.d = nn.Conv2d(96, 40, 3, padding=0)               # 8x8 -> 6x6, no padding: F(2, 3)
        self.dw = nn.Conv2d(40, 40, 3, padding=1, groups=40)   # depthwise: direct
        self.e = nn.Conv2d(40, 64, 3, padding=1, stride=2)     # 6x6 -> 3x3 stride 2: direct
        self.f = nn.Conv2d(64, 64, 3, padding=1)               # 3x3 map: direct (3 is odd)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / p[0].numel()) ** 0.5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.a(x)) + x
        x = torch.relu(self.b(x))
        x = torch.cat([nn.functional.silu(self.c(x)), x], dim=1)  # SiLU reads the conv output twice; concat (YOLO's C2f)
        x = self.d(x)
        x = torch.relu(self.dw(x))
        x = torch.relu(self.e(x))
        return self.f(x)


@functools.lru_cache(maxsize=None)
def _compiled(use_winograd: bool):
    desc = dataclasses.replace(targets.get("x86"), winograd=use_winograd)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return compiler.compile(Mixed().eval(), target=desc, example_inputs=(x,), tuning_logs=False), x


def _kernel_names(module) -> list[str]:
    return [k.name for k in module.summary().kernels]


def test_rewrites_exactly_the_eligible_layers():
    module, _ = _compiled(True)
    names = _kernel_names(module)
    assert sum(n.startswith("winograd_input") for n in names) == 3, names  # a, c, d
    outputs = [n for n in names if "winograd_output" in n]
    assert len(outputs) == 3, names
    # every output transform took its convolution's epilogue (bias, ReLU, residual add)
    assert all("add" in n for n in outputs), names
    direct = [n for n in names if "conv2d" in n]
    assert len(direct) == 5, names  # stem, b, dw, e, f


def test_off_in_the_target_keeps_direct_convolutions():
    module, _ = _compiled(False)
    names = _kernel_names(module)
    assert not [n for n in names if "winograd" in n], names
    assert len([n for n in names if "conv2d" in n]) == 8, names


@pytest.mark.parametrize("use_winograd", [True, False])
def test_matches_pytorch(use_winograd):
    module, x = _compiled(use_winograd)
    assert_close(module.run(x.numpy()), run_torch(Mixed().eval(), (x,)), what=f"winograd={use_winograd}")


def test_transform_kernels_are_scheduled_by_kiln():
    """Kiln's rule schedules every transform: tiles in parallel, the case loops unrolled (so their
    Selects fold to straight-line code), channels vectorised. A fallback schedule would leave a
    36-way Select chain per element, 5-20x slower."""
    import tvm

    from compiler import pipeline

    desc = targets.get("x86")
    x = torch.randn(1, 3, 16, 16)
    fused = pipeline.lower(Mixed().eval(), desc, example_inputs=(x,)).fused
    scheduled = pipeline.schedule(fused, desc)
    transforms = [gv for gv, f in scheduled.functions_items()
                  if isinstance(f, tvm.tirx.PrimFunc) and "winograd" in gv.name_hint]
    assert len(transforms) == 6, [gv.name_hint for gv in transforms]
    for gv in transforms:
        text = scheduled[gv].script()
        for kind in ("T.parallel", "T.unroll", "T.vectorized"):
            assert kind in text, f"{gv.name_hint}: no {kind} loop"


@pytest.mark.slow
def test_tuned_winograd_kernels_get_their_records_and_match_pytorch(tmp_path):
    """Tuning and compiling rewrite the same layers: each transform and GEMM kernel is a task (the
    transforms' only record is Kiln's default, they are not searched), compile applies a record to
    every kernel (none falls back to its default), and the tuned module matches PyTorch."""
    from compiler import pipeline
    from compiler.tuning import search

    desc = targets.get("x86")
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    fused = pipeline.lower(Mixed().eval(), desc, example_inputs=(x,)).fused
    tasks = search.extract_tasks(fused, desc.to_tvm())
    kernels = {k for t in tasks for k in t.kernels}
    assert sum("winograd" in k for k in kernels) == 6 and sum(k.startswith("matmul") for k in kernels) == 3, kernels
    report = compiler.tune(Mixed().eval(), "x86", example_inputs=(x,), trials=len(tasks), log_dir=tmp_path / "logs")
    assert all(t.best_ms <= t.default_ms for t in report.tasks)
    # the transforms keep Kiln's schedule (recorded, never searched); the GEMMs are searched
    transforms = [t for t in report.tasks if any("winograd" in k for k in t.kernels)]
    assert len(transforms) == 6 and all(t.trials == 0 and t.best_is_default for t in transforms), transforms
    tuned = compiler.compile(Mixed().eval(), "x86", example_inputs=(x,), tuning_logs=tmp_path / "logs")
    assert tuned.meta["untuned_kernels"] == [], tuned.meta["untuned_kernels"]
    assert {k for k in tuned.meta["tuned_kernels"] if "winograd" in k or k.startswith("matmul")}, tuned.meta
    assert_close(tuned.run(x.numpy()), run_torch(Mixed().eval(), (x,)), what="tuned")
