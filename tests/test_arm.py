"""ARM Linux targets: descriptions, cross-compilation on x86, the emulated aarch64 device, bundles.

Tests marked ``emulator`` run aarch64 modules under QEMU user mode on the device that
``scripts/setup_arm.sh`` sets up (``scripts/test.sh`` runs it); without it they skip, saying so.
Cross-compiling needs ``aarch64-linux-gnu-g++`` / ``arm-linux-gnueabihf-g++`` (also from setup_arm.sh).
"""

from __future__ import annotations

import dataclasses
import shutil
import struct
import subprocess

import numpy as np
import pytest
from conftest import assert_close, run_torch, zoo_model

import compiler
import targets
from compiler import artifact, cli, emulator
from compiler.errors import IncompatibleModuleError, InputShapeError, KilnError, TargetError

AARCH64 = ["rpi4", "rpi5", "jetson-orin-cpu", "graviton3"]

_NO_DEVICE = emulator.unavailable_reason()
needs_emulator = pytest.mark.skipif(_NO_DEVICE is not None, reason=f"{_NO_DEVICE}")
needs_aarch64_cc = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                                      reason="aarch64-linux-gnu-g++ not installed: run scripts/setup_arm.sh")
needs_armhf_cc = pytest.mark.skipif(shutil.which("arm-linux-gnueabihf-g++") is None,
                                    reason="arm-linux-gnueabihf-g++ not installed: run scripts/setup_arm.sh")


def _cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _numpy(inputs):
    return [x.detach().numpy() for x in inputs]


@pytest.fixture(scope="module")
def arm_modules(tmp_path_factory):
    """``arm_modules(model, target)``: a zoo model compiled for ``target`` and exported (once each)."""
    root = tmp_path_factory.mktemp("arm")
    cache = {}

    def get(name: str, target: str = "arm"):
        if (name, target) not in cache:
            model, inputs = zoo_model(name)
            mod = compiler.compile(model, target, example_inputs=inputs)
            cache[name, target] = (mod, mod.export(root / f"{name}-{target}.so"))
        return cache[name, target]

    return get


# ---------------------------------------------------------------- target descriptions


@pytest.mark.parametrize("name,cpu,features", [
    ("rpi4", "cortex-a72", {"neon"}),
    ("rpi5", "cortex-a76", {"neon", "dotprod", "fp16"}),
    ("jetson-orin-cpu", "cortex-a78ae", {"neon", "dotprod", "fp16"}),
    ("graviton3", "neoverse-v1", {"neon", "sve", "dotprod", "bf16", "i8mm", "fp16"}),
    ("armv7", "cortex-a7", {"neon", "vfp4"}),
])
def test_arm_target_descriptions(name, cpu, features):
    d = targets.get(name)
    assert d.family == "arm" and d.kind == "llvm" and d.cpu == cpu and set(d.features) == features
    assert d.is_cross and d.cross_compiler and d.cores >= 1 and d.l1d_kb > 0 and d.remote
    assert d.buildable
    t = d.to_tvm()
    assert str(t.attrs["mcpu"]) == cpu and str(t.attrs["mtriple"]) == d.triple
    # the features reach LLVM: TVM's own view of the target agrees with the description
    assert bool(t.attrs["feature.has_asimd"]) == ("neon" in features)
    assert bool(t.attrs["feature.has_dotprod"]) == ("dotprod" in features)
    assert bool(t.attrs["feature.has_sve"]) == ("sve" in features)
    assert bool(t.attrs["feature.has_fp16_simd"]) == ("fp16" in features)
    if name == "armv7":
        assert d.triple == "armv7l-linux-gnueabihf" and d.float_abi == "hard"
        assert d.cross_compiler == "arm-linux-gnueabihf-g++" and not bool(t.attrs["feature.is_aarch64"])
    else:
        assert d.triple == "aarch64-linux-gnu" and d.cross_compiler == "aarch64-linux-gnu-g++"


def test_arm_alias_is_a_cortex_a72_board():
    assert targets.get("arm") == targets.get("rpi4") == targets.get("aarch64")
    assert targets.get("arm").cpu == "cortex-a72"


