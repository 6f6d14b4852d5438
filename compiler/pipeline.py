"""Kiln's pass pipeline, as named steps shared by compile and tune.

    imported Relax ──prepare──▶ graph-optimised Relax ──fuse──▶ fused TIR kernels
                  ──schedule──▶ scheduled kernels ──build──▶ executable

``prepare`` and ``fuse`` are deterministic functions of (module, target): tuning extracts its tasks
from the output of ``fuse`` and compiling applies records to that very output, so the structural
hashes MetaSchedule keys its records by always match (see DEVELOPERS.md).
"""

from __future__ import annotations

import contextlib
import logging
import re

import tvm
from tvm import relax

from targets import TargetDescription

from . import graph_passes
from .errors import CompileError, KilnError

log = logging.getLogger(__name__)


def prepare(mod: tvm.IRModule, target: TargetDescription) -> tvm.IRModule:
    """Graph-level optimisation on Relax: inference decompositions, constant folding, BatchNorm and
    per-channel affine folding into convolutions, and the target's preferred data layouts."""
    import schedules

    schedules.install_hooks()
    steps = [graph_passes.HalfComputeInFloat] if target.family in ("x86", "arm") else []
    steps += [
        relax.transform.DecomposeOpsForInference(),
        graph_passes.StackAsConcat,
        relax.transform.CanonicalizeBindings(),
        relax.transform.FoldConstant(),
        graph_passes.FoldAffineIntoConv,
        relax.transform.FoldConstant(),
    ]
    tail = [relax.transform.DeadCodeElimination(), relax.transform.CanonicalizeBindings()]
    with target.to_tvm():
        mod = tvm.transform.Sequential(steps, name="kiln.prepare")(mod)
        layouts = schedules.preferred_layouts(target)
        if layouts:
            try:
                mod = tvm.transform.Sequential([relax.transform.ConvertLayout(layouts), relax.transform.FoldConstant()],
                                               name="kiln.layouts")(mod)
            except Exception as err:  # noqa: BLE001 - TVM's layout inference fails on some ops (Dropout's
                # tuple, Unique's unknown rank): keep the model's own layouts, which are always correct
                log.warning("keeping the model's data layouts: TVM's layout conversion failed (%s)",
                            str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__)
        return tvm.transform.Sequential(tail, name="kiln.prepare_tail")(mod)


def fuse(mod: tvm.IRModule, target: TargetDescription) -> tuple[tvm.IRModule, dict[str, tuple[str, ...]]]:
    """Lower Relax operators to TIR and fuse producers with their elementwise consumers.

    Returns the fused module (its PrimFuncs are the kernels that tuning and default schedules work
    on) and, for each fused kernel, the names of the operators it fuses."""
    from . import legalize, winograd
    from .analysis import fused_groups

    with target.to_tvm():
        if target.winograd:  # before lowering, so tuning and compiling see the same kernels
            mod = winograd.WinogradConv(mod)
        grouped = tvm.transform.Sequential(
            [
                relax.transform.LegalizeOps(legalize.legalize_map()),
                relax.transform.AnnotateTIROpPattern(),
                winograd.MarkTransformPatterns,
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
            ],
            name="kiln.fuse_ops",
        )(mod)
        groups = fused_groups(grouped)
        fused = tvm.transform.Sequential(
            [relax.transform.FuseTIR(), relax.transform.DeadCodeElimination()], name="kiln.fuse_tir"
        )(grouped)
    return fused, groups


def _copy(mod: tvm.IRModule) -> tvm.IRModule:
    """A shallow copy: DLight's ApplyDefaultSchedule (and the database pass) write their results into
    the module they are given, and the caller's fused module (kernel table, FLOPs, tuning tasks) must
    not be silently scheduled too."""
    return tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs, global_infos=mod.global_infos)


def apply_records(mod: tvm.IRModule, target: TargetDescription, database) -> tuple[tvm.IRModule, list[str]]:
    """Apply the best tuning record of ``database`` (a MetaSchedule database) to every kernel that has
    one; return the module (a copy) and the names of the kernels a record scheduled.

    ``MetaScheduleApplyDatabase`` looks each PrimFunc up as the ``main`` of an IRModule, the same key
    ``schedules.search.extract_tasks`` tunes under, and marks what it scheduled ``tirx.is_scheduled``."""
    mod = _copy(mod)
    unscheduled = {gv.name_hint for gv, f in mod.functions_items()
                   if isinstance(f, tvm.tirx.PrimFunc) and not f.attrs.get("tirx.is_scheduled", False)}
    with target.to_tvm(), database:
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    tuned = sorted(gv.name_hint for gv, f in mod.functions_items()
                   if gv.name_hint in unscheduled and isinstance(f, tvm.tirx.PrimFunc)
                   and f.attrs.get("tirx.is_scheduled", False))
    return mod, tuned


