"""Microcontroller targets: C library export, static memory plan, limits, and runs under qemu-system-arm.

Tests marked ``mcu`` build the exported library with arm-none-eabi-gcc and run it on QEMU's Cortex-M
boards (mps2-an386 for the M4, mps3-an547 for the M55) with semihosting; they skip with a reason when
the toolchain is missing (``scripts/setup_mcu.sh`` installs it; ``scripts/test.sh`` runs it)."""

from __future__ import annotations

import random
import re
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import compiler
import targets
from compiler.errors import InputShapeError, KilnError, TargetError, UnsupportedOperatorError
from compiler.mcu import MemoryLimitError, compile_mcu, plan as mplan, toolchain
from compiler.mcu.codegen import workspace_peaks
from conftest import assert_close, run_torch

MCU_TARGETS = ("cortex-m3", "cortex-m4", "cortex-m7", "cortex-m55")

needs_toolchain = pytest.mark.skipif(
    not toolchain.have_toolchain(), reason="arm-none-eabi-gcc / qemu-system-arm missing: run scripts/setup_mcu.sh")


class KWSNet(nn.Module):
    """A keyword-spotting CNN (DS-CNN style) on 49x10 MFCC features: ~15 KB of FP32 weights."""

    def __init__(self, classes: int = 12, c: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, (5, 3), (2, 1), (2, 1)), nn.BatchNorm2d(c), nn.ReLU())
        self.dw1 = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, groups=c), nn.BatchNorm2d(c), nn.ReLU())
        self.pw1 = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU())
        self.dw2 = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, groups=c), nn.BatchNorm2d(c), nn.ReLU())
        self.pw2 = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.pw1(self.dw1(self.stem(x)))
        x = x + self.pw2(self.dw2(x))
        return torch.softmax(self.fc(torch.flatten(self.pool(x), 1)), dim=1)


def _kws():
    torch.manual_seed(0)
    model = KWSNet().eval()
    with torch.no_grad():  # informative BatchNorm statistics (not the identity)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model, (torch.randn(1, 1, 49, 10),)


# -- targets -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MCU_TARGETS)
def test_mcu_targets_describe_limits_and_board(name):

    desc = targets.get(name)
    assert desc.family == "mcu" and desc.kind == "c" and desc.buildable
    assert desc.flash_kb > 0 and desc.ram_kb > 0
    assert desc.machine in toolchain.BOARDS
    flags = toolchain.cpu_flags(desc)
    assert f"-mcpu={name}" in flags
    assert ("-mfloat-abi=soft" in flags) == (name == "cortex-m3")


# -- memory planner ------------------------------------------------------------------------------

def test_plan_chain_reuses_memory():
    # a chain a -> b -> c -> d: each tensor lives from its producer to its consumer
    sizes = [4000, 8000, 2000, 6000, 1000]
    bufs = [mplan.Buffer(f"t{i}", s, i, i + 1) for i, s in enumerate(sizes)]
    p = mplan.plan(bufs)
    p.check()
    assert p.arena_bytes < p.tensor_bytes
    # never more than the largest pair of neighbours (aligned)
    assert p.arena_bytes <= max(mplan.align_up(a) + mplan.align_up(b) for a, b in zip(sizes, sizes[1:]))


def test_plan_random_lifetimes_never_collide():
    rng = random.Random(0)
    for _ in range(50):
        bufs = []
        for i in range(rng.randint(1, 30)):
            first = rng.randint(0, 20)
            bufs.append(mplan.Buffer(f"b{i}", rng.randint(1, 5000), first, first + rng.randint(0, 5),
                                     kind=rng.choice(["tensor", "workspace"])))
        p = mplan.plan(bufs)
        p.check()  # asserts that overlapping lifetimes never share bytes
        assert p.arena_bytes <= p.unplanned_bytes
        for b in bufs:
            assert p.offsets[b.name] % mplan.ALIGN == 0


