"""Deployment bundles: everything a board needs to run a Kiln module, and nothing more.

``kiln package model.so --target rpi4 -o bundle/`` (or :func:`package`) writes::

    bundle/
      model.so             the module (code, weights, metadata)
      model.inputs         one line per input: NAME DTYPE DIM0 DIM1 ...
      lib/libtvm_runtime.so, lib/libtvm_ffi.so   the TVM runtime for the board's CPU (~5 MB; armv7 3.5 MB)
      kiln_runner          a small C++ runner, prebuilt for the board (finds lib/ through its rpath)
      kiln_runner.cc       its source
      README.md            how to copy it to the board and run it

No Python and no compiler are needed on the board. The aarch64 runtime libraries come from the
aarch64 TVM wheels that ``scripts/setup_arm.sh`` installs; an x86-64 bundle uses this machine's.

ARMv7 (32-bit hard-float): PyPI has no armv7 TVM wheels, so ``scripts/setup_armv7.sh`` cross-compiles
``libtvm_ffi.so`` and ``libtvm_runtime.so`` (about 3.5 MB together) from the sources inside the installed
x86 wheels, plus seven headers the wheel omits (vendored in ``compiler/runner/tvm_headers/``), into
``${KILN_CACHE:-~/.cache/kiln}/armv7/lib`` (203 s cold with ``-j2`` on a shared 2-core machine). The runtime has the Relax
VM, library modules, tensors, the CPU device and thread pool; not RPC, disco, GPU backends or the LLM
KV-cache state. The armhf linker drops libraries under ``--as-needed``: everything links with
``-Wl,--no-as-needed``. It needs glibc >= 2.34 and libstdc++ of GCC >= 12 on the board (Debian 12 /
Raspberry Pi OS bookworm, 32-bit). Here the bundle runs under ``qemu-arm-static -L /usr/arm-linux-gnueabihf``
(tests/test_arm.py, marker ``armv7``): tiny_cnn and the BERT-style encoder matched the x86 build and PyTorch
(BERT within 6e-6 of x86; about 9 s emulated, 0.3 s for tiny_cnn).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import targets
from targets import TargetDescription

from . import artifact
from .errors import IncompatibleModuleError, TargetError

RUNNER_SOURCE = Path(__file__).resolve().parent / "runner" / "kiln_runner.cc"
_TRIPLE_ARCH = {"aarch64": "aarch64", "x86_64": "x86_64", "armv7l": "arm", "armv7": "arm", "arm": "arm"}


def _arch(desc: TargetDescription) -> str:
    return _TRIPLE_ARCH.get(desc.triple.split("-")[0], desc.triple.split("-")[0] or "?")


ARMV7_SETUP_HINT = ("run scripts/setup_armv7.sh (cross-compiles the armv7 TVM runtime from the installed wheels' "
                    "sources, about 3.5 minutes once; cached under ${KILN_CACHE:-~/.cache/kiln}/armv7)")


def armv7_runtime_dir() -> Path:
    """Where ``scripts/setup_armv7.sh`` installs the armv7 runtime (``KILN_ARMV7_RUNTIME`` overrides)."""
    from .emulator import cache_dir

    return Path(os.environ.get("KILN_ARMV7_RUNTIME") or cache_dir() / "armv7" / "lib")


def armv7_runtime() -> tuple[Path, Path]:
    """``libtvm_runtime.so`` and ``libtvm_ffi.so`` built for armv7 from the installed TVM wheels' sources,
    or a :class:`TargetError` saying how to build them (also when they were built from other versions)."""
    from importlib.metadata import version

    lib = armv7_runtime_dir()
    runtime, ffi, info = lib / "libtvm_runtime.so", lib / "libtvm_ffi.so", lib / "kiln-runtime.json"
    if not (runtime.exists() and ffi.exists() and info.exists()):
        raise TargetError(f"the armv7 TVM runtime is not built (no {runtime}): {ARMV7_SETUP_HINT}")
    try:
        built = json.loads(info.read_text())
    except (OSError, ValueError) as err:
        raise TargetError(f"unreadable {info} ({err}): {ARMV7_SETUP_HINT}") from None
    want = {pkg: version(pkg) for pkg in ("apache-tvm", "apache-tvm-ffi")}
    stale = [f"{pkg} {built.get(pkg)} (installed: {v})" for pkg, v in want.items() if built.get(pkg) != v]
    if stale:
        raise TargetError(f"the armv7 TVM runtime in {lib} was built from other TVM wheels: {', '.join(stale)}; "
                          f"{ARMV7_SETUP_HINT}")
    return runtime, ffi


def armv7_unavailable_reason() -> str | None:
    """None when the armv7 runtime is built for the installed wheels, else why not (for ``pytest.skip``)."""
    try:
        armv7_runtime()
    except TargetError as err:
        return str(err)
    return None


def runtime_files(desc: TargetDescription) -> tuple[Path, Path, Path]:
    """``libtvm_runtime.so``, ``libtvm_ffi.so`` and the TVM-FFI include directory for ``desc``'s CPU."""
    arch = _arch(desc)
    if arch == "aarch64":
        from . import emulator

        try:
            dev = emulator.find()
        except emulator.EmulatorError as err:
            raise TargetError(f"the aarch64 TVM runtime libraries are not installed: {err}") from None
        runtime, ffi = dev.runtime_libs
        return runtime, ffi, dev.site / "tvm_ffi" / "include"
    if arch == "x86_64":
        import tvm
        import tvm_ffi

        runtime = Path(tvm.__file__).parent / "lib" / "libtvm_runtime.so"
        ffi_dir = Path(tvm_ffi.__file__).parent
        return runtime, ffi_dir / "lib" / "libtvm_ffi.so", ffi_dir / "include"
    if arch == "arm" and desc.float_abi == "hard":
        import tvm_ffi

        runtime, ffi = armv7_runtime()
        return runtime, ffi, Path(tvm_ffi.__file__).parent / "include"  # headers: the same on every CPU
    raise TargetError(
        f"no TVM runtime for {desc.name!r} ({desc.triple}): PyPI has no {arch} TVM wheels, so the runtime "
        "must be built from source for that CPU; bundles are available for aarch64, armv7 (hard-float) and "
        "x86-64 targets"
    )


