"""Microcontroller targets (Cortex-M): a model compiled into one self-contained C library.

    mod = compiler.compile(model, target="cortex-m4", example_inputs=(x,))
    mod.export("outdir/")        # model.h, model.c, Makefile, model.cmake, kiln.json
    y = mod.run(x.numpy())       # builds the library and runs it under qemu-system-arm

The path reuses Kiln's pipeline up to the fused TIR kernels (``pipeline.prepare``, ``pipeline.fuse``),
then gives each kernel the MCU schedule (:mod:`.schedule`: inline everything spatial, keep epilogues
in registers), emits C with TVM's ``c`` target, plans every intermediate and kernel workspace into
one static arena by liveness (:mod:`.plan`), and writes ``model.c`` with the weights as ``static
const`` arrays and ``model_run`` walking the call sequence (:mod:`.codegen`). No TVM runtime, no
``malloc``, no operating system. Flash and RAM limits of the target are checked at compile time.
Reshapes between kernels are aliases of their input's buffer, not copies.

``compile(..., precision="int8", calibration=batches)`` runs :func:`compiler.quantize.quantize`
between ``prepare`` and ``fuse``: int8 weights per output channel (about a quarter of the flash),
8-bit intermediates in the arena, float32 inputs and outputs (``model_run`` is unchanged).
Building and emulating need ``arm-none-eabi-gcc`` and ``qemu-system-arm`` (``scripts/setup_mcu.sh``).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path


from ..errors import CompileError, TuningError
from ..frontends import TensorSpec
from ..module_base import ModuleBase, arrange_inputs

log = logging.getLogger(__name__)

META_FILE = "kiln.json"


class MemoryLimitError(CompileError):
    """The model does not fit the target's flash or RAM (the message has the numbers)."""


def _kb(n: int) -> str:
    return f"{n:,} B ({n / 1024:.1f} KB)"


