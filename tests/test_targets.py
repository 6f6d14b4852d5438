"""Target descriptions: every TOML loads, names and aliases resolve, descriptions are frozen, the host
is detected from this machine, fingerprints are stable, and ``to_tvm`` gives the right LLVM target."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import targets
from targets import TargetDescription

TOMLS = sorted(Path(targets.__file__).parent.glob("*.toml"))


def _cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.parametrize("path", TOMLS, ids=lambda p: p.stem)
def test_every_toml_loads(path):
    raw = tomllib.loads(path.read_text())
    desc = targets._load_file(path)
    assert isinstance(desc, TargetDescription)
    assert desc.name == raw["name"] and desc.family == raw["family"] and desc.kind == raw["kind"]
    assert desc.family in ("x86", "arm", "cuda", "mcu")
    for key, value in raw.items():  # every value in the file made it into the description
        assert getattr(desc, key) == (tuple(value) if isinstance(value, list) else value), key
    assert isinstance(desc.features, tuple) and all(isinstance(f, str) for f in desc.features)
    assert isinstance(desc.cores, int) and desc.cores >= 1
    assert desc.vector_bits in (32, 64, 128, 256, 512)
    # JSON round trip (how modules carry their target)
    assert TargetDescription.from_json(desc.to_json()) == desc


def test_names_and_aliases_resolve():
    seen = {}
    for path in TOMLS:
        raw = tomllib.loads(path.read_text())
        for key in (raw["name"], *raw.get("aliases", ())):
            assert key not in seen, f"{key!r} defined by {seen.get(key)} and {path.name}"
            seen[key] = path.name
            assert targets.get(key).name == raw["name"], key
    assert sorted(seen) == targets.names()
    assert targets.get("avx2") == targets.get("haswell")
    assert targets.get("skx") == targets.get("skylake-avx512")
    assert targets.get("host") == targets.get("x86") == targets.get("llvm") == targets.host_description()
    assert len(targets.all_descriptions()) == len(TOMLS)
    assert sorted(d.name for d in targets.all_descriptions()) == sorted(
        tomllib.loads(p.read_text())["name"] for p in TOMLS)


def test_descriptions_are_frozen():
    d = targets.get("haswell")
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.cores = 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        targets.host_description().features = ()
    assert targets.get("haswell").cores == 4
    changed = dataclasses.replace(d, cores=64)
    assert changed.cores == 64 and d.cores == 4 and targets.get("haswell").cores == 4
    assert isinstance(d.features, tuple)  # no mutable list inside a frozen description
    hash(d)  # usable as a dict key


def test_host_features_match_cpuinfo():
    flags = _cpuinfo_flags()
    host = targets.host_description()
    assert host.host and host.name == "x86" and host.family == "x86"
    assert host.has("avx512f") == ("avx512f" in flags)
    assert host.has("avx2") == ("avx2" in flags)
    assert host.has("fma") == ("fma" in flags)
    assert host.has("amx-int8") == ("amx_int8" in flags)
    for flag, feature in targets._X86_FLAG_MAP.items():
        assert host.has(feature) == (flag in flags), feature
    assert host.vector_bits == (512 if "avx512f" in flags else 256 if "avx2" in flags else 128)
    import os

    assert host.cores == len(os.sched_getaffinity(0))
    assert host.cpu and host.cpu != "generic"
    assert not host.is_cross


def test_fingerprints():
    a, b = targets.get("haswell"), targets.get("znver3")
    assert a.fingerprint() == targets.get("haswell").fingerprint() == targets.get("avx2").fingerprint()
    assert a.fingerprint() != b.fingerprint()
    fps = {d.name: d.fingerprint() for d in targets.all_descriptions()}
    assert len(set(fps.values())) == len(fps), fps  # every target keys its own tuning logs
    host = targets.host_description()
    assert host.fingerprint() == targets.get("x86").fingerprint()
    # codegen fields change the fingerprint, the free-text description does not
    assert dataclasses.replace(a, cores=8).fingerprint() != a.fingerprint()
    assert dataclasses.replace(a, features=a.features + ("avx512f",)).fingerprint() != a.fingerprint()
    assert dataclasses.replace(a, description="renamed").fingerprint() == a.fingerprint()


_FINGERPRINT = "import targets; print(targets.get('x86').fingerprint(), targets.get('haswell').fingerprint())"


def test_fingerprint_stable_across_processes():
    runs = {subprocess.run([sys.executable, "-c", _FINGERPRINT], capture_output=True, text=True, check=True,
                           cwd=str(Path(targets.__file__).parents[1])).stdout for _ in range(2)}
    assert len(runs) == 1
    assert runs.pop().split() == [targets.get("x86").fingerprint(), targets.get("haswell").fingerprint()]


@pytest.mark.parametrize("name", ["x86", "haswell", "skylake-avx512", "znver3", "znver4", "sapphirerapids"])
def test_to_tvm_llvm(name):
    d = targets.get(name)
    t = d.to_tvm()
    assert t.kind.name == "llvm"
    assert str(t.attrs["mcpu"]) == d.cpu
    assert str(t.attrs["mtriple"]) == d.triple == "x86_64-linux-gnu"
    assert int(t.attrs["num-cores"]) == d.cores
    if name != "x86":
        assert d.cpu == tomllib.loads((Path(targets.__file__).parent / f"{name}.toml").read_text())["cpu"]


def test_to_tvm_other_kinds():
    for d in targets.all_descriptions():
        if d.family == "x86":
            continue
        t = d.to_tvm()
        assert t.kind.name == d.kind
        if d.kind == "llvm":
            assert str(t.attrs["mtriple"]) == d.triple and str(t.attrs["mcpu"]) == d.cpu
            assert d.is_cross


def test_compile_for_named_cpu_runs_here():
    """A module compiled for a named x86 CPU this machine can run (features a subset) runs correctly."""
    import numpy as np
    import torch

    import compiler

    host = set(targets.host_description().features)
    runnable = [d for d in targets.all_descriptions() if d.family == "x86" and not d.host and set(d.features) <= host]
    if not runnable:
        pytest.skip("no named x86 target is a subset of this CPU")
    d = runnable[0]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.GELU()).eval()
    x = torch.randn(2, 16)
    mod = compiler.compile(model, target=d.name, example_inputs=(x,))
    assert mod.target == d
    assert mod.summary().target == d.name
    with torch.no_grad():
        np.testing.assert_allclose(mod(x.numpy()), model(x).numpy(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- facts the schedule rules read


def test_dtype_bits():
    assert [targets.dtype_bits(d) for d in ("float32", "int8", "float16", "bfloat16", "uint8", "int64")] == \
        [32, 8, 16, 16, 8, 64]
    assert targets.dtype_bits("float32x4") == 32 and targets.dtype_bits("bool") == 8
    assert targets.dtype_bits("float8_e4m3fn") == 8
    with pytest.raises(ValueError):
        targets.dtype_bits("not-a-dtype")


def test_vector_lanes_and_registers():
    """Lanes per dtype and register counts: AVX-512 vs AVX2 vs NEON (AArch64 and 32-bit ARM)."""
    skx, hsw = targets.get("skylake-avx512"), targets.get("haswell")
    assert (skx.vector_lanes("float32"), skx.vector_lanes("int8"), skx.vector_lanes("float16")) == (16, 64, 32)
    assert (hsw.vector_lanes("float32"), hsw.vector_lanes("int8"), hsw.vector_lanes("float16")) == (8, 32, 16)
    assert skx.vector_registers == 32 and skx.embedded_broadcast
    assert hsw.vector_registers == 16 and not hsw.embedded_broadcast
    for name in ("rpi4", "rpi5", "jetson-orin-cpu", "graviton3", "armv7"):
        arm = targets.get(name)
        assert (arm.vector_lanes("float32"), arm.vector_lanes("int8")) == (4, 16), name
        assert arm.vector_registers == (16 if name == "armv7" else 32), name
        assert not arm.embedded_broadcast, name
    assert targets.get("cortex-m55").vector_lanes("float32") == 4 and targets.get("cortex-m55").vector_registers == 8
    assert targets.get("cortex-m4").vector_lanes("float32") == 1
    host = targets.host_description()
    avx512 = host.has("avx512f")
    assert host.vector_lanes("float32") == (16 if avx512 else 8 if host.has("avx2") else 4)
    assert host.vector_registers == (32 if avx512 else 16) and host.embedded_broadcast == avx512


def test_vector_bits_is_what_the_code_uses():
    """x86 widths follow the ISA features; every ARM target (Graviton3's SVE included: TVM emits NEON)
    is 128-bit NEON."""
    for d in targets.all_descriptions():
        if d.family == "x86":
            assert d.vector_bits == (512 if d.has("avx512f") else 256 if d.has("avx2") else 128), d.name
        elif d.family == "arm":
            assert d.vector_bits == 128, d.name


def test_cache_sizes():
    """Every CPU target knows its L1d and L2; sizes are positive and ordered where present."""
    for d in targets.all_descriptions():
        assert (d.l1d_bytes, d.l2_bytes, d.l3_bytes) == (d.l1d_kb * 1024, d.l2_kb * 1024, d.l3_kb * 1024)
        if d.family in ("x86", "arm"):
            assert d.l1d_bytes > 0 and d.l2_bytes > 0, d.name
        if d.l1d_bytes and d.l2_bytes:
            assert d.l1d_bytes < d.l2_bytes, d.name
        if d.l2_bytes and d.l3_bytes:
            assert d.l2_bytes <= d.l3_bytes, d.name
    assert targets.get("skylake-avx512").l2_bytes == 1 << 20 and targets.get("haswell").l2_bytes == 256 << 10


def test_host_caches_are_read_from_the_machine():
    host = targets.host_description()
    sysfs = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sysfs.glob("index*"):
        level, kind = int((idx / "level").read_text()), (idx / "type").read_text().strip()
        size = (idx / "size").read_text().strip()
        kb = int(size[:-1]) * (1024 if size.endswith("M") else 1)
        if level == 1 and kind == "Data":
            assert host.l1d_kb == kb
        elif level in (2, 3) and kind == "Unified":
            assert (host.l2_kb if level == 2 else host.l3_kb) == kb