def test_workspace_peaks_replay_lifo_allocations():
    src = """
int32_t __tvm_ffi_k1(void* self_handle, void* args, int32_t num_args, void* result) {
  float* a = ((float*)((float*)TVMBackendAllocWorkspace(1, dev_id, (uint64_t)1000ULL, 2, 32)));
  float* b = ((float*)((float*)TVMBackendAllocWorkspace(1, dev_id, (uint64_t)24ULL, 2, 32)));
  if (TVMBackendFreeWorkspace(1, dev_id, b) != 0) { return -1; }
  for (int i = 0; i < 4; ++i) {
    float* c = ((float*)((float*)TVMBackendAllocWorkspace(1, dev_id, (uint64_t)500ULL, 2, 32)));
    if (TVMBackendFreeWorkspace(1, dev_id, c) != 0) { return -1; }
  }
  if (TVMBackendFreeWorkspace(1, dev_id, a) != 0) { return -1; }
  return 0;
}
int32_t __tvm_ffi_k2(void* self_handle, void* args, int32_t num_args, void* result) {
  return 0;
}
"""
    peaks = workspace_peaks(src)
    assert peaks == {"k1": 1008 + 500, "k2": 0}  # 1000 aligned to 1008, then 500; b (24) fits below c's peak


# -- compile and export (no toolchain needed) --------------------------------------------------------

@pytest.fixture(scope="module")
def kws_m4():
    model, inputs = _kws()
    return model, inputs, compiler.compile(model, target="cortex-m4", example_inputs=inputs)


def test_export_writes_self_contained_c_library(kws_m4, tmp_path):
    _, _, mod = kws_m4
    out = mod.export(tmp_path / "lib")
    names = {p.name for p in out.iterdir()}
    assert {"model.h", "model.c", "Makefile", "model.cmake", "kiln.json"} <= names
    header = (out / "model.h").read_text()
    assert "int model_run(const float* x, float*" in header
    assert "#define MODEL_INPUT_0_SHAPE {1, 1, 49, 10}" in header
    assert re.search(r"#define MODEL_ARENA_BYTES \d+u", header)
    source = (out / "model.c").read_text()
    assert "#include \"tvm/" not in source and "malloc" not in source
    assert "static const uint32_t kiln_w" in source  # weights in flash
    assert "static int32_t __tvm_ffi_" in source  # kernels private to the library
    mem = mod.meta["memory"]
    assert 10_000 < mem["weights_bytes"] < 100_000  # keyword-spotting size: tens of KB
    assert mem["arena_bytes"] < mem["intermediate_bytes"]  # liveness-based reuse pays on a chain
    assert "arena" in mod.memory_report()


def test_flash_limit_fails_at_compile_time_with_numbers():
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)).eval()
    with pytest.raises(MemoryLimitError) as err:
        compiler.compile(model, target="cortex-m4", example_inputs=(torch.randn(1, 1024),))
    msg = str(err.value)
    assert "flash" in msg and "4,239,400 B" in msg and "1,048,576 B" in msg


def test_ram_limit_fails_at_compile_time_with_numbers():
    # tiny_cnn's two 64 KB feature maps do not fit the 128 KB of a Cortex-M3 part next to its input
    with pytest.raises(MemoryLimitError) as err:
        compiler.compile("zoo:tiny_cnn", target="cortex-m3")
    msg = str(err.value)
    assert "RAM" in msg and "arena 131,072 B" in msg and "sum of all intermediates" in msg and "131,072 B" in msg


def test_operator_without_c_lowering_is_named():
    class CumSum(nn.Module):
        def forward(self, x):
            return torch.cumsum(x * 2, dim=1)

    with pytest.raises(UnsupportedOperatorError, match=r"relax\.cumsum"):
        compiler.compile(CumSum(), target="cortex-m4", example_inputs=(torch.randn(1, 8),))


def test_dynamic_shapes_are_refused_with_the_reason():
    program = torch.export.export(nn.Linear(16, 4).eval(), (torch.randn(2, 16),),
                                  dynamic_shapes={"input": {0: torch.export.Dim("batch")}})
    with pytest.raises(InputShapeError, match="static shapes"):
        compiler.compile(program, target="cortex-m4")


def test_tuning_logs_are_refused_for_mcu(tmp_path):
    with pytest.raises(KilnError, match="microcontroller"):
        compiler.compile("zoo:mlp", target="cortex-m4", tuning_logs=tmp_path)


def test_missing_toolchain_names_the_setup_script(monkeypatch):
    monkeypatch.setattr(toolchain.shutil, "which", lambda name: None)
    with pytest.raises(TargetError, match=r"scripts/setup_mcu\.sh.*gcc-arm-none-eabi"):
        toolchain.tool("arm-none-eabi-gcc")


