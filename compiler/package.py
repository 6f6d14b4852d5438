"""Deployment bundles: everything a board needs to run a Kiln module, and nothing more.

``kiln package model.so --target rpi4 -o bundle/`` (or :func:`package`) writes::

    bundle/
      model.so             the module (code, weights, metadata)
      model.inputs         one line per input: NAME DTYPE DIM0 DIM1 ...
      lib/libtvm_runtime.so, lib/libtvm_ffi.so   the TVM runtime for the board's CPU (~5 MB)
      kiln_runner          a small C++ runner, prebuilt for the board (finds lib/ through its rpath)
      kiln_runner.cc       its source
      README.md            how to copy it to the board and run it

No Python and no compiler are needed on the board. The aarch64 runtime libraries come from the
aarch64 TVM wheels that ``scripts/setup_arm.sh`` installs; an x86-64 bundle uses this machine's.
"""

from __future__ import annotations

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
    raise TargetError(
        f"no TVM runtime for {desc.name!r} ({desc.triple}): PyPI has no {arch} TVM wheels, so the runtime "
        "must be built from source for that CPU; bundles are available for aarch64 and x86-64 targets"
    )


def build_runner(desc: TargetDescription, out: Path, libdir: Path, include: Path) -> Path:
    """Compile the C++ runner for ``desc`` into ``out`` (links ``libdir``'s runtime, rpath ``$ORIGIN/lib``)."""
    from .build import check_cross_compiler

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
    from .build import resolve_target

    path = Path(module)
    meta = artifact.read_metadata(path)
    desc = resolve_target(target) if target is not None else TargetDescription.from_json(meta["target"])
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
        (tmp / "README.md").write_text(_readme(meta, desc, out.name))
        tmp.chmod(0o755)  # mkdtemp made it private
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _readme(meta: dict, desc: TargetDescription, dirname: str) -> str:
    ins = "\n".join(f"- `{d['name']}`: {d['dtype']} {d['shape']}" for d in meta["inputs"])
    outs = "\n".join(f"- `output{i}.bin` (`{d['name']}`): {d['dtype']} {d['shape']}"
                     for i, d in enumerate(meta["outputs"]))
    arch = _arch(desc)
    qemu = ("qemu-aarch64-static -L /usr/aarch64-linux-gnu ./kiln_runner model.so model.inputs x.bin"
            if arch == "aarch64" else "./kiln_runner model.so model.inputs x.bin")
    inc = "tvm_ffi/include from the apache-tvm-ffi wheel"
    return f"""# Kiln model bundle for {desc.name}

{desc.description or desc.name} — `{desc.triple}`, CPU `{desc.cpu}`, compiled by Kiln {meta['kiln_version']}
for target `{meta['target']['name']}`.

Runs with no Python and no compiler on the board: the model (`model.so`), the TVM runtime (`lib/`, about
5 MB) and a prebuilt C++ runner (`kiln_runner`, source in `kiln_runner.cc`). The board needs only a
{'64-bit ARM' if arch == 'aarch64' else arch} Linux with glibc 2.28 or newer and libstdc++.

## Run it on the board

    scp -r {dirname} user@board:        # copy this directory
    ssh user@board
    cd {dirname}
    ./kiln_runner model.so model.inputs x.bin   # inputs in the order of model.inputs
    ./kiln_runner model.so model.inputs x.bin --repeat 100   # also print the mean latency

Inputs ({len(meta['inputs'])}), listed in `model.inputs`, are raw little-endian arrays, e.g. from NumPy:
`x.astype("float32").tofile("x.bin")`. An input left out is filled with 1.0.

{ins}

The runner writes each output as raw data in the current directory and prints its shape and sum:

{outs}

Read them back with `numpy.fromfile("output0.bin", dtype).reshape(shape)`.

## Without a board

{'On an x86 machine with `qemu-user-static` and the aarch64 C/C++ libraries (Debian: `libstdc++6-arm64-cross`, installed with `g++-aarch64-linux-gnu`):' if arch == 'aarch64' else ''}

    {qemu}

Timings under emulation are for correctness checks only. `kiln run model.so --emulate` runs the model the same
way through Python on Kiln's emulated device (scripts/setup_arm.sh).

## Rebuilding the runner

    {desc.cross_compiler or 'g++'} -std=c++17 -O2 -I<{inc}> kiln_runner.cc -o kiln_runner \\
        -Llib -Wl,--no-as-needed -ltvm_runtime -ltvm_ffi -Wl,-rpath,'$ORIGIN/lib'
"""