def test_arm_default_schedules_use_128_bit_neon():
    """The default (x86) rules size vectors from the target description: 4 float32 lanes of NEON on
    every ARM target (Graviton3's SVE included: TVM's LLVM codegen emits NEON)."""
    from schedules import x86

    for name in AARCH64 + ["armv7"]:
        desc = targets.get(name)
        assert desc.vector_bits == 128 and desc.vector_lanes("float32") == 4, name
        assert all(rule.desc is desc for rule in x86.rules(desc)), name


# ---------------------------------------------------------------- cross-compiling


@needs_aarch64_cc
def test_compile_for_arm_writes_an_aarch64_module(arm_modules, tmp_path):
    mod, path = arm_modules("tiny_cnn")
    assert mod.target.name == "rpi4" and not mod.runs_here
    x = _numpy(zoo_model("tiny_cnn")[1])
    for call in (lambda: mod.run(*x), lambda: mod.benchmark(repeat=1)):
        with pytest.raises(IncompatibleModuleError) as info:
            call()
        assert "export" in str(info.value) and "--emulate" in str(info.value)
    assert artifact.elf_machine(path) == "aarch64"
    assert artifact.read_metadata(path)["target"]["name"] == "rpi4"
    assert mod.summary().target == "rpi4" and len(mod.summary().kernels) > 0
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump:  # the default schedules vectorise: 4-lane NEON multiply-adds, no scalar fused multiply-add
        asm = subprocess.run([objdump, "-d", str(path)], capture_output=True, text=True, check=True).stdout
        assert asm.count(".4s") > 50, "no NEON float32x4 code in the module"


@needs_aarch64_cc
def test_load_aarch64_module_on_x86_names_emulate(arm_modules, capsys):
    _, path = arm_modules("tiny_cnn")
    with pytest.raises(IncompatibleModuleError) as info:
        compiler.load(path)
    msg = str(info.value)
    assert "aarch64" in msg and "x86_64" in msg and "--emulate" in msg and "setup_arm.sh" in msg
    code, _, err = _cli(capsys, "run", path)
    assert code == 1 and "--emulate" in err and err.count("\n") == 1


@needs_armhf_cc
def test_armv7_cross_compiles_to_a_hard_float_arm_elf(arm_modules):
    mod, path = arm_modules("tiny_cnn", "armv7")
    head = path.read_bytes()[:40]
    assert artifact.elf_machine(path) == "arm"
    assert head[4] == 1, "not a 32-bit ELF"  # ELFCLASS32
    (e_flags,) = struct.unpack("<I", head[36:40])
    assert e_flags & 0x400, "not the hard-float ABI (EF_ARM_ABI_FLOAT_HARD)"
    assert e_flags >> 24 == 5, "not EABI version 5"
    with pytest.raises(IncompatibleModuleError, match="armv7"):
        emulator.load(path)


def test_missing_cross_compiler_names_the_package(tmp_path):
    model, inputs = zoo_model("mlp")
    d = dataclasses.replace(targets.get("rpi4"), name="rpi4-nocc", cross_compiler="aarch64-kilntest-linux-gnu-g++")
    mod = compiler.compile(model, d, example_inputs=inputs)  # LLVM cross-compiles on its own
    with pytest.raises(TargetError) as info:
        mod.export(tmp_path / "m.so")
    msg = str(info.value)
    assert "aarch64-kilntest-linux-gnu-g++" in msg and "apt-get install g++-aarch64-kilntest-linux-gnu" in msg
    assert "setup_arm.sh" in msg and not (tmp_path / "m.so").exists()


@needs_aarch64_cc
def test_cli_compile_for_rpi4(capsys, tmp_path):
    code, out, err = _cli(capsys, "compile", "zoo:mlp", "--target", "rpi4", "-o", tmp_path / "mlp.so")
    assert code == 0, err
    assert artifact.elf_machine(tmp_path / "mlp.so") == "aarch64"
    code, out, _ = _cli(capsys, "targets")
    rpi4 = next(line for line in out.splitlines() if line.startswith("rpi4 "))
    assert "cortex-a72" in rpi4 and " yes " in rpi4 and "arm" in rpi4