# -- under QEMU ----------------------------------------------------------------------------------

@pytest.mark.mcu
@needs_toolchain
def test_kws_cnn_on_cortex_m4_matches_pytorch(kws_m4):
    model, inputs, mod = kws_m4
    got, ticks = mod.run(inputs[0].numpy(), profile=True)
    assert_close(got, run_torch(model, inputs), what="kws on cortex-m4")
    assert len(ticks) == len(mod.meta["kernels_called"]) and all(t > 0 for t in ticks)
    sizes = mod.meta["sizes"]  # measured with arm-none-eabi-size during export
    assert sizes["bss"] >= mod.meta["memory"]["arena_bytes"]
    assert sizes["text"] >= mod.meta["memory"]["weights_bytes"]
    print(mod.memory_report())


@pytest.mark.mcu
@needs_toolchain
def test_kws_cnn_on_cortex_m55_matches_pytorch():
    model, inputs = _kws()
    mod = compiler.compile(model, target="cortex-m55", example_inputs=inputs)
    assert_close(mod.run(inputs[0].numpy()), run_torch(model, inputs), what="kws on cortex-m55")


@pytest.mark.mcu
@needs_toolchain
@pytest.mark.parametrize("target", ["cortex-m4", "cortex-m55"])
def test_dense_network_matches_pytorch(target):
    from compiler import zoo

    model, inputs = zoo.load("mlp")
    mod = compiler.compile("zoo:mlp", target=target)
    assert_close(mod.run(inputs[0].numpy()), run_torch(model, inputs), what=f"mlp on {target}")


@pytest.mark.mcu
@needs_toolchain
def test_plain_loops_plan_kernel_workspaces_in_the_arena():
    """Without the MCU schedule every fused intermediate is a TVMBackendAllocWorkspace: the planner gives
    each kernel's workspace a region of the arena, and the results are still right."""
    model, inputs = _kws()
    mod = compile_mcu(model, targets.get("cortex-m7"), example_inputs=inputs, schedule_kernels=False)
    mem = mod.meta["memory"]
    assert mem["workspace_bytes"] > 0
    assert mem["arena_bytes"] < mem["intermediate_bytes"] + mem["workspace_bytes"] * len(mod.meta["kernels_called"])
    assert_close(mod.run(inputs[0].numpy()), run_torch(model, inputs), what="plain loops on cortex-m7")


