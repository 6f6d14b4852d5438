"""The Python API: ``compiler.compile`` on every kind of model, running, benchmarking, summaries,
export/load (in this process and in a fresh one), ``zoo:`` names and ONNX input shapes.

Every output is compared with PyTorch (and ONNX Runtime for ONNX models) on the same inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import compiler
from compiler.module_base import BenchmarkResult, ModuleSummary
from conftest import (assert_close, export_onnx, numpy_inputs, onnx_input_names, run_fresh_python, run_ort,
                      run_torch, zoo_model)

FAST_MODELS = ["tiny_cnn", "mlp"]


def _other_inputs(inputs, seed=7):
    """Fresh random inputs of the same shapes: a compiled module must not only work on its examples."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in inputs)


# ---------------------------------------------------------------- the four kinds of model


@pytest.mark.parametrize("name", FAST_MODELS)
def test_compile_torch_module(name, compiled_zoo):
    model, inputs = zoo_model(name)
    mod = compiled_zoo(name, "torch")
    assert isinstance(mod, compiler.CompiledModule)
    for xs in (inputs, _other_inputs(inputs)):
        assert_close(mod(*numpy_inputs(xs)), run_torch(model, xs), what=name)


@pytest.mark.parametrize("name", FAST_MODELS)
def test_compile_exported_program(name):
    model, inputs = zoo_model(name)
    program = torch.export.export(model, inputs)
    graph_before = str(program.graph)
    mod = compiler.compile(program, "x86")
    assert str(program.graph) == graph_before, "compile modified the caller's ExportedProgram"
    xs = _other_inputs(inputs, seed=3)
    assert_close(mod(*numpy_inputs(xs)), run_torch(model, xs), what=name)
    assert [s.shape for s in mod.inputs] == [tuple(x.shape) for x in inputs]


@pytest.mark.parametrize("name", FAST_MODELS)
def test_compile_onnx_file(name, compiled_zoo, zoo_onnx):
    model, inputs = zoo_model(name)
    path = zoo_onnx(name)
    mod = compiled_zoo(name, "onnx")
    xs = _other_inputs(inputs, seed=4)
    arrays = numpy_inputs(xs)
    got = mod(*arrays)
    assert_close(got, run_torch(model, xs), what=f"{name} vs torch")
    (want_ort,) = run_ort(path, dict(zip(onnx_input_names(path), arrays)))
    assert_close(got, want_ort, what=f"{name} vs onnxruntime")


@pytest.mark.parametrize("name", FAST_MODELS)
def test_compile_onnx_model_proto(name, zoo_onnx):
    model, inputs = zoo_model(name)
    proto = onnx.load(zoo_onnx(name))
    before = proto.SerializeToString()
    mod = compiler.compile(proto, "x86")
    assert proto.SerializeToString() == before, "compile modified the caller's ModelProto"
    arrays = numpy_inputs(_other_inputs(inputs, seed=5))
    got = mod(*arrays)
    (want_ort,) = run_ort(proto, dict(zip(onnx_input_names(zoo_onnx(name)), arrays)))
    assert_close(got, want_ort, what=name)
    assert_close(got, run_torch(model, [torch.from_numpy(a) for a in arrays]), what=name)


def test_compile_zoo_name():
    mod = compiler.compile("zoo:tiny_cnn")
    model, inputs = zoo_model("tiny_cnn")
    assert [s.shape for s in mod.inputs] == [(1, 3, 32, 32)]
    xs = _other_inputs(inputs, seed=11)
    assert_close(mod(*numpy_inputs(xs)), run_torch(model, xs))


# ---------------------------------------------------------------- running


def test_call_run_and_named_inputs_agree(compiled_zoo):
    model, inputs = zoo_model("tiny_cnn")
    mod = compiled_zoo("tiny_cnn")
    (x,) = numpy_inputs(_other_inputs(inputs, seed=21))
    want = run_torch(model, [torch.from_numpy(x)])
    by_call, by_run = mod(x), mod.run(x)
    by_name = mod.run(**{mod.inputs[0].name: x})
    for got in (by_call, by_run, by_name):
        assert_close(got, want)
    np.testing.assert_array_equal(by_call, by_name)
    # float64 input is cast down (same kind), the result is still right
    assert_close(mod.run(x.astype(np.float64)), want)


class TwoInTwoOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, a, b):
        h = self.fc(a) * torch.sigmoid(b)
        return torch.relu(h), h.sum(dim=1), torch.tanh(b).mean()