# ---------------------------------------------------------------- the emulated aarch64 device


def test_emulator_not_set_up_says_how(monkeypatch, tmp_path, capsys, tiny_cnn_so):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("KILN_ARM_ROOT", raising=False)
    monkeypatch.delenv("KILN_ARM_SITE", raising=False)
    with pytest.raises(emulator.EmulatorError) as info:
        emulator.find()
    assert "scripts/setup_arm.sh" in str(info.value) and isinstance(info.value, KilnError)
    assert emulator.unavailable_reason() == str(info.value)
    code, _, err = _cli(capsys, "run", tiny_cnn_so, "--emulate")  # an x86 module: refused before the device
    assert code == 1 and "x86_64" in err and "compiler.load" in err


@pytest.mark.emulator
@needs_emulator
def test_tiny_cnn_on_the_emulated_device_matches_x86_and_torch(arm_modules, compiled_zoo):
    model, inputs = zoo_model("tiny_cnn")
    x = _numpy(inputs)
    mod, path = arm_modules("tiny_cnn")
    got = emulator.run(path, *x)
    assert_close(got, compiled_zoo("tiny_cnn").run(*x), what="arm vs x86")
    assert_close(got, run_torch(model, inputs), what="arm vs torch")
    # a CompiledModule for an ARM target can be handed over directly (exported on the fly)
    np.testing.assert_array_equal(emulator.run(mod, *x), got)
    emu = emulator.load(path)
    assert [s.name for s in emu.inputs] == [s.name for s in mod.inputs]
    with pytest.raises(InputShapeError):
        emu.run(np.zeros((1, 2, 3), np.float32))
    several = emu.run_many([x, [a * 0.5 for a in x]])
    np.testing.assert_array_equal(several[0], got)
    assert not np.allclose(several[1], got)
    assert emu.benchmark(repeat=2).repeat == 2


@pytest.mark.emulator
@needs_emulator
@pytest.mark.parametrize("target", ["rpi5", "jetson-orin-cpu", "graviton3"])
def test_other_aarch64_targets_on_the_emulated_device(arm_modules, compiled_zoo, target):
    """Dot-product/FP16 (Cortex-A76/A78AE) and SVE (Neoverse-V1) code runs and matches the x86 build."""
    x = _numpy(zoo_model("tiny_cnn")[1])
    _, path = arm_modules("tiny_cnn", target)
    assert_close(emulator.run(path, *x), compiled_zoo("tiny_cnn").run(*x), what=target)


@pytest.mark.emulator
@pytest.mark.slow
@needs_emulator
def test_bert_on_the_emulated_device_matches_x86_and_torch(arm_modules, compiled_zoo):
    model, inputs = zoo_model("bert")
    x = _numpy(inputs)
    _, path = arm_modules("bert")
    got = emulator.run(path, *x)
    assert_close(got, compiled_zoo("bert").run(*x), what="arm vs x86")
    assert_close(got, run_torch(model, inputs), what="arm vs torch")


@pytest.mark.emulator
@needs_emulator
def test_kiln_run_emulate(arm_modules, compiled_zoo, capsys, tmp_path):
    _, path = arm_modules("tiny_cnn")
    x = _numpy(zoo_model("tiny_cnn")[1])
    spec = compiled_zoo("tiny_cnn").inputs[0]
    np.savez(tmp_path / "in.npz", **{spec.name: x[0]})
    code, out, err = _cli(capsys, "run", path, "--emulate", "--inputs", tmp_path / "in.npz",
                          "--outputs", tmp_path / "out.npz", "--benchmark", "2")
    assert code == 0, err
    assert "emulated aarch64 device" in out and "correctness" in out and "latency under emulation" in out
    with np.load(tmp_path / "out.npz") as data:
        (got,) = [data[k] for k in data.files]
    assert_close(got, compiled_zoo("tiny_cnn").run(*x), what="kiln run --emulate")


