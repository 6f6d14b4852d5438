"""``CompiledModule``: a compiled model you can run, time, summarise and export; :func:`load` reads
one back from its ``.so``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

import targets

from . import artifact, native_log
from .errors import IncompatibleModuleError, MemoryLimitError
from .module_base import BenchmarkResult, ModuleBase


def use_all_cores() -> None:
    """Let TVM's thread pool use every core this process may run on, unless ``TVM_NUM_THREADS`` is set.

    TVM's runtime assumes x86 cores are hyper-thread pairs and starts half as many workers (one on a
    2-core machine), which made the BERT encoder 1.8x slower. Its pool takes its size from the
    environment variable ``TVM_NUM_THREADS`` when it starts (the first parallel kernel of a process)
    and cannot be resized later, so this sets that variable, once, when the first module that runs
    here is created (and the tuner, for its measurement workers). A value the user set is kept:
    set it before the first module runs to choose the thread count."""
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))


def physical_memory() -> int:
    """Bytes of physical memory on this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(meta: dict) -> None:
    """A :class:`MemoryLimitError` when a run of the module cannot fit in this machine's memory: it
    needs at least its inputs, outputs and largest intermediate tensor at once (metadata ``memory``,
    from :func:`compiler.analysis.memory_estimate`)."""
    mem = meta.get("memory")
    if not isinstance(mem, dict):
        return
    need = sum(int(mem.get(k, 0)) for k in ("inputs", "outputs", "largest_intermediate"))
    have = physical_memory()
    if need > have:
        shapes = ", ".join(f"{d['name']} {'x'.join(map(str, d['shape']))}" for d in meta.get("inputs", []))
        raise MemoryLimitError(
            f"the module needs at least {need / 2**30:.1f} GiB to run (inputs {shapes}: "
            f"{mem.get('inputs', 0) / 2**30:.1f} GiB; largest intermediate "
            f"{mem.get('largest_intermediate', 0) / 2**30:.1f} GiB) and this machine has "
            f"{have / 2**30:.1f} GiB: compile it for smaller input shapes")


