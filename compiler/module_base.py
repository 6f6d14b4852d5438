"""What every kind of compiled module shares, written once.

A module kind (``CompiledModule`` in this process, ``EmulatedModule`` on the emulated aarch64 device,
``RemoteModule`` on an RPC device, ``MCUModule``/``MCULibrary`` for microcontrollers) is a
:class:`ModuleBase`: its ``meta`` (the metadata every artefact carries, see ``artifact.module_metadata``)
gives its input and output specs, target and summary; it checks and orders inputs the same way
(:func:`arrange_inputs`) and reports timings as a :class:`BenchmarkResult`.
"""

from __future__ import annotations

import functools
import statistics
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .analysis import FLOPS_NOTE, KernelInfo
from .errors import InputShapeError, NonFiniteError
from .frontends import TensorSpec


@dataclass(frozen=True)
class BenchmarkResult:
    """Latency statistics in milliseconds over ``repeat`` timed runs (after ``warmup`` runs)."""

    mean_ms: float
    median_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    repeat: int

    @classmethod
    def from_times(cls, times_ms: Sequence[float]) -> "BenchmarkResult":
        """The statistics of per-run times in milliseconds (at least one)."""
        times = [float(t) for t in times_ms]
        return cls(statistics.mean(times), statistics.median(times),
                   statistics.stdev(times) if len(times) > 1 else 0.0, min(times), max(times), len(times))

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


@functools.lru_cache(maxsize=None)
def _numpy_dtype(name: str):
    """NumPy's dtype called ``name``, or None where NumPy has none (bfloat16 without ml_dtypes)."""
    try:
        return np.dtype(name)
    except TypeError:
        return None


def arrange_inputs(specs: Sequence[TensorSpec], arrays: Sequence, named: dict) -> list[np.ndarray]:
    """The inputs in ``specs`` order (positional ``arrays`` fill the inputs not given by name in
    ``named``), each C-contiguous with its spec's shape and dtype (cast when the cast stays within the
    same kind); an :class:`InputShapeError` naming the input otherwise."""
    if len(arrays) + len(named) != len(specs):
        raise InputShapeError(f"the model takes {len(specs)} input(s) ({', '.join(s.name for s in specs)}); "
                              f"got {len(arrays) + len(named)}")
    if named:
        unknown = sorted(set(named) - {s.name for s in specs})
        if unknown:
            raise InputShapeError(f"unknown input name(s) {unknown}; inputs are {sorted(s.name for s in specs)}")
    by_pos, values = list(arrays), []
    for spec in specs:
        arr = named[spec.name] if spec.name in named else by_pos.pop(0)
        # The common case, an array already as compiled, costs a few attribute reads (a small model's
        # whole run is tens of microseconds; str(dtype) alone cost several).
        if (type(arr) is np.ndarray and arr.dtype == _numpy_dtype(spec.dtype) and arr.shape == spec.shape
                and arr.flags.c_contiguous):
            values.append(arr)
            continue
        arr = np.asarray(arr)
        if tuple(arr.shape) != tuple(spec.shape):
            raise InputShapeError(f"input {spec.name!r} has shape {list(arr.shape)}; the module was compiled for "
                                  f"{list(spec.shape)}")
        if str(arr.dtype) != spec.dtype:
            if not np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
                raise InputShapeError(f"input {spec.name!r} has dtype {arr.dtype}; expected {spec.dtype}")
            arr = arr.astype(spec.dtype)
        values.append(np.require(arr, requirements="C"))  # keeps rank 0 (ascontiguousarray makes it 1-D)
    return values


def require_finite(specs: Sequence[TensorSpec], values: Sequence, what: str) -> None:
    """A :class:`NonFiniteError` naming every floating-point value in ``values`` (matched to ``specs``)
    that holds NaN or infinity, with counts; ``what`` is "input" or "output"."""
    bad = []
    for spec, value in zip(specs, values):
        arr = np.asarray(value)
        if arr.dtype.kind in "fc":
            nan, inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
            if nan or inf:
                bad.append(f"{what} {spec.name!r} holds {nan} NaN and {inf} infinite value(s) of {arr.size}")
    if bad:
        raise NonFiniteError("; ".join(bad))


def random_inputs(specs: Sequence[TensorSpec], seed: int = 0) -> list[np.ndarray]:
    """Inputs of the right shapes and dtypes: normal floats, small non-negative integers, fair booleans."""
    rng = np.random.default_rng(seed)
    out = []
    for s in specs:
        if s.dtype.startswith(("int", "uint")):
            out.append(rng.integers(0, 100, s.shape).astype(s.dtype))
        elif s.dtype == "bool":
            out.append(rng.random(s.shape) > 0.5)
        else:
            out.append(rng.standard_normal(s.shape).astype(s.dtype))
    return out


class ModuleBase:
    """The part of every module kind that only needs its metadata ``meta``.

    ``_lock`` serialises the calls of one module object: a TVM virtual machine (and an RPC session)
    keeps per-call state and must not be entered from two threads at once. Each call already uses
    every core, so serialising costs serving code no throughput."""

    def __init__(self, meta: dict):
        self.meta = meta
        self._lock = threading.RLock()
        self.inputs = [TensorSpec.from_json(d) for d in meta["inputs"]]
        self.outputs = [TensorSpec.from_json(d) for d in meta["outputs"]]

    @property
    def target(self):
        """The :class:`targets.TargetDescription` the module was compiled for."""
        from targets import TargetDescription

        return TargetDescription.from_json(self.meta["target"])

    def _arrange(self, arrays: Sequence, named: dict) -> list[np.ndarray]:
        return arrange_inputs(self.inputs, arrays, named)

    def _outputs_list(self, result) -> list:
        return list(result) if isinstance(result, tuple) else [result]

    def _checked(self, arrays: Sequence, named: dict, check_finite: bool, call):
        """Arrange the inputs, run ``call(inputs)`` under the module's lock, and with ``check_finite``
        refuse non-finite inputs before and non-finite outputs after."""
        values = self._arrange(arrays, named)
        if check_finite:
            require_finite(self.inputs, values, "input")
        with self._lock:
            result = call(values)
        if check_finite:
            require_finite(self.outputs, self._outputs_list(result), "output")
        return result

    def random_inputs(self, seed: int = 0) -> list[np.ndarray]:
        """Inputs of the right shapes and dtypes: normal floats, small non-negative integers."""
        return random_inputs(self.inputs, seed)

    def summary(self) -> ModuleSummary:
        """Inputs, outputs, fused kernels (with the operators each fuses), parameters, FLOPs."""
        kernels = tuple(KernelInfo(k["name"], tuple(k["ops"]), k["calls"], k["flops"]) for k in self.meta["kernels"])
        return ModuleSummary(self.meta["target"]["name"], tuple(self.inputs), tuple(self.outputs),
                             kernels, self.meta["params"], self.meta["flops"])