def build_runner(desc: TargetDescription, out: Path, libdir: Path, include: Path) -> Path:
    """Compile the C++ runner for ``desc`` into ``out`` (links ``libdir``'s runtime, rpath ``$ORIGIN/lib``)."""
    from .toolchain import check_cross_compiler

    cxx = desc.cross_compiler or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise TargetError("no C++ compiler found to build the runner: install g++")
    check_cross_compiler(desc)
    cmd = [cxx, "-std=c++17", "-O2", f"-I{include}", str(RUNNER_SOURCE), "-o", str(out), f"-L{libdir}",
           "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,-rpath,$ORIGIN/lib"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise TargetError(f"building the runner with {cxx} failed:\n{proc.stderr[-3000:]}")
    return out


def _check_target(meta: dict, path: Path, desc: TargetDescription) -> None:
    built = TargetDescription.from_json(meta["target"])
    machine = artifact.elf_machine(path)
    if machine != _arch(desc):
        raise IncompatibleModuleError(
            f"{path} was built for {machine} (target {built.name!r}), not for {desc.name!r} ({desc.triple}): "
            f"recompile it with `kiln compile --target {desc.name}`"
        )
    missing = sorted(set(built.features) - set(desc.features))
    if missing:
        raise IncompatibleModuleError(
            f"{path} was compiled for {built.name!r} and uses CPU features {desc.name!r} lacks: {missing}; "
            f"recompile it with `kiln compile --target {desc.name}`"
        )


def package(module: str | os.PathLike, out_dir: str | os.PathLike | None = None, target=None) -> Path:
    """Write a deployment bundle for the module file ``module`` (see the module docstring).

    ``target``: the board (a name from ``kiln targets`` or a description); default: the target the
    module was compiled for. ``out_dir`` defaults to ``<module stem>-<target>-bundle`` beside it."""

    path = Path(module)
    meta = artifact.read_metadata(path)
    desc = targets.resolve(target) if target is not None else TargetDescription.from_json(meta["target"])
    if desc.host:
        desc = targets.host_description()
    _check_target(meta, path, desc)
    runtime, ffi, include = runtime_files(desc)
    out = Path(out_dir) if out_dir is not None else path.with_name(f"{path.stem}-{desc.name}-bundle")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # same file system: atomic rename
    try:
        (tmp / "lib").mkdir()
        shutil.copy2(runtime, tmp / "lib" / "libtvm_runtime.so")
        shutil.copy2(ffi, tmp / "lib" / "libtvm_ffi.so")
        shutil.copy2(path, tmp / "model.so")
        shutil.copy2(RUNNER_SOURCE, tmp / "kiln_runner.cc")
        build_runner(desc, tmp / "kiln_runner", tmp / "lib", include)
        (tmp / "model.inputs").write_text(
            "".join(f"{d['name']} {d['dtype']} {' '.join(str(x) for x in d['shape'])}\n" for d in meta["inputs"]))
        lib_mb = sum(p.stat().st_size for p in (tmp / "lib").iterdir()) / 1e6
        (tmp / "README.md").write_text(_readme(meta, desc, out.name, lib_mb))
        tmp.chmod(0o755)  # mkdtemp made it private
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


#: arch -> (what the board needs, the QEMU command prefix here, how to get it)
_BOARD = {
    "aarch64": ("a 64-bit ARM Linux with glibc 2.28 or newer and libstdc++",
                "qemu-aarch64-static -L /usr/aarch64-linux-gnu",
                "On an x86 machine with `qemu-user-static` and the aarch64 C/C++ libraries (Debian: "
                "`libstdc++6-arm64-cross`, installed with `g++-aarch64-linux-gnu`):"),
    "arm": ("a 32-bit ARM hard-float (armhf) Linux with glibc 2.34 or newer and libstdc++ of GCC 12 or newer "
            "(Debian 12 / Raspberry Pi OS bookworm 32-bit, or newer): the runtime in `lib/` was cross-compiled "
            "by Kiln's scripts/setup_armv7.sh (PyPI has no armv7 TVM wheels)",
            "qemu-arm-static -L /usr/arm-linux-gnueabihf",
            "On an x86 machine with `qemu-user-static` and the armhf C/C++ libraries (Debian: "
            "`libstdc++6-armhf-cross`, installed with `g++-arm-linux-gnueabihf`):"),
    "x86_64": ("an x86-64 Linux with glibc and libstdc++", "", "On this kind of machine directly:"),
}


def _emulation_note(arch: str) -> str:
    if arch == "x86_64":
        return ""
    note = "Timings under emulation are for correctness checks only."
    if arch == "aarch64":
        note += (" `kiln run model.so --emulate` runs the model the same way through Python on Kiln's emulated "
                 "device (scripts/setup_arm.sh).")
    return note


def _readme(meta: dict, desc: TargetDescription, dirname: str, lib_mb: float = 5.0) -> str:
    ins = "\n".join(f"- `{d['name']}`: {d['dtype']} {d['shape']}" for d in meta["inputs"])
    outs = "\n".join(f"- `output{i}.bin` (`{d['name']}`): {d['dtype']} {d['shape']}"
                     for i, d in enumerate(meta["outputs"]))
    arch = _arch(desc)
    board, qemu, emulated = _BOARD.get(arch, _BOARD["x86_64"])
    inc = "tvm_ffi/include from the apache-tvm-ffi wheel"
    return f"""# Kiln model bundle for {desc.name}

{desc.description or desc.name} — `{desc.triple}`, CPU `{desc.cpu}`, compiled by Kiln {meta['kiln_version']}
for target `{meta['target']['name']}`.

Runs with no Python and no compiler on the board: the model (`model.so`), the TVM runtime (`lib/`, about
{lib_mb:.1f} MB) and a prebuilt C++ runner (`kiln_runner`, source in `kiln_runner.cc`). The board needs only {board}.

## Run it on the board

    scp -r {dirname} user@board:        # copy this directory
    ssh user@board
    cd {dirname}
    ./kiln_runner model.so model.inputs x.bin   # inputs in the order of model.inputs
    ./kiln_runner model.so model.inputs x.bin --repeat 100   # also print the mean latency

Inputs ({len(meta['inputs'])}), listed in `model.inputs`, are raw little-endian arrays, e.g. from NumPy:
`x.astype("float32").tofile("x.bin")`. An input left out is filled with ones.

{ins}

The runner writes each output as raw data in the current directory and prints its shape and sum:

{outs}

Read them back with `numpy.fromfile("output0.bin", dtype).reshape(shape)`.

## Without a board

{emulated}

    {qemu + ' ' if qemu else ''}./kiln_runner model.so model.inputs x.bin

{_emulation_note(arch)}

## Rebuilding the runner

    {desc.cross_compiler or 'g++'} -std=c++17 -O2 -I<{inc}> kiln_runner.cc -o kiln_runner \\
        -Llib -Wl,--no-as-needed -ltvm_runtime -ltvm_ffi -Wl,-rpath,'$ORIGIN/lib'
"""
