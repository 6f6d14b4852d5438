"""``CompiledModule``: a compiled model you can run, time, summarise and export."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .analysis import FLOPS_NOTE, KernelInfo
from .errors import InputShapeError
from .frontends import TensorSpec


def _use_all_cores() -> None:
    """Let TVM's thread pool use every core this process may run on.

    TVM's runtime assumes x86 cores are hyper-thread pairs and starts half as many workers (one on
    this 2-core machine), which made the BERT encoder 1.8x slower. The pool reads
    ``TVM_NUM_THREADS`` when the first parallel kernel runs; a value the user set is kept."""
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))


@dataclass(frozen=True)
class BenchmarkResult:
    """Latency statistics in milliseconds over ``repeat`` timed runs (after ``warmup`` runs)."""

    mean_ms: float
    median_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    repeat: int

    def __str__(self) -> str:
        return (f"median {self.median_ms:.3f} ms, mean {self.mean_ms:.3f} ms ± {self.std_ms:.3f}, "
                f"min {self.min_ms:.3f} ms ({self.repeat} runs)")


def _si(n: float) -> str:
    """1.23e9 -> '1.23 G'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} "


@dataclass(frozen=True)
class ModuleSummary:
    """Inputs, outputs, fused kernels, parameter count and FLOPs of a compiled module."""

    target: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    kernels: tuple[KernelInfo, ...]
    params: int
    flops: int

    def __str__(self) -> str:
        lines = [f"Kiln module for target {self.target}"]
        lines += [f"  input  {s.name}: {list(s.shape)} {s.dtype}" for s in self.inputs]
        lines += [f"  output {s.name}: {list(s.shape)} {s.dtype}" for s in self.outputs]
        lines.append(f"  parameters: {self.params:,}   FLOPs: {_si(self.flops)}FLOP")
        lines.append(f"  fused kernels ({len(self.kernels)}):")
        width = max((len(k.name) for k in self.kernels), default=10)
        for k in self.kernels:
            fused = " + ".join(k.ops)
            lines.append(f"    {k.name:<{width}}  x{k.calls:<3} {k.flops / 1e6:10.2f} MFLOP  [{fused}]")
        lines.append(f"  ({FLOPS_NOTE})")
        return "\n".join(lines)