# ---------------------------------------------------------------- deployment bundle


@pytest.mark.emulator
@needs_emulator
@needs_aarch64_cc
def test_package_runs_with_no_python(arm_modules, compiled_zoo, capsys, tmp_path):
    _, path = arm_modules("tiny_cnn")
    code, out, err = _cli(capsys, "package", path, "--target", "rpi4", "-o", tmp_path / "bundle")
    assert code == 0, err
    bundle = tmp_path / "bundle"
    names = {p.name for p in bundle.rglob("*") if p.is_file()}
    assert names == {"model.so", "model.inputs", "kiln_runner", "kiln_runner.cc", "README.md",
                     "libtvm_runtime.so", "libtvm_ffi.so"}
    assert artifact.elf_machine(bundle / "kiln_runner") == "aarch64"
    assert "kiln_runner model.so model.inputs" in (bundle / "README.md").read_text()
    x = _numpy(zoo_model("tiny_cnn")[1])
    x[0].tofile(tmp_path / "x.bin")
    # no Python anywhere: QEMU runs the aarch64 runner with the board's C libraries only
    dev = emulator.find()
    run = subprocess.run([dev.qemu, "-L", str(dev.root), str(bundle / "kiln_runner"), str(bundle / "model.so"),
                          str(bundle / "model.inputs"), str(tmp_path / "x.bin")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert "output0: 1x10 float32" in run.stdout
    want = compiled_zoo("tiny_cnn").run(*x)
    assert_close(np.fromfile(tmp_path / "output0.bin", np.float32).reshape(want.shape), want, what="bundle")


@needs_aarch64_cc
def test_package_refuses_a_mismatched_target(arm_modules, tmp_path, capsys):
    _, path = arm_modules("mlp", "rpi5")
    code, _, err = _cli(capsys, "package", path, "--target", "rpi4", "-o", tmp_path / "b")
    assert code == 1 and "dotprod" in err and "--target rpi4" in err
    code, _, err = _cli(capsys, "package", path, "--target", "x86", "-o", tmp_path / "b")
    assert code == 1 and "aarch64" in err


# ---------------------------------------------------------------- armv7: a runtime built here, the bundle under QEMU
# Tests marked ``armv7`` package an armv7 module with the TVM runtime that ``scripts/setup_armv7.sh``
# cross-compiles (no armv7 wheels exist) and run the bundle's C++ runner under
# ``qemu-arm-static -L /usr/arm-linux-gnueabihf``: no Python on the emulated side.


def _armv7_reason() -> str | None:
    from compiler.package import armv7_unavailable_reason

    if shutil.which("qemu-arm-static") is None:
        return "qemu-arm-static not installed: run scripts/setup_arm.sh"
    return armv7_unavailable_reason()


needs_armv7_runtime = pytest.mark.skipif(_armv7_reason() is not None, reason=f"{_armv7_reason()}")


def _run_armv7_bundle(bundle, inputs, cwd, *extra: str) -> tuple[list[np.ndarray], str]:
    """Run the bundle's runner on ``inputs`` (NumPy arrays, in order; may be fewer than the model's) under
    qemu-arm-static with only the armhf C libraries; the outputs as the metadata describes them, and stdout."""
    files = []
    for i, x in enumerate(inputs):
        x.tofile(cwd / f"in{i}.bin")
        files.append(str(cwd / f"in{i}.bin"))
    run = subprocess.run(["qemu-arm-static", "-L", "/usr/arm-linux-gnueabihf", str(bundle / "kiln_runner"),
                          str(bundle / "model.so"), str(bundle / "model.inputs"), *files, *extra],
                         capture_output=True, text=True, cwd=cwd, timeout=300, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-3000:]
    outs = artifact.read_metadata(bundle / "model.so")["outputs"]
    got = [np.fromfile(cwd / f"output{i}.bin", d["dtype"]).reshape(d["shape"]) for i, d in enumerate(outs)]
    return got, run.stdout


def _package_armv7(capsys, path, out):
    code, stdout, err = _cli(capsys, "package", path, "--target", "armv7", "-o", out)
    assert code == 0, err
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert names == {"model.so", "model.inputs", "kiln_runner", "kiln_runner.cc", "README.md",
                     "lib/libtvm_runtime.so", "lib/libtvm_ffi.so"}
    for f in ("kiln_runner", "lib/libtvm_runtime.so", "lib/libtvm_ffi.so", "model.so"):
        assert artifact.elf_machine(out / f) == "arm", f
        assert (out / f).read_bytes()[4] == 1, f"{f}: not a 32-bit ELF"
    readme = (out / "README.md").read_text()
    assert "qemu-arm-static -L /usr/arm-linux-gnueabihf ./kiln_runner model.so model.inputs" in readme
    assert "armhf" in readme and "setup_armv7.sh" in readme
    return out


@pytest.mark.armv7
@needs_armhf_cc
@needs_armv7_runtime
def test_armv7_bundle_runs_tiny_cnn_under_qemu_arm(arm_modules, compiled_zoo, capsys, tmp_path):
    model, inputs = zoo_model("tiny_cnn")
    x = _numpy(inputs)
    _, path = arm_modules("tiny_cnn", "armv7")
    bundle = _package_armv7(capsys, path, tmp_path / "bundle")
    (got,), stdout = _run_armv7_bundle(bundle, x, tmp_path, "--repeat", "2")
    assert "output0: 1x10 float32" in stdout and "mean latency" in stdout
    assert_close(got, compiled_zoo("tiny_cnn").run(*x), what="armv7 vs x86")
    assert_close(got, run_torch(model, inputs), what="armv7 vs torch")
    # an input left out is ones
    (ones,), _ = _run_armv7_bundle(bundle, [], tmp_path)
    assert_close(ones, compiled_zoo("tiny_cnn").run(np.ones_like(x[0])), what="armv7, ones")


@pytest.mark.armv7
@pytest.mark.slow
@needs_armhf_cc
@needs_armv7_runtime
def test_armv7_bundle_runs_bert_under_qemu_arm(arm_modules, compiled_zoo, capsys, tmp_path):
    """The BERT-style encoder (int64 token ids in, 1x128x384 out) through the armv7 runtime (~10 s emulated)."""
    model, inputs = zoo_model("bert")
    x = _numpy(inputs)
    assert x[0].dtype == np.int64
    _, path = arm_modules("bert", "armv7")
    bundle = _package_armv7(capsys, path, tmp_path / "bundle")
    (got,), _ = _run_armv7_bundle(bundle, x, tmp_path)
    assert_close(got, compiled_zoo("bert").run(*x), what="armv7 vs x86")
    assert_close(got, run_torch(model, inputs), what="armv7 vs torch")


@needs_armhf_cc
def test_armv7_package_without_the_runtime_says_how(arm_modules, capsys, tmp_path, monkeypatch):
    from compiler.package import armv7_unavailable_reason

    _, path = arm_modules("tiny_cnn", "armv7")
    lib = tmp_path / "armv7-lib"
    monkeypatch.setenv("KILN_ARMV7_RUNTIME", str(lib))
    code, _, err = _cli(capsys, "package", path, "--target", "armv7", "-o", tmp_path / "b")
    assert code == 1 and "scripts/setup_armv7.sh" in err and err.count("\n") == 1
    assert not (tmp_path / "b").exists()
    # built from other wheels than the installed ones: rebuild
    lib.mkdir()
    for name in ("libtvm_runtime.so", "libtvm_ffi.so"):
        (lib / name).write_bytes(b"")
    (lib / "kiln-runtime.json").write_text('{"apache-tvm": "0.26.0", "apache-tvm-ffi": "0.1.14.post1"}')
    reason = armv7_unavailable_reason()
    assert reason and "apache-tvm 0.26.0" in reason and "setup_armv7.sh" in reason
    with pytest.raises(TargetError, match="other TVM wheels"):
        compiler.package.package(path, tmp_path / "b", target="armv7")