def compile_mcu(model, desc, *, example_inputs=None, input_shapes=None, input_dtypes=None,
                tuning_logs=None, precision: str = "fp32", calibration=None,
                schedule_kernels: bool = True, constant_inputs=None) -> "MCUModule":
    """See :func:`compiler.compile`; ``desc`` is a target description of family ``mcu``.

    ``precision="int8"`` quantizes convolutions and matmuls after ``pipeline.prepare`` with
    :func:`compiler.quantize.quantize` (``calibration``: example input batches): int8 weights in
    flash, 8-bit intermediates in the arena, float32 inputs and outputs.
    ``schedule_kernels=False`` keeps TVM's plain loops (every fused intermediate becomes a kernel
    workspace): for comparisons and tests of the workspace planning."""
    from .. import pipeline
    from ..analysis import kernel_table
    from ..artifact import module_metadata
    from . import codegen, schedule

    if tuning_logs is not None:
        raise TuningError(f"tuning records are not used for microcontroller targets ({desc.name}) yet; "
                          "compile without tuning_logs / --tuning-logs")
    t0 = time.perf_counter()
    lowered = pipeline.lower(model, desc, example_inputs=example_inputs, input_shapes=input_shapes,
                             input_dtypes=input_dtypes, precision=precision, calibration=calibration,
                             constant_inputs=constant_inputs)
    imported, fused, groups, quant = lowered.imported, lowered.fused, lowered.groups, lowered.quant
    program = codegen.lower_main(codegen.alias_reshapes(fused), [s.name for s in imported.inputs],
                                 list(imported.output_names))
    weights = sum(t.nbytes for t in program.tensors if t.kind == "const")
    flash = desc.flash_kb * 1024
    if flash and weights > flash:
        raise MemoryLimitError(
            f"the model does not fit {desc.name}: its weights need {_kb(weights)} of flash, the target has "
            f"{_kb(flash)} (before any code)")
    scheduled = schedule.schedule_module(fused, schedule.vector_lanes(desc)) if schedule_kernels else fused
    kernels = list(dict.fromkeys(c.kernel for c in program.calls))
    kernels_c = codegen.emit_kernels(scheduled, kernels, desc.to_tvm())
    peaks = codegen.workspace_peaks(kernels_c)
    plan = codegen.build_plan(program, peaks)
    io_bytes = sum(program.tensors[i].nbytes for i in program.inputs + program.outputs)
    ram = desc.ram_kb * 1024
    if ram and plan.arena_bytes + io_bytes > ram:
        raise MemoryLimitError(
            f"the model does not fit {desc.name}: it needs {_kb(plan.arena_bytes + io_bytes)} of RAM (arena "
            f"{_kb(plan.arena_bytes)}: intermediates planned by liveness, sum of all intermediates "
            f"{_kb(plan.tensor_bytes)}, largest kernel workspace {_kb(plan.workspace_bytes)}; inputs and outputs "
            f"{_kb(io_bytes)}), the target has {_kb(ram)}")
    ktable = kernel_table(fused, groups)
    meta = module_metadata(imported, desc, ktable)
    meta.update({
        "kind": "mcu-c-library",
        "prefix": "model",
        "inputs": [s.to_json() for s in (program_spec(program, i) for i in program.inputs)],
        "outputs": [{"name": n, "shape": list(program.tensors[i].shape), "dtype": program.tensors[i].dtype}
                    for n, i in zip(program.output_names, program.outputs)],
        "kernels_called": [c.kernel for c in program.calls],
        "precision": precision,
        "memory": {
            "weights_bytes": weights,
            "arena_bytes": plan.arena_bytes,
            "intermediate_bytes": plan.tensor_bytes,
            "workspace_bytes": plan.workspace_bytes,
            "unplanned_bytes": plan.unplanned_bytes,
            "io_bytes": io_bytes,
            "flash_limit_bytes": flash,
            "ram_limit_bytes": ram,
        },
    })
    if quant is not None:
        meta["quantization"] = quant.to_json()
        meta["memory"]["weights_fp32_bytes"] = codegen.constant_bytes(lowered.prepared["main"])
    log.info("compiled for %s in %.1f s", desc.name, time.perf_counter() - t0)
    return MCUModule(meta, program, plan, kernels_c, peaks)


def program_spec(program, idx):
    t = program.tensors[idx]
    return TensorSpec(t.name, tuple(t.shape), t.dtype)


