"""NVIDIA GPU targets: code generation and export everywhere; execution only where a GPU exists.

On a machine without a GPU (CI, this development machine) the tests check what can be checked: the
targets, that builds use DLight's / Kiln's GPU schedules, that the exported .so is x86-64 and carries
compiled SASS for the target's ``sm_XX`` (read from the fatbin headers, no cuobjdump needed), FP16
kernels with FP32 accumulation, and clear errors. The tests marked ``cuda`` run the modules on the
GPU against PyTorch and skip with "no CUDA GPU on this machine" elsewhere: on a GPU machine run
``pytest tests/test_cuda.py`` (or ``-m cuda`` for the execution tests alone).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import compiler
import targets
from compiler import artifact, cli, cuda
from compiler.errors import IncompatibleModuleError, KilnError, TargetError
from conftest import assert_close, numpy_inputs, run_fresh_python, run_torch, zoo_model

GPU_TARGETS = {"t4": "sm_75", "a100": "sm_80", "rtx30": "sm_86", "l4": "sm_89", "h100": "sm_90",
               "jetson-orin-gpu": "sm_87"}
NO_GPU = "no CUDA GPU on this machine"
needs_nvcc = pytest.mark.skipif(cuda.find_nvcc() is None, reason="nvcc (CUDA toolkit) not installed")
needs_gpu = pytest.mark.skipif(not cuda.has_gpu(), reason=NO_GPU)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``built(model, target, precision)`` -> (CompiledModule, exported path), each built once."""
    cache: dict = {}
    out = tmp_path_factory.mktemp("cuda")

    def get(name: str, target: str, precision: str = "fp32"):
        key = (name, target, precision)
        if key not in cache:
            model, inputs = zoo_model(name)
            mod = compiler.compile(model, target=target, example_inputs=inputs, precision=precision)
            cache[key] = (mod, mod.export(out / f"{name}-{target}-{precision}.so"))
        return cache[key]

    return get


# -- targets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,arch", sorted(GPU_TARGETS.items()))
def test_gpu_targets(name, arch):

    d = targets.get(name)
    assert d.family == "cuda" and d.kind == "cuda" and d.arch == arch and d.buildable
    assert targets.get(arch) == d  # every architecture is also an alias
    assert {"tensorcore", "fp16"} <= set(d.features) and d.cores > 0 and d.l2_kb > 0 and d.ram_kb > 0
    assert ("bf16" in d.features) == (arch != "sm_75")
    assert ("tma" in d.features and "wgmma" in d.features) == (arch == "sm_90")
    t = d.to_tvm()
    assert t.kind.name == "cuda" and str(t.attrs["arch"]) == arch
    assert str(t.host.attrs["mtriple"]).startswith("aarch64" if name == "jetson-orin-gpu" else "x86_64")
    assert "mcpu" not in t.host.attrs or name == "jetson-orin-gpu"  # host code for any x86-64 CPU
    assert targets.get("rtx3090") == targets.get("rtx30")


# -- build and export ---------------------------------------------------------------------------
@needs_nvcc
@pytest.mark.parametrize("target", ["h100", "a100"])
@pytest.mark.parametrize("name", ["tiny_cnn", "mlp", "bert"])
def test_export_embeds_device_code(built, name, target):
    mod, path = built(name, target)
    arch = GPU_TARGETS[target]
    assert artifact.elf_machine(path) == "x86_64"
    code = cuda.device_code(path)
    assert code and {e["arch"] for e in code} == {arch}, code  # SASS for exactly this GPU
    assert all(e["kind"] == "sass" and e.get("elf_machine") == 190 for e in code)  # EM_CUDA cubins
    assert not cuda.carries_cuda_source(path)  # nothing left to compile at load time
    meta = artifact.read_metadata(path)
    assert meta["target"]["name"] == target and meta["target"]["arch"] == arch and meta["precision"] == "fp32"
    assert mod.runs_here == cuda.has_gpu()