def test_multiple_inputs_and_outputs():
    torch.manual_seed(0)
    model = TwoInTwoOut().eval()
    a, b = torch.randn(3, 6), torch.randn(3, 4)
    mod = compiler.compile(model, example_inputs=(a, b))
    assert [s.shape for s in mod.inputs] == [(3, 6), (3, 4)]
    assert [s.shape for s in mod.outputs] == [(3, 4), (3,), ()]
    a2, b2 = torch.randn(3, 6), torch.randn(3, 4)
    want = run_torch(model, (a2, b2))
    got = mod(a2.numpy(), b2.numpy())
    assert isinstance(got, tuple) and len(got) == 3
    assert_close(got, want)
    names = [s.name for s in mod.inputs]
    assert_close(mod.run(**{names[1]: b2.numpy(), names[0]: a2.numpy()}), want)
    assert_close(mod.run(a2.numpy(), **{names[1]: b2.numpy()}), want)


class PassThrough(torch.nn.Module):
    """Outputs that the compiled code may return as its input's own memory (a reshape) or a view."""

    def forward(self, x):
        return x.reshape(2, 6), x * 2.0


def test_repeated_calls_return_independent_results():
    """Calls reuse their input tensors: each call's outputs must be its own, later calls must not
    change results already returned, and returned arrays are writable copies."""
    mod = compiler.compile(PassThrough().eval(), example_inputs=(torch.zeros(3, 4),))
    xs = [np.random.default_rng(i).standard_normal((3, 4)).astype(np.float32) for i in range(3)]
    results = [mod(x) for x in xs]
    kept = [tuple(r.copy() for r in res) for res in results]
    for x, (flat, double) in zip(xs, results):
        np.testing.assert_array_equal(flat, x.reshape(2, 6))
        np.testing.assert_array_equal(double, x * 2.0)
    flat, _ = results[0]
    flat[...] = 7.0  # the caller owns the array
    np.testing.assert_array_equal(mod(xs[1])[0], xs[1].reshape(2, 6))
    np.testing.assert_array_equal(mod(xs[0])[1], xs[0] * 2.0)
    for got, want in zip(results[1:], kept[1:]):  # later calls left earlier results alone
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def test_non_contiguous_and_other_dtype_inputs(compiled_zoo):
    model, inputs = zoo_model("tiny_cnn")
    mod = compiled_zoo("tiny_cnn")
    (x,) = numpy_inputs(_other_inputs(inputs, seed=22))
    want = mod(x)
    strided = np.asfortranarray(x)
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(mod(strided), want)
    np.testing.assert_array_equal(mod(torch.from_numpy(x)), want)
    assert_close(mod(x.astype(np.float64)), want)


def test_benchmark_stats(compiled_zoo):
    mod = compiled_zoo("tiny_cnn")
    res = mod.benchmark(repeat=5)
    assert isinstance(res, BenchmarkResult)
    assert res.repeat == 5
    assert 0 < res.min_ms <= res.median_ms <= res.max_ms
    assert res.min_ms <= res.mean_ms <= res.max_ms
    assert res.std_ms >= 0
    assert res.max_ms < 10_000  # a 32x32 CNN does not take 10 s
    assert "median" in str(res) and "5 runs" in str(res)
    x = mod.random_inputs(seed=1)[0]
    res2 = mod.benchmark(x, repeat=3, warmup=1)
    assert res2.repeat == 3 and 0 < res2.min_ms <= res2.median_ms <= res2.max_ms


# ---------------------------------------------------------------- summary: kernels, params, FLOPs


class ConvBNReLU(torch.nn.Module):
    def __init__(self, bias: bool = False):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.bn = torch.nn.BatchNorm2d(8)
        with torch.no_grad():  # non-trivial statistics, so folding matters numerically
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def test_summary_conv_bn_relu_is_one_kernel():
    torch.manual_seed(1)
    model = ConvBNReLU().eval()
    x = torch.randn(1, 3, 16, 16)
    mod = compiler.compile(model, example_inputs=(x,))
    assert_close(mod(x.numpy()), run_torch(model, (x,)))

    s = mod.summary()
    assert isinstance(s, ModuleSummary)
    assert [i.shape for i in s.inputs] == [(1, 3, 16, 16)] and [o.shape for o in s.outputs] == [(1, 8, 16, 16)]
    conv_kernels = [k for k in s.kernels if any(op.startswith("conv2d") for op in k.ops)]
    assert len(conv_kernels) == 1, s
    ops = conv_kernels[0].ops
    assert any(op.startswith("relu") for op in ops), ops
    for k in s.kernels:  # BatchNorm was folded: nothing of it survives as an op or a kernel
        for op in (k.name, *k.ops):
            assert not op.startswith(("batch_norm", "subtract", "divide", "multiply", "sqrt", "rsqrt")), s
    # params: the model's own count (torch parameters(); BN running stats are buffers, not params)
    assert s.params == sum(p.numel() for p in model.parameters()), s.params

    text = str(s)
    assert "[1, 3, 16, 16]" in text and "[1, 8, 16, 16]" in text
    assert conv_kernels[0].name in text and "conv2d" in text and "relu" in text
    assert f"{s.params:,}" in text