class MCUModule(ModuleBase):
    """A model compiled for a microcontroller: a C library to export, or to run under QEMU."""

    def __init__(self, meta: dict, program, plan, kernels_c: str, ws_peaks: dict[str, int]):
        super().__init__(meta)
        self.program = program
        self.plan = plan
        self._kernels_c = kernels_c
        self._ws_peaks = ws_peaks

    # -- files ---------------------------------------------------------------------------------
    def sources(self, prefix: str = "model") -> dict[str, str]:
        """The library's files by name: ``<prefix>.h``, ``<prefix>.c``, ``Makefile``, ``<prefix>.cmake``."""
        from . import codegen, toolchain

        desc = self.target
        return {
            f"{prefix}.h": codegen.emit_model_h(self.program, self.plan, prefix, desc.name,
                                                self.meta["memory"]["weights_bytes"],
                                                self.meta.get("precision", "fp32")),
            f"{prefix}.c": codegen.emit_model_c(self.program, self.plan, self._kernels_c, self._ws_peaks, prefix,
                                                desc.name),
            "Makefile": toolchain.makefile(desc, prefix),
            f"{prefix}.cmake": toolchain.cmake_snippet(desc, prefix),
        }

    def export(self, outdir, prefix: str = "model") -> Path:
        """Write the C library into the directory ``outdir`` (created if needed) and return it.

        When arm-none-eabi-gcc is installed the library is also compiled once to measure its code
        size (``meta["sizes"]``, see :meth:`memory_report`)."""
        from . import toolchain

        if not prefix.isidentifier():
            raise CompileError(f"prefix must be a C identifier, not {prefix!r}")
        out = Path(outdir)
        if out.exists() and not out.is_dir():
            raise CompileError(f"{out} exists and is not a directory: microcontroller builds write a C library "
                               "directory (e.g. -o outdir/)")
        out.mkdir(parents=True, exist_ok=True)
        for name, text in self.sources(prefix).items():
            (out / name).write_text(text)
        self.meta["prefix"] = prefix
        if toolchain.have_toolchain(emulator=False):
            with tempfile.TemporaryDirectory() as tmp:
                tmpdir = Path(tmp)
                for name in (f"{prefix}.c", f"{prefix}.h"):
                    (tmpdir / name).write_text((out / name).read_text())
                obj = toolchain.compile_object(tmpdir, self.target, prefix)
                self.meta["sizes"] = toolchain.size_of(obj)
        (out / META_FILE).write_text(json.dumps(self.meta, indent=1))
        return out

    # -- reporting -----------------------------------------------------------------------------
    def memory_report(self) -> str:
        """Flash and RAM figures: weights, code (when measured), arena, workspace, limits."""
        return memory_report(self.meta)

    def run(self, *arrays, profile: bool = False, **named):
        """Build the library for its target and run it once under qemu-system-arm; returns one array
        or a tuple (as ``CompiledModule.run``). With ``profile=True`` returns ``(outputs, ticks)``."""
        with tempfile.TemporaryDirectory() as tmp:
            self.export(Path(tmp) / "lib")
            outs, prof = emulate(Path(tmp) / "lib", list(arrays), named, profile=profile)
        result = outs[0] if len(outs) == 1 else tuple(outs)
        return (result, prof) if profile else result

    __call__ = run

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name}{list(s.shape)}" for s in self.inputs)
        return f"<MCUModule target={self.meta['target']['name']} inputs=({ins})>"


def memory_report(meta: dict) -> str:
    m = meta["memory"]
    precision = meta.get("precision", "fp32")
    rows = [("weights (flash)", m["weights_bytes"])]
    if "weights_fp32_bytes" in m:
        ratio = m["weights_bytes"] / max(m["weights_fp32_bytes"], 1)
        rows.append((f"  the same weights in fp32 ({precision}: {ratio:.0%} of them)", m["weights_fp32_bytes"]))
    sizes = meta.get("sizes")
    if sizes:
        code = max(sizes["text"] - m["weights_bytes"], 0)
        rows.append(("code (flash, arm-none-eabi-size text - weights)", code))
        rows.append(("flash total (text + data)", sizes["text"] + sizes["data"]))
    rows += [
        ("arena (RAM, .bss): intermediates + workspaces", m["arena_bytes"]),
        ("  sum of all intermediates (no reuse)", m["intermediate_bytes"]),
        ("  largest kernel workspace", m["workspace_bytes"]),
        ("inputs + outputs (caller's buffers)", m["io_bytes"]),
    ]
    if sizes:
        rows.append(("static RAM of the library (data + bss)", sizes["data"] + sizes["bss"]))
    lines = [f"memory for {meta['target']['name']} ({precision}):"]
    lines += [f"  {name:<50} {value:>10,} B  {value / 1024:8.1f} KB" for name, value in rows]
    lim_f, lim_r = m["flash_limit_bytes"], m["ram_limit_bytes"]
    if lim_f or lim_r:
        lines.append(f"  limits: flash {lim_f / 1024:.0f} KB, RAM {lim_r / 1024:.0f} KB")
    return "\n".join(lines)


def read_meta(libdir) -> dict:
    path = Path(libdir) / META_FILE
    if not path.is_file():
        raise CompileError(f"{libdir} is not a Kiln microcontroller library (no {META_FILE}); "
                           "write one with `kiln compile MODEL --target cortex-m4 -o DIR/`")
    return json.loads(path.read_text())


