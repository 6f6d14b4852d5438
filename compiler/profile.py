"""Per-kernel profile of a compiled module: where one inference spends its time.

TVM 0.27 removed the Relax VM's profiler; its ``set_instrument`` hook remains and is called before
and after every call the VM makes. :func:`profile` times each call with it over ``repeat`` runs and
groups the calls by fused kernel (the names ``kiln info`` and ``summary()`` list); the VM's own
built-ins (allocation, shape checks, reshapes) form one row. The end-to-end latency in the header is
measured separately, without the hook. Each timed call includes a few microseconds of
instrumentation overhead, so kernels that run for a few microseconds read slightly high.

    prof = compiler.compile("zoo:resnet18").profile()
    print(prof)                 # table, slowest kernel first
    prof.kernels[0].ms          # per inference
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

#: Suffixes the pipeline appends to a fused kernel's name when it schedules it (pipeline.schedule).
_SUFFIXES = ("_prepacked",)
VM_BUILTINS = "VM built-ins"


@dataclass(frozen=True)
class KernelTime:
    """One fused kernel: ``calls`` per inference, ``ms`` per inference (median over runs), ``share``
    of the sum over all rows, ``flops`` per inference (0 when unknown), ``ops`` it fuses."""

    name: str
    calls: int
    ms: float
    share: float
    flops: int
    ops: tuple[str, ...] = ()

    @property
    def gflops(self) -> float | None:
        """Achieved GFLOP/s (None without a FLOP count)."""
        return self.flops / (self.ms * 1e6) if self.flops and self.ms > 0 else None


@dataclass(frozen=True)
class Profile:
    """Kernels slowest first; ``total_ms``: end-to-end median latency measured without the hook;
    ``kernel_ms``: the sum of the rows (instrumented); ``repeat``: timed runs."""

    target: str
    source: str
    total_ms: float
    kernel_ms: float
    kernels: tuple[KernelTime, ...]
    repeat: int

    def __str__(self) -> str:
        width = max([len(k.name) for k in self.kernels] + [20])
        lines = [f"Profile of {self.source} on {self.target}: {self.total_ms:.3f} ms per inference "
                 f"(median of {self.repeat} runs, uninstrumented)",
                 f"  {'kernel':<{width}}  calls   ms/run      %   GFLOP/s"]
        for k in self.kernels:
            gf = f"{k.gflops:9.1f}" if k.gflops is not None else " " * 9
            lines.append(f"  {k.name:<{width}}  {k.calls:5d}  {k.ms:7.3f}  {100 * k.share:5.1f}%  {gf}")
        lines.append(f"  {'sum of rows (instrumented)':<{width}}         {self.kernel_ms:7.3f}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"target": self.target, "source": self.source, "total_ms": self.total_ms,
                "kernel_ms": self.kernel_ms, "repeat": self.repeat,
                "kernels": [{"name": k.name, "calls": k.calls, "ms": k.ms, "share": k.share, "flops": k.flops,
                             "ops": list(k.ops)} for k in self.kernels]}


def _kernel_name(symbol: str, known: set[str]) -> str:
    if symbol in known:
        return symbol
    for suffix in _SUFFIXES:
        if symbol.endswith(suffix) and symbol[: -len(suffix)] in known:
            return symbol[: -len(suffix)]
    return VM_BUILTINS if symbol.startswith("vm.builtin.") else symbol


def profile(module, *arrays, repeat: int = 20, warmup: int = 3, **named) -> Profile:
    """Profile ``module`` (a :class:`compiler.CompiledModule` that runs on this machine) on the given
    inputs (random ones when none are given); see the module docstring."""
    if repeat < 1:
        from .errors import KilnError

        raise KilnError(f"repeat must be at least 1, got {repeat}")
    module._check_runs_here("profile")
    if not arrays and not named:
        arrays = tuple(module.random_inputs())
    args = module._to_tensors(module._arrange(arrays, named))
    total = module.benchmark(*arrays, repeat=max(repeat, 10), warmup=warmup, **named).median_ms

    info = {k["name"]: k for k in module.meta["kernels"]}
    known = set(info)
    runs: list[dict[str, float]] = []
    calls: dict[str, int] = {}
    start: dict[str, int] = {}

    def instrument(func, symbol, before_run, ret_value, *call_args):  # noqa: ARG001 - the VM's signature
        now = time.perf_counter_ns()
        if before_run:
            start[symbol] = now
            return 0
        name = _kernel_name(str(symbol), known)
        acc = runs[-1]
        acc[name] = acc.get(name, 0.0) + (now - start.pop(symbol, now)) / 1e6
        if len(runs) == 1:
            calls[name] = calls.get(name, 0) + 1
        # the end of this callback is the start of the VM's next step: keep its own time out
        return 0

    vm = module._vm
    vm.set_instrument(instrument)
    try:
        for _ in range(repeat):
            runs.append({})
            module._main(*args)
    finally:
        vm.set_instrument(None)
    names = {n for r in runs for n in r}
    per = {n: statistics.median(r.get(n, 0.0) for r in runs) for n in names}
    kernel_ms = sum(per.values())
    rows = sorted(
        (KernelTime(n, calls.get(n, 0), ms, ms / kernel_ms if kernel_ms else 0.0,
                    int(info[n]["flops"]) if n in info else 0, tuple(info[n]["ops"]) if n in info else ())
         for n, ms in per.items()),
        key=lambda k: -k.ms)
    return Profile(module.meta["target"]["name"], module.meta.get("source", "model"), total, kernel_ms,
                   tuple(rows), repeat)