class CompiledModule(ModuleBase):
    """A compiled model. Call it (or ``.run``) with NumPy arrays; get NumPy arrays back.

    Creating the first one that runs on this machine sizes TVM's thread pool to every core this
    process may use (:func:`use_all_cores`; ``TVM_NUM_THREADS`` set beforehand wins)."""

    def __init__(self, executable, meta: dict, device: str = "cpu"):
        import tvm
        from tvm import relax

        super().__init__(meta)
        self._executable = executable
        if self.target.kind == "cuda" and device == "cpu":  # a GPU module runs on the GPU (inputs copied)
            device = "cuda"
        self._device = tvm.device(device)
        # A module cross-compiled for another CPU (e.g. aarch64), or for a GPU on a machine without one,
        # cannot run here: no local VM for it (creating one would fail).
        self.runs_here = not self.target.is_cross
        if self.runs_here:
            check_memory(meta)
            use_all_cores()
        with native_log.captured():  # loading the executable logs a "Scope Loaded" line per kernel
            self._vm = relax.VirtualMachine(executable, self._device) if self.runs_here else None
        self._main = self._vm["main"] if self.runs_here else None
        self._inputs = None  # (tensors, NumPy views) reused by every call on the CPU; see _staged
        self._on_cpu = self._device.dlpack_device_type() == 1  # kDLCPU
        self._tensor_type = tvm.runtime.Tensor

    def _check_runs_here(self, what: str) -> None:
        if not self.runs_here:
            t = self.target
            if t.kind == "cuda":
                raise IncompatibleModuleError(
                    f"cannot {what} a module compiled for the NVIDIA GPU target {t.name!r} ({t.arch}): this "
                    f"machine has no CUDA GPU (a GPU is needed to run it). `.export('model.so')` it and run it "
                    f"on a machine with a matching GPU (`kiln run model.so` there), or recompile with --target x86"
                )
            raise IncompatibleModuleError(
                f"cannot {what} a module compiled for {t.name!r} ({t.triple}) on this machine: "
                f"`.export('model.so')` it and run it on the device, or on the emulated device with "
                f"`kiln run model.so --emulate` / compiler.emulator.run('model.so', ...) (set up by "
                f"scripts/setup_arm.sh)"
            )

    # -- running ---------------------------------------------------------------------------------
    def _to_tensors(self, values: Sequence) -> list:
        import tvm

        return [tvm.runtime.tensor(v, self._device) for v in values]

    def _staged(self, values: Sequence) -> list:
        """The input tensors of one call. On the CPU they are allocated once per module and refilled in
        place through a NumPy view of their memory (a fresh ``tvm.runtime.tensor`` per input cost a
        small model about a sixth of its run time); calls are serialised by the module's lock, and the
        outputs are copied out before the lock is released, so reuse is safe. Other devices, and dtypes
        NumPy cannot view (bfloat16), get fresh tensors."""
        import tvm

        if not self._on_cpu:
            return self._to_tensors(values)
        if self._inputs is None:
            tensors = [tvm.runtime.empty(v.shape, str(v.dtype), self._device) for v in values]
            views = [_host_view(t) for t in tensors]
            self._inputs = tensors, views
        tensors, views = self._inputs
        out = []
        for tensor, view, value in zip(tensors, views, values):
            if view is None:
                out.append(tvm.runtime.tensor(value, self._device))
            else:
                view[...] = value
                out.append(tensor)
        return out

    def _to_numpy(self, result):
        """NumPy copies of the VM's result tensors (a tuple for several outputs); on the CPU copied
        through a NumPy view of the tensor (``Tensor.numpy()`` costs several microseconds more)."""
        if isinstance(result, self._tensor_type):
            if self._on_cpu:
                try:
                    return np.from_dlpack(result).copy()
                except (RuntimeError, TypeError, BufferError):  # a dtype NumPy lacks (bfloat16)
                    pass
            return result.numpy()
        items = tuple([self._to_numpy(r) for r in result])
        return items[0] if len(items) == 1 else items

    def run(self, *arrays, check_finite: bool = False, **named):
        """Run on NumPy arrays (positional in input order, or by input name). Returns one array,
        or a tuple when the model has several outputs.

        Safe to call from several threads: calls on one module are serialised (each uses every core).
        ``check_finite=True`` raises :class:`compiler.errors.NonFiniteError` for an input or output
        holding NaN or infinity (NaN propagates through the model as in PyTorch and ONNX Runtime)."""
        self._check_runs_here("run")
        return self._checked(arrays, named, check_finite,
                             lambda values: self._to_numpy(self._main(*self._staged(values))))

    __call__ = run

    def benchmark(self, *arrays, repeat: int = 50, warmup: int = 5, **named) -> BenchmarkResult:
        """Time ``repeat`` runs after ``warmup`` runs (random inputs when none are given)."""
        self._check_runs_here("benchmark")
        if not arrays and not named:
            arrays = tuple(self.random_inputs())
        args = self._to_tensors(self._arrange(arrays, named))
        with self._lock:
            for _ in range(warmup):
                self._main(*args)
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                self._main(*args)
                times.append((time.perf_counter() - t0) * 1e3)
        return BenchmarkResult.from_times(times)

    def profile(self, *arrays, repeat: int = 20, warmup: int = 3, **named):
        """Time every fused kernel over ``repeat`` runs (random inputs when none are given): a
        :class:`compiler.profile.Profile`, printable as a table, slowest kernel first."""
        from .profile import profile

        self._check_runs_here("profile")
        with self._lock:
            return profile(self, *arrays, repeat=repeat, warmup=warmup, **named)

    # -- exporting ----------------------------------------------------------------------------------
    def export(self, path: str | os.PathLike, *, bundle: bool = False) -> Path:
        """Write one self-contained ``.so`` (code, weights, metadata) loadable with ``compiler.load``.

        ``bundle=True``: ``path`` is a directory instead, written as a deployment bundle for the
        module's target (``model.so``, the minimal TVM runtime libraries for the board, a C++ runner and
        a README; no Python needed on the board): the same as ``kiln package`` (``compiler.package``)."""
        from .toolchain import export_compiler

        if bundle:
            import tempfile

            from .package import package

            with tempfile.TemporaryDirectory(prefix="kiln-export-") as tmp:
                return package(self.export(Path(tmp) / "model.so"), out_dir=path)
        with native_log.captured():
            out = artifact.export(self._executable, path, self.meta, fcompile=export_compiler(self.target))
        if self.target.kind == "cuda":  # compiled SASS for the target's sm_XX inside, not CUDA source
            from .cuda import check_device_code

            check_device_code(out, self.target.arch)
        return out

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name}{list(s.shape)}" for s in self.inputs)
        return f"<CompiledModule target={self.meta['target']['name']} inputs=({ins})>"


def _host_view(tensor):
    """A NumPy array sharing ``tensor``'s memory when it is on the CPU in a dtype NumPy has, else None."""
    if tensor.device.dlpack_device_type() != 1:  # kDLCPU
        return None
    try:
        return np.from_dlpack(tensor)
    except (RuntimeError, TypeError, BufferError):
        return None


def load(path, device: str = "cpu") -> CompiledModule:
    """A module written by :meth:`CompiledModule.export`, checked before it is mapped: its metadata must
    come from this Kiln, its CPU architecture and features (or GPU) must be this machine's. See
    :func:`compiler.load`."""
    import platform

    import tvm

    meta = artifact.read_metadata(path)
    machine = artifact.elf_machine(path)
    host = platform.machine()
    if machine != host:
        raise IncompatibleModuleError(
            f"{path} was built for {machine} (target {meta['target']['name']!r}) and cannot run on this "
            f"{host} machine; run it on a matching device"
            + (" or on the emulated device (`kiln run MODULE --emulate`, compiler.emulator.run; set up by "
               "scripts/setup_arm.sh)" if machine == "aarch64" else "")
            + ", or recompile with --target x86"
        )
    if meta["target"].get("kind") == "cuda":  # GPU features are not CPU features: check the GPU instead
        from . import cuda

        cuda.check_device(meta["target"], path)
        needed = set()
    else:
        needed = set(meta["target"].get("features", ())) - set(targets.host_description().features)
    if needed:
        raise IncompatibleModuleError(
            f"{path} was compiled for {meta['target']['name']!r} and uses CPU features this machine "
            f"lacks: {sorted(needed)}; recompile with --target x86"
        )
    try:
        with native_log.captured():
            lib = tvm.runtime.load_module(str(path))
    except Exception as err:
        raise IncompatibleModuleError(f"cannot load {path}: {err}") from err
    return CompiledModule(lib, meta, device=device)