@needs_nvcc
def test_jetson_orin_gpu_cross_compiles_host(tmp_path):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ not installed (scripts/setup_arm.sh)")
    model, inputs = zoo_model("mlp")
    path = compiler.compile(model, target="jetson-orin-gpu", example_inputs=inputs).export(tmp_path / "m.so")
    assert artifact.elf_machine(path) == "aarch64" and cuda.device_archs(path) == {"sm_87"}


@needs_nvcc
def test_matmul_kernel_uses_dlight_schedule():
    """A 64x256x512 dense layer: tiled over blocks and threads, staged through shared memory."""
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU())
    mod = compiler.compile(model, target="h100", example_inputs=(torch.randn(64, 256),))
    src = cuda.kernel_source(mod._executable)
    start = src.index('extern "C" __global__', src.index("fused_matmul"))
    kernel = src[start:]
    kernel = kernel[: kernel.find('extern "C" __global__', 10)]
    assert "matmul" in kernel and "blockIdx" in kernel and "threadIdx" in kernel
    assert "__shared__" in kernel
    # no single thread looping over all 64 x 512 outputs: a launch of many threads, short loops
    assert "__launch_bounds__(1)" not in kernel and "< 32768" not in kernel and "< 512;" not in kernel


@needs_nvcc
def test_depthwise_conv_uses_kiln_rule():
    """Depthwise convolution: one thread per output, the 3x3 window summed in a register (not DLight's
    GeneralReduction, which spends a thread block per output element)."""
    import tvm

    from compiler import pipeline
    from schedules.cuda import rules
    from schedules.cuda.conv import WindowedReduction

    model = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.ReLU())
    desc = targets.get("h100")
    fused = pipeline.lower(model, desc, example_inputs=(torch.randn(1, 16, 32, 32),)).fused
    (func,) = [f for gv, f in fused.functions_items() if "conv2d" in gv.name_hint]
    with desc.to_tvm():
        chosen = next(type(r).__name__ for r in rules(desc) if r.apply(func, desc.to_tvm(), False) is not None)
        assert chosen == "WindowedReduction"
        dense = torch.nn.Conv2d(64, 64, 3, padding=1)
        dense_fused = pipeline.lower(dense, desc, example_inputs=(torch.randn(1, 64, 16, 16),)).fused
        (dense_func,) = [f for gv, f in dense_fused.functions_items() if "conv2d" in gv.name_hint]
        assert WindowedReduction().apply(dense_func, desc.to_tvm(), False) is None  # DLight's Matmul takes it
    assert isinstance(func, tvm.tirx.PrimFunc)
    src = cuda.kernel_source(compiler.compile(model, target="h100",
                                              example_inputs=(torch.randn(1, 16, 32, 32),))._executable)
    start = src.index('extern "C" __global__', src.index("fused_conv2d"))
    kernel = src[start: src.find('extern "C" __global__', start + 10) if src.count("__global__") > 2 else None]
    assert "__launch_bounds__(256)" in kernel and "_local_ptr[1]" in kernel and "< 0x0p+0f" in kernel  # relu fused (x < 0 ? 0 : x)


@needs_nvcc
def test_fp16_kernels_accumulate_in_fp32(built):
    mod, path = built("mlp", "h100", "fp16")
    assert [s.dtype for s in mod.inputs] == ["float32"] and [s.dtype for s in mod.outputs] == ["float32"]
    assert mod.meta["precision"] == "fp16" and artifact.read_metadata(path)["precision"] == "fp16"
    src = cuda.kernel_source(mod._executable)
    matmuls = [k for k in src.split('extern "C" __global__')[1:] if "matmul" in k.split("_kernel(")[0] and "{" in k]
    assert matmuls
    for k in matmuls:
        params = k[k.index("_kernel("): k.index("{")]
        assert "half*" in params  # FP16 operands (weights and activations)
        assert "float matmul_intermediate" in k  # FP32 accumulator
    assert cuda.device_archs(path) == {"sm_90"}