@pytest.mark.parametrize("name", FAST_MODELS + ["lstm"])
def test_summary_params_match_torch(name, compiled_zoo):
    """The parameter count is the torch model's own, whatever Kiln folds or unrolls."""
    model, _ = zoo_model(name)
    assert compiled_zoo(name).summary().params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("bias", [False, True])
def test_flops_single_conv(bias):
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=bias).eval()
    x = torch.randn(1, 4, 15, 15)
    mod = compiler.compile(conv, example_inputs=(x,))
    assert_close(mod(x.numpy()), run_torch(conv, (x,)))
    out = conv(x)
    macs = out.numel() * 4 * 3 * 3
    # the documented convention: 2 FLOPs per multiply-add, 1 per output element for the bias add
    expected = 2 * macs + (out.numel() if bias else 0)
    s = mod.summary()
    assert s.flops == expected, (s.flops, expected)
    assert sum(k.flops for k in s.kernels) == s.flops
    assert s.params == sum(p.numel() for p in conv.parameters())


@pytest.mark.parametrize("bias", [False, True])
def test_flops_single_linear(bias):
    torch.manual_seed(3)
    fc = torch.nn.Linear(48, 20, bias=bias).eval()
    x = torch.randn(5, 48)  # 5 rows: the FLOPs must not include rows a schedule pads to
    mod = compiler.compile(fc, example_inputs=(x,))
    assert_close(mod(x.numpy()), run_torch(fc, (x,)))
    expected = 2 * 5 * 48 * 20 + (5 * 20 if bias else 0)
    assert mod.summary().flops == expected
    assert mod.summary().params == sum(p.numel() for p in fc.parameters())


def test_summary_of_zoo_cnn_lists_fused_conv_kernels(compiled_zoo):
    s = compiled_zoo("tiny_cnn").summary()
    conv_kernels = [k for k in s.kernels if any(op.startswith("conv2d") for op in k.ops)]
    assert len(conv_kernels) == 3  # stem, depthwise, strided
    assert all(any(op.startswith("relu") for op in k.ops) for k in conv_kernels)
    assert not any(op.startswith("batch_norm") for k in s.kernels for op in k.ops)
    assert all(k.calls >= 1 for k in s.kernels)
    # convolutions dominate: the kernel table is sorted by FLOPs, the first kernel is a conv
    assert s.kernels[0] in conv_kernels


# ---------------------------------------------------------------- export and load


_FRESH_RUN = """
import sys
import numpy as np
import compiler
mod = compiler.load(sys.argv[1])
x = np.load(sys.argv[2])
np.save(sys.argv[3], mod(x))
print(mod.summary())
"""