def schedule(mod: tvm.IRModule, target: TargetDescription, database=None) -> tvm.IRModule:
    """Apply tuning records from ``database`` (a MetaSchedule database) where they exist, then
    Kiln's default schedule for every kernel still unscheduled."""
    import schedules

    if database is not None:
        mod, _tuned = apply_records(mod, target, database)  # works on a copy
    else:
        mod = _copy(mod)
    with target.to_tvm():
        return tvm.transform.Sequential(
            [
                schedules.default_schedule_pass(target),
                # Schedules (Kiln's conv rule, MetaSchedule records) may repack constant weights in
                # blocks marked ``meta_schedule.layout_rewrite_preproc``: split those out of the
                # kernels and fold them into the constants, so the repack runs once at compile time.
                relax.transform.SplitLayoutRewritePreproc(),
                relax.transform.FoldConstant(),
                relax.transform.DeadCodeElimination(),
            ],
            name="kiln.schedule",
        )(mod)


def build(mod: tvm.IRModule, target: TargetDescription) -> relax.VMExecutable:
    """Lower the scheduled module to a VM executable (memory planning, codegen).

    The family's TVM backend passes (library dispatch, dataflow lowering, finalisation), not its
    legalisation: ``fuse`` and ``schedule`` already did that. CUDA builds need
    ``compiler.cuda.build_environment`` around this call to embed compiled device code."""
    if target.family == "cuda":
        from tvm.relax.backend.cuda import pipeline as backend
    else:
        from tvm.relax.backend.cpu_generic import pipeline as backend

    tvm_target = target.to_tvm()
    relax_pipeline = tvm.transform.Sequential(
        backend.library_dispatch_passes(tvm_target)
        + backend.dataflow_lower_passes(tvm_target)
        + backend.finalize_passes(tvm_target),
        name="kiln.finalize",
    )
    import schedules

    schedules.install_hooks()
    with tvm_target:
        return tvm.compile(mod, target=tvm_target, relax_pipeline=relax_pipeline)


@contextlib.contextmanager
def stage(name: str, mod: tvm.IRModule | None = None, groups: dict[str, tuple[str, ...]] | None = None):
    """Run one step of a compile; turn anything but a ``KilnError`` that escapes it (a TVM
    ``InternalError``, a ``TypeError`` from a converter, a ``MemoryError``...) into a
    :class:`CompileError` naming the step and the kernels and operators the failure mentions, with the
    original kept as ``__cause__``. The last line of defence: the causes are fixed where they are found."""
    try:
        yield
    except KilnError:
        raise
    except (RuntimeError, TypeError, ValueError, KeyError, IndexError, AttributeError, AssertionError,
            MemoryError, ZeroDivisionError) as err:
        text = str(err)
        where = _mentioned_operators(text, mod, groups)
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
        if "Check failed" in text:  # TVM's checks: the failed condition, not the traceback around it
            first = text[text.index("Check failed"):].splitlines()[0]
        if len(first) > 300:
            first = first[:300] + " ..."
        raise CompileError(
            f"{name} failed{where}: {type(err).__name__}: {first} (this is a bug in Kiln or TVM, not in your "
            "model; `kiln ... -v` or the exception's __cause__ has the full trace)"
        ) from err


def _mentioned_operators(text: str, mod, groups) -> str:
    """' in kernel K (ops a, b)' for each kernel of ``mod`` the error text names; Relax/TIR operator
    names otherwise."""
    parts = []
    if mod is not None:
        for gv in mod.get_global_vars():
            name = gv.name_hint
            if name != "main" and re.search(rf"\b{re.escape(name)}\b", text):
                ops = (groups or {}).get(name)
                parts.append(f"kernel {name}" + (f" ({', '.join(ops)})" if ops else ""))
    if not parts:
        parts = sorted(set(re.findall(r"\b(?:relax|tirx)\.[a-z_][a-z0-9_.]*", text)))[:5]
    return f" in {'; '.join(parts[:5])}" if parts else ""
