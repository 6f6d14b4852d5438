"""``compile``: from a model to a :class:`CompiledModule`, as a short list of named steps.

    check the request ─▶ pipeline.lower (import, prepare, int8 / fp16, fuse) ─▶ output specs
        ─▶ tuning records (the caller's logs, else Kiln's shipped ones) ─▶ schedule ─▶ build ─▶ metadata

Microcontroller targets leave after the check for ``compiler.mcu`` (a C library, same ``lower``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import targets
from targets import TargetDescription

from . import native_log, pipeline
from .analysis import kernel_table, memory_estimate
from .artifact import module_metadata
from .errors import TargetError
from .module import CompiledModule
from .tuning import database as logs_db
from .version import __version__

log = logging.getLogger(__name__)


def compile_model(model, target="x86", *, example_inputs=None, input_shapes=None, input_dtypes=None,
                  tuning_logs=None, precision="fp32", calibration=None, constant_inputs=None) -> CompiledModule:
    """See :func:`compiler.compile`. TVM's native log goes to the ``kiln.tvm`` logger (DEBUG)."""
    with native_log.captured():
        return _compile(model, target, example_inputs=example_inputs, input_shapes=input_shapes,
                        input_dtypes=input_dtypes, tuning_logs=tuning_logs, precision=precision,
                        calibration=calibration, constant_inputs=constant_inputs)


def _compile(model, target, *, example_inputs, input_shapes, input_dtypes, tuning_logs, precision,
             calibration, constant_inputs) -> CompiledModule:
    desc = targets.resolve(target)
    check_request(desc, precision, calibration)
    if desc.family == "mcu":  # a self-contained C library (compiler/mcu)
        from .mcu import compile_mcu

        return compile_mcu(model, desc, example_inputs=example_inputs, input_shapes=input_shapes,
                           input_dtypes=input_dtypes, tuning_logs=None if tuning_logs is False else tuning_logs,
                           precision=precision, calibration=calibration, constant_inputs=constant_inputs)
    t0 = time.perf_counter()
    lowered = pipeline.lower(model, desc, example_inputs=example_inputs, input_shapes=input_shapes,
                             input_dtypes=input_dtypes, precision=precision, calibration=calibration,
                             constant_inputs=constant_inputs)
    with pipeline.stage("lowering and fusion (fuse)", lowered.fused):
        outputs = pipeline.output_specs(lowered)
    logs, explicit = tuning_records(tuning_logs, desc)
    with pipeline.stage("scheduling", lowered.fused, lowered.groups):
        scheduled, tuned = schedule(lowered, logs)
    with pipeline.stage("code generation (build)", scheduled, lowered.groups):
        executable = build(scheduled, desc)
    kernels = kernel_table(lowered.fused, lowered.groups)
    meta = module_metadata(lowered.imported, desc, kernels)
    meta["memory"] = memory_estimate(lowered.fused)
    meta["outputs"] = [s.to_json() for s in outputs]
    meta["precision"] = precision
    if lowered.quant is not None:
        meta["quantization"] = lowered.quant.to_json()
    if logs is not None:
        meta.update(tuning_metadata(logs, explicit, kernels, tuned))
    log.info("compiled for %s in %.1f s", desc.name, time.perf_counter() - t0)
    return CompiledModule(executable, meta)


def check_request(desc: TargetDescription, precision: str, calibration) -> None:
    """Everything that can be refused before any work: the target must be buildable, the precision
    supported there, calibration given exactly for int8, nvcc present for GPU targets."""
    from . import cuda, precision as precisions, quantize

    if not desc.buildable:
        raise TargetError(
            f"target {desc.name!r} ({desc.family}) cannot be built by Kiln {__version__} yet; "
            "the x86, ARM, microcontroller and NVIDIA GPU targets can: see `kiln targets`"
        )
    precisions.check_precision(precision, desc)
    quantize.check_calibration(precision, calibration)
    if desc.family == "cuda":
        cuda.check_nvcc(desc.name)


def tuning_records(tuning_logs, desc: TargetDescription) -> tuple[Path | None, bool]:
    """The tuning-log directory to schedule from and whether the caller named it: ``tuning_logs``
    itself, or (None) Kiln's shipped records when they hold this exact target, or nothing (False)."""
    if tuning_logs is False:
        return None, False
    if tuning_logs is not None:
        return Path(tuning_logs), True
    shipped = shipped_logs(desc)
    if shipped is not None:
        log.info("using Kiln's shipped tuning records for %s (%s); tuning_logs=False to compile without",
                 desc.name, shipped)
    return shipped, False


def schedule(lowered: pipeline.Lowered, logs: Path | None):
    """The scheduled module and the kernels a tuning record scheduled (the rest get default rules)."""
    desc = lowered.target
    if logs is None:
        return pipeline.schedule(lowered.fused, desc), []
    applied, tuned = pipeline.apply_records(lowered.fused, desc, open_tuning_logs(logs, desc))
    return pipeline.schedule(applied, desc), tuned


def build(scheduled, desc: TargetDescription):
    """The VM executable (GPU targets embed nvcc-compiled device code, not CUDA source: compiler/cuda.py)."""
    from . import cuda

    with cuda.build_environment(desc.name) if desc.family == "cuda" else contextlib.nullcontext():
        return pipeline.build(scheduled, desc)


def tuning_metadata(logs: Path, explicit: bool, kernels, tuned: list[str]) -> dict:
    """What a module records of the tuning logs it was scheduled from; warns when logs the caller
    named miss some kernels."""
    untuned = sorted(k.name for k in kernels if k.name not in tuned)
    if untuned and explicit:
        log.warning("%d of %d kernels compiled without a tuning record in %s (default schedules): %s",
                    len(untuned), len(kernels), logs, ", ".join(untuned))
    return {"tuning_logs": str(logs), "tuning_logs_shipped": not explicit, "tuned_kernels": tuned,
            "untuned_kernels": untuned}


def open_tuning_logs(path, target: TargetDescription):
    """The MetaSchedule database for ``target`` under the tuning-log directory ``path``.

    A missing directory, one without records for ``target``, a ``target.json`` describing another
    target or a corrupt database is a :class:`TuningError`; a torn last line is repaired with a
    warning (see ``compiler.tuning.database``)."""
    return logs_db.open_logs(path, target, create=False).database


#: Kiln's own tuning logs (``tuning_logs/`` beside the packages): records for the zoo models on
#: the reference targets, measured on the machines Kiln is developed on (README, "Shipped tuning logs").
SHIPPED_LOGS = Path(__file__).resolve().parent.parent / "tuning_logs"


def shipped_logs(target: TargetDescription) -> Path | None:
    """:data:`SHIPPED_LOGS` when it holds records for ``target``'s exact fingerprint (same CPU model,
    features and cores), else None: records of another machine never answer this one's queries."""
    work = SHIPPED_LOGS / target.fingerprint()
    return SHIPPED_LOGS if (work / logs_db.TARGET_FILE).exists() and (work / logs_db.RECORD_FILE).exists() else None