def test_precision_is_validated():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(KilnError) as info:
        compiler.compile(model, target="h100", example_inputs=(torch.randn(1, 3),), precision="int8")
    assert "'int8'" in str(info.value) and "fp32" in str(info.value) and "fp16" in str(info.value)
    with pytest.raises(KilnError, match="NVIDIA GPU targets only"):
        compiler.compile(model, target="x86", example_inputs=(torch.randn(1, 3),), precision="fp16")


# -- errors -------------------------------------------------------------------------------------
def test_cuda_build_without_nvcc_is_a_target_error(monkeypatch):
    monkeypatch.setattr(cuda, "find_nvcc", lambda: None)
    with pytest.raises(TargetError) as info:
        compiler.compile(torch.nn.Linear(3, 2), target="h100", example_inputs=(torch.randn(1, 3),))
    msg = str(info.value)
    assert "'h100'" in msg and "nvcc" in msg and "CUDA toolkit" in msg and "PATH" in msg


@needs_nvcc
def test_no_gpu_module_refuses_to_run_clearly(built, tmp_path):
    if cuda.has_gpu():
        pytest.skip("this machine has a CUDA GPU")
    mod, path = built("mlp", "h100")
    assert not mod.runs_here
    with pytest.raises(IncompatibleModuleError, match="no CUDA GPU"):
        mod.run(*mod.random_inputs())
    with pytest.raises(IncompatibleModuleError, match="needs a CUDA GPU") as info:
        compiler.load(path)
    assert "'h100'" in str(info.value) and "sm_90" in str(info.value)
    # a fresh process that never built anything (no stub driver loaded): the same clear error, via the CLI
    proc = run_fresh_python(
        "import sys\nfrom compiler import cli\nrc = cli.main(['run', sys.argv[1]])\nassert rc != 0, rc\n", str(path))
    assert "needs a CUDA GPU" in proc.stderr and "recompile with --target x86" in proc.stderr


@needs_nvcc
def test_cli_compile_for_gpu(tmp_path, capsys):
    out = tmp_path / "mlp.so"
    assert cli.main(["compile", "zoo:mlp", "--target", "a100", "-o", str(out), "--precision", "fp16"]) == 0
    assert cuda.device_archs(out) == {"sm_80"} and artifact.read_metadata(out)["precision"] == "fp16"
    assert "wrote" in capsys.readouterr().out


def test_stub_driver_library_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    stub = cuda.stub_library()
    assert stub.is_relative_to(tmp_path / "cuda-stub") and stub.name == "libcuda.so.1"
    assert artifact.elf_machine(stub) == "x86_64" and b"cuModuleLoadData" in stub.read_bytes()
    assert cuda.stub_library() == stub  # built once


# -- execution on a GPU (skipped without one) -------------------------------------------------------
def _target_for_this_gpu() -> str:
    import tvm

    arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
    try:
        return targets.get(arch).name
    except KilnError:
        pytest.skip(f"no Kiln target for this GPU's architecture {arch}")


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("precision,rtol,atol_scale", [("fp32", 1e-3, 1e-3), ("fp16", 2e-2, 2e-2)])
@pytest.mark.parametrize("name", ["tiny_cnn", "mlp", "bert", "mobilenetv2"])
def test_gpu_matches_pytorch(tmp_path, name, precision, rtol, atol_scale):
    target = _target_for_this_gpu()
    model, inputs = zoo_model(name)
    mod = compiler.compile(model, target=target, example_inputs=inputs, precision=precision)
    want = run_torch(model, inputs)
    assert_close(mod(*numpy_inputs(inputs)), want, rtol, atol_scale, f"{name} {precision} in memory")
    loaded = compiler.load(mod.export(tmp_path / "m.so"))  # no nvcc involved at load time
    assert_close(loaded(*numpy_inputs(inputs)), want, rtol, atol_scale, f"{name} {precision} loaded")
    print(f"{name} {precision} on {target}: {loaded.benchmark(repeat=20)}")


