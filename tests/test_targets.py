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
