"""x86 default schedules for dense / reduction / injective kernels (schedules/x86/{matmul,reduction,
elementwise}.py): small torch modules go through Kiln's pipeline (prepare, fuse, schedule, build),
the result must match torch, and the rule meant for each kernel must actually have scheduled it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

from tvm import relax, tirx  # noqa: E402
from tvm.relax.frontend.torch import from_exported_program  # noqa: E402

import targets  # noqa: E402
import schedules  # noqa: E402
from compiler import pipeline  # noqa: E402
from schedules.x86 import matmul, reduction  # noqa: E402

TARGET = targets.get("x86")


def _fuse(model: nn.Module, args: tuple, target=None):
    target = target or TARGET
    mod = from_exported_program(torch.export.export(model.eval(), args))
    schedules.install_hooks()  # as pipeline.lower does
    mod = pipeline.prepare(mod, target)
    fused = pipeline.fuse(mod, target)
    return fused[0] if isinstance(fused, tuple) else fused


def _prim_funcs(mod):
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}


def _which_rule(func, target=None) -> str | None:
    """Name of the first x86 rule (in pipeline order) that schedules ``func``."""
    from schedules import x86

    tvm_target = (target or TARGET).to_tvm()
    for rule in x86.rules(target or TARGET):
        if rule.apply(func, tvm_target, False) is not None:
            return type(rule).__name__
    return None


def _has_parallel(func) -> bool:
    return "T.parallel(" in func.script()


def _run(model: nn.Module, *args, first: dict[str, str] | None = None, applies: dict[str, type] | None = None,
         parallel: tuple[str, ...] = (), rtol=1e-4, atol=1e-5, target=None):
    """Compile ``model`` with Kiln and compare with torch.

    ``first`` maps a substring of fused kernel names to the rule that must win for them in pipeline
    order; ``applies`` maps a substring to a rule class whose ``apply`` must schedule those kernels
    (used where a rule earlier in the order may legitimately take the kernel, e.g. Pool and means);
    ``parallel`` lists substrings of kernels that must contain a parallel loop after scheduling."""
    target = target or TARGET
    fused = _fuse(model, args, target)
    kernels = _prim_funcs(fused)
    tvm_target = target.to_tvm()
    for pattern, rule in (first or {}).items():
        hits = [n for n in kernels if pattern in n]
        assert hits, f"no fused kernel matches {pattern!r}: {sorted(kernels)}"
        for name in hits:
            assert _which_rule(kernels[name], target) == rule, f"{name} not scheduled by {rule}"
    for pattern, rule in (applies or {}).items():
        hits = [n for n in kernels if pattern in n]
        assert hits, f"no fused kernel matches {pattern!r}: {sorted(kernels)}"
        for name in hits:
            assert rule(target).apply(kernels[name], tvm_target, False) is not None, f"{rule.__name__} declined {name}"
    scheduled = pipeline.schedule(fused, target)
    for name, func in _prim_funcs(scheduled).items():
        assert func.attrs is not None and func.attrs.get("tirx.is_scheduled"), f"{name} left unscheduled"
        if any(p in name for p in parallel):
            assert _has_parallel(func), f"{name} has no parallel loop"
    ex = pipeline.build(scheduled, target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a.numpy()) for a in args])
    while not hasattr(out, "numpy"):
        out = out[0]
    with torch.no_grad():
        ref = model(*args)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=rtol, atol=atol)


def _seed():
    torch.manual_seed(0)


# -- matmul ------------------------------------------------------------------------------------


class Linear(nn.Module):
    def __init__(self, k, n, bias=True, act=None):
        super().__init__()
        self.fc = nn.Linear(k, n, bias=bias)
        self.act = act

    def forward(self, x):
        y = self.fc(x)
        return self.act(y) if self.act is not None else y


@pytest.mark.parametrize("m,k,n,bias", [(64, 96, 160, True), (33, 70, 45, False), (1, 64, 128, True),
                                         (1, 512, 1000, True), (1, 384, 1024, False), (40, 384, 768, True),
                                         (24, 256, 1000, True)])
def test_linear(m, k, n, bias):
    _seed()
    big = m * k * n >= matmul.PARALLEL_MIN_MACS
    _run(Linear(k, n, bias), torch.randn(m, k), first={"matmul": "Matmul"}, parallel=("matmul",) if big else ())


def test_linear_gelu_tanh_residual_scale():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(48, 96)
            self.fc2 = nn.Linear(96, 48)

        def forward(self, x):
            h = torch.nn.functional.gelu(self.fc1(x))
            return torch.tanh(self.fc2(h)) * 0.5 + x

    _seed()
    _run(M(), torch.randn(2, 16, 48), first={"matmul": "Matmul"})


def test_linear_3d_rows_not_multiple_of_tile():
    """(3, 10, 48) @ W: two row (I) axes, 30 rows in all; a tile must
    never straddle rows of the output (the fused epilogue would touch uncomputed elements)."""
    _seed()
    _run(Linear(48, 80), torch.randn(3, 10, 48), first={"matmul": "Matmul"})


def test_conv_as_implicit_gemm():
    """The Matmul rule also accepts conv-like kernels (several I and K axes, a padded input)
    when the Conv2D rule declines one; the result must be exact."""
    from tvm import te, topi

    data = te.placeholder((1, 12, 12, 32), name="data")
    weight = te.placeholder((3, 3, 32, 48), name="weight")
    bias = te.placeholder((48,), name="bias")
    conv = topi.nn.conv2d_nhwc(data, weight, 1, 1, 1)
    out = te.compute(conv.shape, lambda n, h, w, c: te.max(conv[n, h, w, c] + bias[c], 0.0), name="T_relu")
    func = te.create_prim_func([data, weight, bias, out])
    tvm_target = TARGET.to_tvm()
    sch = matmul.Matmul(TARGET).apply(func, tvm_target, False)
    assert sch is not None
    rng = np.random.default_rng(0)
    args = [rng.standard_normal([int(d) for d in t.shape]).astype("float32") for t in (data, weight, bias)]
    results = []
    for mod in (tvm.IRModule({"main": func}), sch.mod):
        tensors = [tvm.runtime.tensor(a) for a in args] + [tvm.runtime.tensor(np.zeros((1, 12, 12, 48), "float32"))]
        tvm.compile(mod, target=tvm_target)(*tensors)
        results.append(tensors[-1].numpy())
    np.testing.assert_allclose(results[1], results[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m,k,n", [(1, 37, 53), (7, 64, 100), (5, 3, 17)])
def test_matmul_odd_sizes(m, k, n):
    class MM(nn.Module):
        def forward(self, a, b):
            return torch.matmul(a, b)

    _seed()
    _run(MM(), torch.randn(m, k), torch.randn(k, n), first={"matmul": "Matmul"})


@pytest.mark.parametrize("m", [24, 1])
def test_matmul_transposed_operand(m):
    """x @ y^T with a non-constant y: B packed per column panel (m > 1) or a dot product per output
    (m == 1, delegated to the Reduction rule)."""

    class MM(nn.Module):
        def forward(self, a, b):
            return torch.nn.functional.linear(a, b)

    _seed()
    _run(MM(), torch.randn(m, 40), torch.randn(72, 40), first={"matmul": "Matmul"})


def test_batched_matmul_attention():
    class Attn(nn.Module):
        def forward(self, q, k, v):
            s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
            return torch.matmul(torch.softmax(s, dim=-1), v)

    _seed()
    b, h, s, d = 1, 4, 64, 32
    _run(Attn(), torch.randn(b, h, s, d), torch.randn(b, h, s, d), torch.randn(b, h, s, d),
         first={"matmul": "Matmul", "softmax": "Reduction"}, parallel=("matmul", "softmax"))


# -- reductions --------------------------------------------------------------------------------


def test_softmax_last_axis():
    class M(nn.Module):
        def forward(self, x):
            return torch.softmax(x, dim=-1)

    _seed()
    _run(M(), torch.randn(4, 32, 128) * 3, first={"softmax": "Reduction"}, parallel=("softmax",))


def test_softmax_odd_length():
    class M(nn.Module):
        def forward(self, x):
            return torch.softmax(x, dim=-1)

    _seed()
    _run(M(), torch.randn(3, 5, 37), first={"softmax": "Reduction"})


def test_layer_norm():
    _seed()
    ln = nn.LayerNorm(96)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.1, 0.1)
    _run(ln, torch.randn(2, 64, 96), first={"layer_norm": "Reduction"}, parallel=("layer_norm",))


@pytest.mark.parametrize("dim", [1, -1, (1, 2)])
def test_mean(dim):
    class M(nn.Module):
        def forward(self, x):
            return x.mean(dim=dim)

    _seed()
    _run(M(), torch.randn(2, 24, 40, 48), applies={"mean": reduction.Reduction})


def test_argmax():
    class M(nn.Module):
        def forward(self, x):
            return torch.argmax(x, dim=-1)

    _seed()
    x = torch.randn(64, 100)
    fused = _fuse(M(), (x,))
    assert all(_which_rule(f) is not None for f in _prim_funcs(fused).values())
    _run(M(), x)


# -- injective ---------------------------------------------------------------------------------


def test_transpose_permute():
    class M(nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1).contiguous() + 1.0

    _seed()
    _run(M(), torch.randn(2, 16, 24, 40), first={"transpose": "Elementwise"}, parallel=("transpose",))


def test_concat():
    class M(nn.Module):
        def forward(self, a, b):
            return torch.cat([a * 2.0, b], dim=1)

    _seed()
    _run(M(), torch.randn(2, 24, 64), torch.randn(2, 40, 64), first={"concat": "Elementwise"})


def test_upsample_nearest():
    class M(nn.Module):
        def forward(self, x):
            return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")

    _seed()
    _run(M(), torch.randn(1, 8, 20, 24), first={"resize": "Elementwise"})


def test_embedding_int64_ids():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(500, 64)

        def forward(self, ids):
            return self.emb(ids) * 2.0

    _seed()
    ids = torch.randint(0, 500, (2, 33), dtype=torch.int64)
    _run(M(), ids, first={"take": "Elementwise"})


def test_fallback_parallelises_unknown_kernel():
    """Fallback takes any PrimFunc (here a cumulative sum, which no other rule matches) and must
    build to the same result."""

    class M(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, dim=-1)

    _seed()
    _run(M(), torch.randn(64, 50), rtol=1e-4, atol=1e-4)


def test_vector_math_accuracy():
    """exp/erf/tanh/sigmoid are lowered to vectorisable polynomials (elementwise.install_vector_math);
    they must stay within float32 rounding noise of torch over a wide range."""

    class M(nn.Module):
        def forward(self, x):
            return torch.stack([torch.exp(x.clamp(max=80.0)), torch.erf(x), torch.tanh(x), torch.sigmoid(x),
                                torch.nn.functional.gelu(x), torch.nn.functional.silu(x)])

    x = torch.linspace(-30.0, 30.0, 4096).reshape(4, 1024)
    _run(M(), x, rtol=2e-6, atol=1e-6)


def test_avx2_target():
    """On an AVX2 target (8 float lanes, 16 vector registers) the same rules give 8-lane kernels
    that run on this machine."""
    haswell = targets.get("haswell")
    assert haswell.vector_lanes("float32") == 8 and haswell.vector_registers == 16

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 72)
            self.ln = nn.LayerNorm(72)

        def forward(self, x):
            return torch.softmax(self.ln(torch.nn.functional.gelu(self.fc(x))), dim=-1)

    _seed()
    _run(M(), torch.randn(3, 20, 64), first={"matmul": "Matmul", "softmax": "Reduction"}, target=haswell)


def test_registry_hooks_are_explicit():
    """Importing Kiln changes none of TVM's global registries; the pipeline and the tuner's build
    workers install Kiln's hooks (schedules.install_hooks) themselves, so tuned candidates are built
    with the same lowerings as compiled modules."""
    import subprocess
    import sys

    probe = ("import tvm, compiler, schedules, schedules.x86.conv, schedules.x86.elementwise\n"
             "has = lambda: tvm.ir.Op.get('relax.clip').get_attr('FRelaxInferLayout') is not None\n"
             "print(has())\n"
             "from compiler.tuning import search\n"
             "search._import_tvm()\n"
             "print(has())\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "True"]