@pytest.mark.cuda
@needs_gpu
def test_module_for_other_gpu_is_refused(tmp_path):
    target = _target_for_this_gpu()
    other = "t4" if targets.get(target).arch != "sm_75" else "h100"
    model, inputs = zoo_model("mlp")
    path = compiler.compile(model, target=other, example_inputs=inputs).export(tmp_path / "m.so")
    if targets.get(other).arch[:4] == targets.get(target).arch[:4]:
        pytest.skip("same major architecture")
    with pytest.raises(IncompatibleModuleError, match="compute capability"):
        compiler.load(path)
    assert np.isfinite(compiler.load(compiler.compile(model, target=target, example_inputs=inputs)
                                     .export(tmp_path / "ok.so"))(*numpy_inputs(inputs))).all()


# -- tuning -------------------------------------------------------------------------------------
def _gpu_tasks(target: str, model: str = "tiny_cnn"):
    from compiler import pipeline
    from compiler.tuning import search

    desc = targets.get(target)
    fused = pipeline.lower(f"zoo:{model}", desc).fused
    return desc, search.extract_tasks(fused, desc.to_tvm())


def test_gpu_tuning_refused_clearly_without_a_gpu(tmp_path):
    if cuda.has_gpu():
        pytest.skip("this machine has a GPU: test_tune_on_gpu runs instead")
    with pytest.raises(TargetError, match=r"'h100'.*machine with that GPU.*kiln tune") as err:
        compiler.tune("zoo:tiny_cnn", "h100", trials=2, log_dir=tmp_path / "logs")
    assert not (tmp_path / "logs").exists()  # refused before anything is written
    assert "--tuning-logs" in str(err.value)


@needs_nvcc
def test_gpu_tuning_candidates_build_with_device_code(tmp_path):
    """The half of ``tune(target="h100")`` that runs on the build machine: every task's default
    schedule (DLight / Kiln's GPU rules, measured as a record like the CPU defaults) and MetaSchedule's
    candidates from its CUDA design space build in the tuner's build worker, as linked .so files (what
    an RPC device or the local runner loads) carrying SASS for sm_90."""
    from tvm.s_tir import meta_schedule as ms

    from compiler.tuning import search

    desc, tasks = _gpu_tasks("h100")
    target = desc.to_tvm()
    conv = next(t for t in tasks if "conv2d" in t.name)
    with cuda.build_environment(desc.name):
        for task in tasks:
            sch = search.default_schedule(task, desc)
            assert sch is not None, f"{task.name}: no default GPU schedule"
        ctx = ms.TuneContext(mod=conv.mod, target=target, space_generator="post-order-apply",
                             search_strategy=ms.search_strategy.ReplayTrace(), task_name=conv.name,
                             rand_state=1, num_threads=1).clone()
        ctx.pre_tuning(max_trials=2, num_trials_per_iter=2,
                       design_spaces=ctx.space_generator.generate_design_space(ctx.mod))
        candidates = ctx.generate_measure_candidates()
        assert candidates, "MetaSchedule produced no CUDA candidate"
        mods = [search.default_schedule(conv, desc).mod] + [c.sch.mod for c in candidates[:1]]
        for mod in mods:
            path = search._build_worker(mod, target, None, "")
            assert cuda.device_archs(path) == {"sm_90"}, path


@pytest.mark.cuda
@pytest.mark.slow
@needs_gpu
def test_tune_on_gpu(tmp_path):
    """On a GPU machine: a short tuning run for this GPU, then the tuned build matches PyTorch and
    applies a record to every kernel."""
    target = _target_for_this_gpu()
    model, inputs = zoo_model("tiny_cnn")
    report = compiler.tune(model, target, example_inputs=inputs, trials=8, log_dir=tmp_path / "logs")
    assert report.total_trials == 8 and all(t.best_ms is not None for t in report.tasks)
    mod = compiler.compile(model, target=target, example_inputs=inputs, tuning_logs=tmp_path / "logs")
    assert mod.meta["untuned_kernels"] == []
    assert_close(mod(*numpy_inputs(inputs)), run_torch(model, inputs), 1e-3, 1e-3, "tuned tiny_cnn on GPU")
    print(report)