@pytest.mark.mcu
@needs_toolchain
def test_cli_compile_and_emulate_tiny_cnn(tmp_path, capsys):
    from compiler import zoo
    from compiler.cli import main

    model, inputs = zoo.load("tiny_cnn")
    np.savez(tmp_path / "in.npz", x=inputs[0].numpy())
    out = tmp_path / "lib"
    assert main(["compile", "zoo:tiny_cnn", "--target", "cortex-m4", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "wrote C library" in text and "weights (flash)" in text and "code (flash" in text
    assert main(["run", str(out), "--emulate", "--inputs", str(tmp_path / "in.npz"), "--outputs",
                 str(tmp_path / "out.npz"), "--benchmark", "1"]) == 0
    text = capsys.readouterr().out
    assert "instructions per kernel" in text
    with np.load(tmp_path / "out.npz") as data:
        got = data[data.files[0]]
    assert_close(got, run_torch(model, inputs), what="tiny_cnn via kiln run --emulate")


@pytest.mark.mcu
@needs_toolchain
def test_generated_makefile_builds_the_library(kws_m4, tmp_path):
    _, _, mod = kws_m4
    out = mod.export(tmp_path / "lib")
    proc = subprocess.run(["make", "-C", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (out / "libmodel.a").exists()


def test_every_weight_is_emitted_once_per_constant():
    """Regression: constants were once keyed by the id() of short-lived Python wrappers, so two weights
    could silently share one array. Compile the same module object twice: weights = parameters."""
    from compiler import zoo

    model, inputs = zoo.load("mlp")
    n_bytes = 4 * sum(p.numel() for p in model.parameters())
    for target in ("cortex-m4", "cortex-m7"):
        mod = compiler.compile(model, target=target, example_inputs=inputs)
        assert mod.meta["memory"]["weights_bytes"] == n_bytes


# -- reshape aliasing --------------------------------------------------------------------------------

def test_reshape_between_kernels_aliases_its_input(kws_m4, tmp_path):
    """The KWS CNN's flatten is no kernel and no buffer: its output is its input's bytes."""
    _, _, mod = kws_m4
    assert not any("reshape" in k for k in mod.meta["kernels_called"])
    aliases = [t for t in mod.program.tensors if t.kind == "alias"]
    assert len(aliases) == 1 and mod.program.tensors[aliases[0].alias_of].shape == (1, 32, 1, 1)
    assert f"t{aliases[0].index}" not in mod.plan.offsets  # no arena bytes of its own
    source = (mod.export(tmp_path / "lib") / "model.c").read_text()
    assert "/* reshape of" in source


def test_alias_keeps_its_owner_alive_in_the_plan():
    from compiler.mcu.codegen import Call, Program, Tensor, build_plan

    f32 = "float32"
    ts = [Tensor(0, "x", (4,), f32, "input"), Tensor(1, "a", (64,), f32, "intermediate"),
          Tensor(2, "a2", (8, 8), f32, "alias", alias_of=1), Tensor(3, "b", (64,), f32, "intermediate"),
          Tensor(4, "c", (64,), f32, "intermediate"), Tensor(5, "y", (4,), f32, "intermediate", output_slot=0)]
    calls = [Call(0, "k0", [0, 1], 1), Call(1, "k1", [0, 3], 1), Call(2, "k2", [3, 2, 4], 1), Call(3, "k3", [4, 5], 1)]
    plan = build_plan(Program(ts, calls, [0], [5]), {})
    a = next(b for b in plan.buffers if b.name == "t1")
    assert (a.first, a.last) == (0, 2)  # read through its alias at step 2
    assert plan.offsets["t1"] != plan.offsets["t3"]


# -- Cortex-M3 (soft float) ----------------------------------------------------------------------------

@pytest.mark.mcu
@needs_toolchain
def test_kws_cnn_on_cortex_m3_soft_float_matches_pytorch():
    model, inputs = _kws()
    mod = compiler.compile(model, target="cortex-m3", example_inputs=inputs)
    assert "-mfloat-abi=soft" in toolchain.cpu_flags(mod.target)
    assert_close(mod.run(inputs[0].numpy()), run_torch(model, inputs), what="kws on cortex-m3 (mps2-an385)")


# -- INT8 ------------------------------------------------------------------------------------------------

#: The tolerance compiler/quantize.py states (relative L2 error of int8 vs FP32 on calibration-like data).
INT8_MAX_REL_L2 = 0.05


def _calib(shape, n: int, seed: int) -> list[np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tuple(shape), generator=g).numpy() for _ in range(n)]


def _rel_l2(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def kws_int8_m4():
    model, inputs = _kws()
    return compiler.compile(model, target="cortex-m4", example_inputs=inputs, precision="int8",
                            calibration=_calib((1, 1, 49, 10), 32, 1))


def test_int8_weights_and_arena_shrink(kws_m4, kws_int8_m4, tmp_path):
    mem32, mem8 = kws_m4[2].meta["memory"], kws_int8_m4.meta["memory"]
    assert mem8["weights_fp32_bytes"] == mem32["weights_bytes"]
    # int8 weights plus, per output channel, an int32 bias and a float scale: in this 32-channel model
    # those are 1.4 KB of the 4.8 KB (33 %); the MLP below, with wider layers, is at 27 %
    assert mem8["weights_bytes"] <= 0.34 * mem32["weights_bytes"]
    assert mem8["arena_bytes"] <= 0.55 * mem32["arena_bytes"]  # 8-bit intermediates between layers
    out = kws_int8_m4.export(tmp_path / "lib")
    header = (out / "model.h").read_text()
    assert "int model_run(const float* x, float*" in header and "Precision int8" in header
    assert '#define MODEL_PRECISION "int8"' in header
    report = kws_int8_m4.memory_report()
    assert "(int8)" in report and "the same weights in fp32" in report


def test_int8_without_calibration_fails_before_compiling():
    from compiler.quantize import MissingCalibrationError

    with pytest.raises(MissingCalibrationError, match="--calibration"):
        compiler.compile("zoo:mlp", target="cortex-m4", precision="int8")


def test_int8_unsupported_precision_names_the_choices():
    with pytest.raises(KilnError) as err:
        compiler.compile("zoo:mlp", target="cortex-m4", precision="fp16")
    assert "fp32" in str(err.value) and "int8" in str(err.value)
    with pytest.raises(KilnError, match="fp32, fp16, int8"):
        compiler.compile("zoo:mlp", target="cortex-m4", precision="int4")


@pytest.mark.mcu
@needs_toolchain
@pytest.mark.parametrize("target", ["cortex-m4", "cortex-m55"])
def test_kws_cnn_int8_under_qemu_matches_pytorch_fp32(target, kws_int8_m4):
    model, inputs = _kws()
    mod = kws_int8_m4 if target == "cortex-m4" else compiler.compile(
        model, target=target, example_inputs=inputs, precision="int8", calibration=_calib((1, 1, 49, 10), 32, 1))
    errs, agree = [], 0
    tests = [inputs[0].numpy()] + _calib((1, 1, 49, 10), 3, 2)
    for x in tests:
        got, want = mod.run(x), run_torch(model, (torch.from_numpy(x),))
        errs.append(_rel_l2(got, want))
        agree += int(got.argmax() == want.argmax())
    print(f"kws int8 on {target}: rel L2 vs PyTorch fp32 {max(errs):.4f} (max of {len(tests)}), top-1 {agree}/{len(tests)}")
    print(mod.memory_report())
    assert max(errs) < INT8_MAX_REL_L2 and agree == len(tests)
    sizes = mod.meta["sizes"]
    assert sizes["text"] >= mod.meta["memory"]["weights_bytes"] and sizes["bss"] >= mod.meta["memory"]["arena_bytes"]


@pytest.mark.mcu
@needs_toolchain
def test_mlp_int8_on_cortex_m4_quarter_flash(tmp_path):
    from compiler import zoo

    model, inputs = zoo.load("mlp")
    fp32 = compiler.compile(model, target="cortex-m4", example_inputs=inputs)
    mod = compiler.compile(model, target="cortex-m4", example_inputs=inputs, precision="int8",
                           calibration=np.concatenate(_calib((1, 64), 32, 1)))  # 32 examples stacked
    assert mod.meta["memory"]["weights_bytes"] <= 0.30 * fp32.meta["memory"]["weights_bytes"]
    got, want = mod.run(inputs[0].numpy()), run_torch(model, inputs)
    assert _rel_l2(got, want) < INT8_MAX_REL_L2
    fp32.export(tmp_path / "fp32")  # measures the object with arm-none-eabi-size
    mod.export(tmp_path / "int8")
    assert mod.meta["sizes"]["text"] < 0.4 * fp32.meta["sizes"]["text"]
    print(fp32.memory_report())
    print(mod.memory_report())



# -- Helium (M55) vector schedules ------------------------------------------------------------------------

def test_vector_form_only_for_helium_float_reductions():
    from compiler import pipeline
    from compiler.mcu import schedule

    assert schedule.vector_lanes(targets.get("cortex-m55")) == 4
    assert all(schedule.vector_lanes(targets.get(t)) == 1 for t in ("cortex-m3", "cortex-m4", "cortex-m7"))
    desc = targets.get("cortex-m55")
    fused = pipeline.lower("zoo:mlp", desc).fused
    text = schedule.schedule_kernel(fused["fused_matmul1_add_relu"], 4).script()
    # k outside, the 128 outputs a plain (vectorisable) innermost loop, not unrolled register blocks
    assert "for k, i1 in T.grid(T.int64(128), T.int64(128))" in text and "T.unroll" not in text
    assert "T.unroll" in schedule.schedule_kernel(fused["fused_matmul1_add_relu"], 1).script()


@pytest.mark.mcu
@needs_toolchain
def test_m55_library_uses_helium_vector_instructions(tmp_path):
    mod = compiler.compile("zoo:mlp", target="cortex-m55")
    out = mod.export(tmp_path / "lib")
    flags = toolchain.cpu_flags(mod.target) + toolchain.c_flags(mod.target)
    asm = subprocess.run(["arm-none-eabi-gcc", *flags, "-S", "-o", "-", str(out / "model.c")], capture_output=True,
                         text=True, check=True).stdout  # objdump does not decode MVE loads without help
    assert re.search(r"vldrw\.32\s+q\d", asm) and re.search(r"v(fma|mul)\.f32\s+q\d", asm)