def emulate(libdir, arrays=(), named=None, *, profile: bool = False, workdir=None, timeout: float = 300):
    """Build the library in ``libdir`` into a firmware for its target's QEMU board, run it, and
    return ``(outputs, per_step_ticks_or_None)``."""
    from targets import TargetDescription

    from . import toolchain

    libdir = Path(libdir)
    meta = read_meta(libdir)
    desc = TargetDescription.from_json(meta["target"])
    inputs = arrange_inputs([TensorSpec.from_json(d) for d in meta["inputs"]], list(arrays), dict(named or {}))
    toolchain.tool("arm-none-eabi-gcc")
    toolchain.tool("qemu-system-arm")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir) if workdir else Path(tmp)
        elf = toolchain.build_firmware(libdir, desc, meta, inputs, work, profile=profile)
        text = toolchain.run_qemu(elf, desc, timeout=timeout, icount=profile)
        outs, ticks = toolchain.parse_output(text, meta)
    if profile and ticks is not None:
        board = toolchain.board_for(desc)
        ns_per_tick = 1e9 / board.sysclk_hz  # -icount shift=0: one instruction per virtual nanosecond
        ticks = [int(round(t * ns_per_tick)) for t in ticks[: len(meta["kernels_called"])]]
    return outs, ticks


class EmulationProfile:
    """Per-kernel instruction counts of one emulated run (QEMU ``-icount``: an instruction-count proxy
    for cycles; real cores differ by their cycles per instruction, memory wait states and caches)."""

    def __init__(self, kernels: list[str], counts: list[int], target: str):
        self.kernels, self.counts, self.target = kernels, counts, target

    @property
    def total(self) -> int:
        return sum(self.counts)

    def __str__(self) -> str:
        width = max((len(k) for k in self.kernels), default=6)
        lines = [f"instructions per kernel on {self.target} (QEMU -icount; a proxy for cycles):"]
        for step, (k, c) in enumerate(zip(self.kernels, self.counts)):
            lines.append(f"  {step:>3} {k:<{width}} {c:>12,}")
        lines.append(f"      {'total':<{width}} {self.total:>12,}")
        return "\n".join(lines)


class MCULibrary(ModuleBase):
    """A C library written by :meth:`MCUModule.export`, run under qemu-system-arm (``kiln run DIR --emulate``)."""

    def __init__(self, libdir):
        self.path = Path(libdir)
        super().__init__(read_meta(self.path))
        self._last_inputs = None

    def run(self, *arrays, check_finite: bool = False, **named):
        """Build the firmware and run it once under QEMU; one array, or a tuple for several outputs
        (``check_finite`` as for :meth:`compiler.CompiledModule.run`)."""
        self._last_inputs = (arrays, named)

        def call(values):
            outs, _ = emulate(self.path, values, {})
            return outs[0] if len(outs) == 1 else tuple(outs)

        return self._checked(arrays, named, check_finite, call)

    __call__ = run

    def profile(self, *arrays, **named) -> EmulationProfile:
        """Per-kernel instruction counts of one run (random inputs when none are given)."""
        if not arrays and not named:
            arrays, named = self._last_inputs or (tuple(self.random_inputs()), {})
        _, counts = emulate(self.path, list(arrays), named, profile=True)
        return EmulationProfile(self.meta["kernels_called"], counts or [], self.meta["target"]["name"])

    def benchmark(self, *arrays, repeat: int = 1, **named) -> EmulationProfile:
        """Under emulation there is no meaningful latency: the per-kernel instruction counts instead."""
        return self.profile(*arrays, **named)

    def memory_report(self) -> str:
        return memory_report(self.meta)

    def __repr__(self) -> str:
        return f"<MCULibrary {self.path} target={self.meta['target']['name']}>"


def load(libdir) -> MCULibrary:
    """Open a library directory written by ``MCUModule.export`` / ``kiln compile --target cortex-m4 -o DIR``."""
    return MCULibrary(libdir)