def test_export_and_load(compiled_zoo, tiny_cnn_so, tmp_path):
    model, inputs = zoo_model("tiny_cnn")
    mod = compiled_zoo("tiny_cnn")
    (x,) = numpy_inputs(_other_inputs(inputs, seed=31))
    want = mod(x)
    assert_close(want, run_torch(model, [torch.from_numpy(x)]))

    assert tiny_cnn_so.stat().st_size > 0
    loaded = compiler.load(tiny_cnn_so)
    np.testing.assert_array_equal(loaded(x), want)
    assert loaded.inputs == mod.inputs and loaded.outputs == mod.outputs
    assert loaded.summary() == mod.summary()
    assert loaded.target == mod.target

    # a fresh interpreter that never built the model
    np.save(tmp_path / "x.npy", x)
    proc = run_fresh_python(_FRESH_RUN, str(tiny_cnn_so), str(tmp_path / "x.npy"), str(tmp_path / "y.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), want)
    assert "conv2d" in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr  # TVM's "Scope Loaded" log stays out of the console


def test_export_overwrites_and_creates_dirs(compiled_zoo, tmp_path):
    mod = compiled_zoo("mlp")
    path = tmp_path / "a" / "b" / "mlp.so"
    assert mod.export(path) == path
    path.write_bytes(b"stale")
    mod.export(path)
    x = mod.random_inputs(seed=2)[0]
    model, _ = zoo_model("mlp")
    assert_close(compiler.load(path)(x), run_torch(model, [torch.from_numpy(x)]))
    assert [p.name for p in path.parent.iterdir()] == ["mlp.so"]  # no temporary files left


def test_export_bundle_runs_without_python(compiled_zoo, tmp_path):
    """export(dir, bundle=True) writes a deployment bundle (model, runtime libraries, C++ runner) for
    the module's target; on this x86 machine the runner runs it with no Python in its environment."""
    import subprocess

    mod = compiled_zoo("tiny_cnn")
    bundle = mod.export(tmp_path / "bundle", bundle=True)
    assert bundle == tmp_path / "bundle"
    assert {"model.so", "model.inputs", "kiln_runner", "README.md"} <= {p.name for p in bundle.iterdir()}
    x = mod.random_inputs(seed=5)[0]
    x.tofile(tmp_path / "x.bin")
    run = subprocess.run([str(bundle / "kiln_runner"), str(bundle / "model.so"), str(bundle / "model.inputs"),
                          str(tmp_path / "x.bin")], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    want = mod(x)
    got = np.fromfile(tmp_path / "output0.bin", np.float32).reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not list(tmp_path.glob(".bundle.*"))  # no half-written bundle left beside it


# ---------------------------------------------------------------- ONNX input shapes


def test_onnx_dynamic_batch_with_input_shapes(tmp_path):
    model, (x,) = zoo_model("tiny_cnn")
    path = export_onnx(model, (x,), tmp_path / "dyn.onnx", input_names=["image"], output_names=["logits"],
                       dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    mod = compiler.compile(path, input_shapes={"image": (3, 3, 32, 32)})
    assert [(s.name, s.shape) for s in mod.inputs] == [("image", (3, 3, 32, 32))]
    assert [s.shape for s in mod.outputs] == [(3, 10)]
    xs = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    got = mod(xs.numpy())
    assert_close(got, run_torch(model, (xs,)))
    (want,) = run_ort(path, {"image": xs.numpy()})
    assert_close(got, want)
    # a second batch size from the same file
    mod2 = compiler.compile(path, input_shapes={"image": [2, 3, 32, 32]})
    assert_close(mod2(xs.numpy()[:2]), want[:2])


class LastStep(torch.nn.Module):
    """Negative indexing (``x[:, -1]``, ``x[-1]``), as in sequence models that keep the last step."""

    def forward(self, x):
        return x[:, -1] * 2 + x[-1, 0]


def test_negative_index_select():
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    mod = compiler.compile(LastStep(), example_inputs=(x,))
    x2 = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1))
    assert_close(mod(x2.numpy()), run_torch(LastStep(), (x2,)))


# ---------------------------------------------------------------- per-kernel profile


def test_profile_times_every_kernel(compiled_zoo):
    """profile() times each fused kernel through the VM's instrument hook: every kernel main calls
    shows up once per call with its FLOPs, the rows add up to about the end-to-end latency, and the
    module runs unchanged (hook removed) afterwards."""
    mod = compiled_zoo("tiny_cnn")
    x = mod.random_inputs(seed=3)
    want = mod(*x)
    prof = mod.profile(*x, repeat=5)
    rows = {k.name: k for k in prof.kernels}
    convs = [k for k in mod.meta["kernels"] if "conv2d" in k["name"]]
    assert convs
    for k in convs:
        assert rows[k["name"]].calls == k["calls"] and rows[k["name"]].flops == k["flops"]
        assert rows[k["name"]].ms > 0 and rows[k["name"]].gflops > 0
    assert "VM built-ins" in rows
    assert [k.ms for k in prof.kernels] == sorted((k.ms for k in prof.kernels), reverse=True)
    assert abs(sum(k.share for k in prof.kernels) - 1.0) < 1e-6
    assert 0.3 * prof.total_ms < prof.kernel_ms < 3.0 * prof.total_ms
    text = str(prof)
    assert convs[0]["name"] in text and "GFLOP/s" in text
    np.testing.assert_array_equal(mod(*x), want)
    with pytest.raises(compiler.KilnError, match="repeat"):
        mod.profile(repeat=0)