class CompiledModule:
    """A compiled model. Call it (or ``.run``) with NumPy arrays; get NumPy arrays back."""

    def __init__(self, executable, meta: dict, device: str = "cpu"):
        import tvm
        from tvm import relax

        self._executable = executable
        self.meta = meta
        self.inputs = [TensorSpec.from_json(d) for d in meta["inputs"]]
        self.outputs = [TensorSpec.from_json(d) for d in meta["outputs"]]
        if self.target.kind == "cuda" and device == "cpu":  # a GPU module runs on the GPU (inputs copied)
            device = "cuda"
        self._device = tvm.device(device)
        # A module cross-compiled for another CPU (e.g. aarch64), or for a GPU on a machine without one,
        # cannot run here: no local VM for it (creating one would fail).
        self.runs_here = not self.target.is_cross
        if self.runs_here:
            _use_all_cores()
        self._vm = relax.VirtualMachine(executable, self._device) if self.runs_here else None
        self._main = self._vm["main"] if self.runs_here else None

    def _check_runs_here(self, what: str) -> None:
        if not self.runs_here:
            from .errors import IncompatibleModuleError

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
    def _to_tensors(self, arrays: Sequence, named: dict) -> list:
        import tvm

        if len(arrays) + len(named) != len(self.inputs):
            raise InputShapeError(
                f"the model takes {len(self.inputs)} input(s) "
                f"({', '.join(s.name for s in self.inputs)}); got {len(arrays) + len(named)}"
            )
        by_pos = list(arrays)
        valid = {s.name for s in self.inputs}
        unknown = sorted(set(named) - valid)
        if unknown:
            raise InputShapeError(f"unknown input name(s) {unknown}; inputs are {sorted(valid)}")
        values = []
        for spec in self.inputs:
            arr = named[spec.name] if spec.name in named else by_pos.pop(0)
            arr = np.asarray(arr)
            if tuple(arr.shape) != spec.shape:
                raise InputShapeError(
                    f"input {spec.name!r} has shape {list(arr.shape)}; the module was compiled for "
                    f"{list(spec.shape)}"
                )
            if str(arr.dtype) != spec.dtype:
                if np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
                    arr = arr.astype(spec.dtype)
                else:
                    raise InputShapeError(f"input {spec.name!r} has dtype {arr.dtype}; expected {spec.dtype}")
            # np.require keeps rank 0 (np.ascontiguousarray makes a scalar 1-D, which the VM rejects)
            values.append(tvm.runtime.tensor(np.require(arr, requirements="C"), self._device))
        return values

    @staticmethod
    def _to_numpy(result):
        if hasattr(result, "numpy"):
            return result.numpy()
        items = tuple(CompiledModule._to_numpy(r) for r in result)
        return items[0] if len(items) == 1 else items

    def run(self, *arrays, **named):
        """Run on NumPy arrays (positional in input order, or by input name). Returns one array,
        or a tuple when the model has several outputs."""
        self._check_runs_here("run")
        return self._to_numpy(self._main(*self._to_tensors(arrays, named)))

    __call__ = run

    def random_inputs(self, seed: int = 0) -> list[np.ndarray]:
        """Inputs of the right shapes and dtypes: normal floats, small non-negative integers."""
        rng = np.random.default_rng(seed)
        out = []
        for s in self.inputs:
            if s.dtype.startswith(("int", "uint")):
                out.append(rng.integers(0, 100, s.shape).astype(s.dtype))
            elif s.dtype == "bool":
                out.append(rng.random(s.shape) > 0.5)
            else:
                out.append(rng.standard_normal(s.shape).astype(s.dtype))
        return out

    def benchmark(self, *arrays, repeat: int = 50, warmup: int = 5, **named) -> BenchmarkResult:
        """Time ``repeat`` runs after ``warmup`` runs (random inputs when none are given)."""
        self._check_runs_here("benchmark")
        if not arrays and not named:
            arrays = tuple(self.random_inputs())
        args = self._to_tensors(arrays, named)
        for _ in range(warmup):
            self._main(*args)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            self._main(*args)
            times.append((time.perf_counter() - t0) * 1e3)
        return BenchmarkResult(
            statistics.mean(times), statistics.median(times),
            statistics.stdev(times) if len(times) > 1 else 0.0, min(times), max(times), repeat,
        )

    def profile(self, *arrays, repeat: int = 20, warmup: int = 3, **named):
        """Time every fused kernel over ``repeat`` runs (random inputs when none are given): a
        :class:`compiler.profile.Profile`, printable as a table, slowest kernel first."""
        from .profile import profile

        return profile(self, *arrays, repeat=repeat, warmup=warmup, **named)

    # -- describing and exporting ------------------------------------------------------------------
    def summary(self) -> ModuleSummary:
        """Inputs, outputs, fused kernels (with the operators each fuses), parameters, FLOPs."""
        kernels = tuple(KernelInfo(k["name"], tuple(k["ops"]), k["calls"], k["flops"]) for k in self.meta["kernels"])
        return ModuleSummary(self.meta["target"]["name"], tuple(self.inputs), tuple(self.outputs),
                             kernels, self.meta["params"], self.meta["flops"])

    @property
    def target(self):
        """The :class:`targets.TargetDescription` the module was compiled for."""
        from targets import TargetDescription

        return TargetDescription.from_json(self.meta["target"])

    def export(self, path: str | os.PathLike, *, bundle: bool = False) -> Path:
        """Write one self-contained ``.so`` (code, weights, metadata) loadable with ``compiler.load``.

        ``bundle=True``: ``path`` is a directory instead, written as a deployment bundle for the
        module's target (``model.so``, the minimal TVM runtime libraries for the board, a C++ runner and
        a README; no Python needed on the board): the same as ``kiln package`` (``compiler.package``)."""
        from . import artifact
        from .build import export_compiler

        if bundle:
            import tempfile

            from .package import package

            with tempfile.TemporaryDirectory(prefix="kiln-export-") as tmp:
                return package(self.export(Path(tmp) / "model.so"), out_dir=path)
        out = artifact.export(self._executable, path, self.meta, fcompile=export_compiler(self.target))
        if self.target.kind == "cuda":  # compiled SASS for the target's sm_XX inside, not CUDA source
            from .cuda import check_device_code

            check_device_code(out, self.target.arch)
        return out

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name}{list(s.shape)}" for s in self.inputs)
        return f"<CompiledModule target={self.meta['target']['name']} inputs=({ins})>"
