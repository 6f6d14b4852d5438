"""Kiln's pass pipeline, as named steps shared by every entry point.

    model ──import──▶ Relax ──prepare──▶ graph-optimised Relax ──[int8 quantize | fp16]──▶
          ──fuse──▶ fused TIR kernels ──schedule──▶ scheduled kernels ──build──▶ executable

:func:`lower` runs the front half (import to fuse) and is the one function compile, tune, the
microcontroller path and ``kiln info`` call: tuning extracts its tasks from the kernels ``lower``
returns and compiling applies records to those very kernels, so the structural hashes MetaSchedule
keys its records by always match (docs/design.md). ``prepare`` and ``fuse`` are deterministic
functions of (module, target).
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass

import tvm
from tvm import relax

from targets import TargetDescription

from . import conv_transpose, graph_passes
from .errors import CompileError, InputShapeError, KilnError
from .frontends import ImportedModel, TensorSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lowered:
    """What :func:`lower` returns: the ``target``, the ``imported`` model, the graph-optimised module
    (``prepared``: before int8 quantization, after fp16 mixed precision), the ``precision``, the
    quantization report (``quant``: int8 only), and the ``fused`` module whose PrimFuncs are the
    kernels, with ``groups``: each kernel's operator names."""

    target: TargetDescription
    imported: ImportedModel
    prepared: tvm.IRModule
    precision: str
    quant: object | None
    fused: tvm.IRModule
    groups: dict[str, tuple[str, ...]]


def lower(model, target, *, example_inputs=None, input_shapes=None, input_dtypes=None, precision: str = "fp32",
          calibration=None, constant_inputs=None) -> Lowered:
    """Import ``model`` and run it through prepare, quantization or mixed precision, and fuse for
    ``target`` (a :class:`TargetDescription`); each step is a :func:`stage`, so a failure is a
    :class:`CompileError` naming it. Installs Kiln's TVM hooks first (``schedules.install_hooks``).
    ``model`` and the keywords are those of :func:`compiler.compile`."""
    import schedules

    from . import precision as precisions
    from . import quantize
    from .frontends import import_model

    precisions.check_precision(precision, target)
    quantize.check_calibration(precision, calibration)
    schedules.install_hooks()
    with stage("import"):
        imported = import_model(model, example_inputs=example_inputs, input_shapes=input_shapes,
                                input_dtypes=input_dtypes, constant_inputs=constant_inputs)
    if target.family == "mcu":
        for spec in imported.inputs:
            if not all(isinstance(d, int) for d in spec.shape):
                raise InputShapeError(f"input {spec.name!r} has a dynamic shape {list(spec.shape)}: microcontroller "
                                      "builds need static shapes; fix it with input_shapes={...} / --input-shape")
    with stage("graph optimisation (prepare)", imported.mod):
        prepared = precisions.mixed_precision(prepare(imported.mod, target), precision)
    quantized, quant = prepared, None
    if precision == "int8":  # post-training static quantization (compiler/quantize.py)
        if target.family != "mcu":
            log.warning("precision='int8' on %s: the weights shrink 4x and the outputs stay within the stated "
                        "tolerance, but Kiln has no int8 (VNNI / dot-product) CPU schedules yet, so int8 kernels "
                        "run slower than fp32 ones (ResNet-18 on x86: about 2.3x); use fp32 for speed", target.name)
        with stage("int8 quantization", prepared):
            quantized, quant = quantize.quantize(prepared, calibration, imported.inputs)
    with stage("lowering and fusion (fuse)", quantized):
        fused, groups = fuse(quantized, target)
    return Lowered(target, imported, prepared, precision, quant, fused, groups)


def output_specs(lowered: Lowered) -> list[TensorSpec]:
    """The static shape and dtype of every output of the fused module; an output whose shape depends
    on the input data (NonZero, Unique, a Slice by computed bounds...) is a CompileError naming it."""
    ret = lowered.fused["main"].ret_ty
    names = lowered.imported.output_names
    infos = list(ret.fields) if hasattr(ret, "fields") else [ret]
    specs, dynamic = [], []
    for i, info in enumerate(infos):
        name = names[i] if i < len(names) else f"output_{i}"
        shape = getattr(info, "shape", None)
        values = getattr(shape, "values", shape)
        try:
            specs.append(TensorSpec(name, tuple(int(d) for d in values), str(info.dtype)))
        except (TypeError, ValueError, AttributeError):
            dynamic.append(name)
    if dynamic:
        raise CompileError(
            f"the shape of output(s) {', '.join(map(repr, dynamic))} depends on the input data (NonZero, Unique, "
            "Compress, or a Slice/Expand/Tile by computed amounts produce such shapes); Kiln compiles static "
            "shapes: freeze the inputs those amounts come from, or compute that part outside the model")
    return specs


def prepare(mod: tvm.IRModule, target: TargetDescription) -> tvm.IRModule:
    """Graph-level optimisation on Relax: inference decompositions, constant folding, BatchNorm and
    per-channel affine folding into convolutions, and the target's preferred data layouts. Expects
    ``schedules.install_hooks()`` to have run (:func:`lower` runs it)."""
    import schedules

    steps = [graph_passes.HalfComputeInFloat] if target.family in ("x86", "arm") else []
    steps += [
        relax.transform.DecomposeOpsForInference(),
        graph_passes.StackAsConcat,
        graph_passes.NonNegativeSqueezeAxes,
        relax.transform.CanonicalizeBindings(),
        relax.transform.FoldConstant(),
        graph_passes.FoldAffineIntoConv,
        relax.transform.FoldConstant(),
        graph_passes.PReLUFromWhere,
        relax.transform.DeadCodeElimination(),
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
        if target.family in ("x86", "arm"):  # transposed convolutions as convolutions (compiler/conv_transpose.py)
            mod = conv_transpose.TransposedConvAsConv(mod)
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
    ``compiler.tuning.search.extract_tasks`` tunes under, and marks what it scheduled ``tirx.is_scheduled``."""
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
    legalisation: ``fuse`` and ``schedule`` already did that (after :func:`lower`, whose hooks the
    vector-math lowerings need). CUDA builds need
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
