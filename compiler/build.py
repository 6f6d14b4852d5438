"""From a model to a :class:`CompiledModule`: import, run the pipeline, collect metadata."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import targets
from targets import TargetDescription

from . import __version__, pipeline
from .analysis import kernel_table
from .errors import CompileError, IncompatibleModuleError, ModelFormatError, TargetError
from .frontends import ImportedModel, TensorSpec
from .module import CompiledModule

log = logging.getLogger(__name__)


def resolve_target(target) -> TargetDescription:
    """A target name (or alias), a :class:`TargetDescription`, or an LLVM ``tvm.target.Target``."""
    if isinstance(target, TargetDescription):
        return target
    if isinstance(target, str):
        return targets.get(target)
    try:
        import tvm

        if isinstance(target, tvm.target.Target) and target.kind.name == "llvm":
            import dataclasses

            return dataclasses.replace(
                targets.get("x86"), name=f"llvm-{target.attrs.get('mcpu', 'generic')}",
                cpu=str(target.attrs.get("mcpu", "")) or targets.get("x86").cpu, host=False,
            )
    except ImportError:  # pragma: no cover
        pass
    raise TargetError(f"target must be a name from `kiln targets` or a TargetDescription, not {target!r}")


def buildable(desc: TargetDescription) -> bool:
    """True when this Kiln version can compile for ``desc`` (x86, ARM Linux by cross-compiling,
    microcontrollers as C, NVIDIA GPUs with nvcc)."""
    return ((desc.family in ("x86", "arm") and desc.kind == "llvm") or (desc.family == "mcu" and desc.kind == "c")
            or (desc.family == "cuda" and desc.kind == "cuda"))


def import_model(model, *, example_inputs=None, input_shapes=None, input_dtypes=None) -> ImportedModel:
    """Dispatch on the kind of ``model``: torch module, exported program, ONNX path/proto, ``zoo:NAME``."""
    import torch

    from .frontends import torch as torch_frontend

    if isinstance(model, (str, os.PathLike)) and str(model).startswith("zoo:"):
        from . import zoo

        model, zoo_inputs = zoo.load(str(model)[4:])
        example_inputs = example_inputs if example_inputs is not None else zoo_inputs
    if isinstance(model, torch.export.ExportedProgram):
        return torch_frontend.import_exported(model)
    if isinstance(model, torch.nn.Module):
        return torch_frontend.import_module(model, example_inputs)
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.exists():
            raise ModelFormatError(f"model file not found: {path}")
        if path.suffix in (".pt2", ".ep"):
            try:
                program = torch.export.load(str(path))
            except Exception as err:
                raise ModelFormatError(f"cannot read exported program {path}: {err}") from err
            return torch_frontend.import_exported(program)
    from .frontends.onnx import import_onnx

    try:
        import onnx
    except ImportError:  # pragma: no cover
        onnx = None
    if isinstance(model, (str, os.PathLike)) or (onnx is not None and isinstance(model, onnx.ModelProto)):
        return import_onnx(model, input_shapes=input_shapes, input_dtypes=input_dtypes)
    raise ModelFormatError(
        f"cannot compile a {type(model).__name__}: pass a torch.nn.Module (with example_inputs), a "
        "torch.export.ExportedProgram, an ONNX file path or onnx.ModelProto, or 'zoo:NAME'"
    )


def _output_specs(fused, names: list[str]) -> list[TensorSpec]:
    """The static shape and dtype of every output; an output whose shape depends on the input data
    (NonZero, Unique, a Slice by computed bounds...) is a CompileError naming it."""
    ret = fused["main"].ret_ty
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


def open_tuning_logs(path, target: TargetDescription):
    """The MetaSchedule database for ``target`` under the tuning-log directory ``path``.

    A missing directory, one without records for ``target``, a ``target.json`` describing another
    target or a corrupt database is a :class:`TuningError`; a torn last line is repaired with a
    warning (see ``schedules.database``)."""
    from schedules import database as logs_db

    return logs_db.open_logs(path, target, create=False).database


#: Kiln's own tuning logs (``tuning_logs/`` beside the packages): records for the zoo models on
#: the reference targets, measured on the machines Kiln is developed on (README, "Shipped tuning logs").
SHIPPED_LOGS = Path(__file__).resolve().parent.parent / "tuning_logs"


def shipped_logs(target: TargetDescription) -> Path | None:
    """:data:`SHIPPED_LOGS` when it holds records for ``target``'s exact fingerprint (same CPU model,
    features and cores), else None: records of another machine never answer this one's queries."""
    from schedules import database as logs_db

    work = SHIPPED_LOGS / target.fingerprint()
    return SHIPPED_LOGS if (work / logs_db.TARGET_FILE).exists() and (work / logs_db.RECORD_FILE).exists() else None


def module_metadata(imported: ImportedModel, desc: TargetDescription, kernels) -> dict:
    """The metadata every compiled artifact carries (a .so's embedded JSON, an MCU library's
    kiln.json): format, Kiln version, target, inputs, fused kernels, parameters, FLOPs."""
    return {
        "format": 1,
        "kiln_version": __version__,
        "target": desc.to_json(),
        "target_fingerprint": desc.fingerprint(),
        "source": imported.source,
        "inputs": [s.to_json() for s in imported.inputs],
        "kernels": [k.to_json() for k in kernels],
        "params": imported.num_params,
        "flops": sum(k.flops for k in kernels),
    }


def compile_model(model, target="x86", *, example_inputs=None, input_shapes=None, input_dtypes=None,
                  tuning_logs=None, precision="fp32", calibration=None) -> CompiledModule:
    """See :func:`compiler.compile`."""
    from . import cuda, precision as precisions, quantize

    desc = resolve_target(target)
    precisions.check_precision(precision, desc)
    quantize.check_calibration(precision, calibration)  # before any work
    if desc.family == "cuda":
        cuda.check_nvcc(desc.name)  # before any work: a missing nvcc is a clear TargetError
    if desc.family == "mcu" and buildable(desc):  # a self-contained C library (compiler/mcu)
        from .mcu import compile_mcu

        return compile_mcu(model, desc, example_inputs=example_inputs, input_shapes=input_shapes,
                           input_dtypes=input_dtypes, tuning_logs=None if tuning_logs is False else tuning_logs,
                           precision=precision, calibration=calibration)
    if not buildable(desc):
        raise TargetError(
            f"target {desc.name!r} ({desc.family}) cannot be built by Kiln {__version__} yet; "
            "the x86, ARM, microcontroller and NVIDIA GPU targets can: see `kiln targets`"
        )
    t0 = time.perf_counter()
    with pipeline.stage("import"):
        imported = import_model(model, example_inputs=example_inputs, input_shapes=input_shapes,
                                input_dtypes=input_dtypes)
    with pipeline.stage("graph optimisation (prepare)", imported.mod):
        prepared = precisions.mixed_precision(pipeline.prepare(imported.mod, desc), precision)
    quant = None
    if precision == "int8":  # post-training static quantization (compiler/quantize.py)
        log.warning("precision='int8' on %s: the weights shrink 4x and the outputs stay within the stated "
                    "tolerance, but Kiln has no int8 (VNNI / dot-product) CPU schedules yet, so int8 kernels "
                    "run slower than fp32 ones (ResNet-18 on x86: about 2.3x); use fp32 for speed", desc.name)
        with pipeline.stage("int8 quantization", prepared):
            prepared, quant = quantize.quantize(prepared, calibration, imported.inputs)
    with pipeline.stage("lowering and fusion (fuse)", prepared):
        fused, groups = pipeline.fuse(prepared, desc)
        outputs = _output_specs(fused, imported.output_names)
    tuned: list[str] = []
    explicit_logs = tuning_logs not in (None, False)
    if tuning_logs is None:  # Kiln's shipped records for this exact target, if it has any
        tuning_logs = shipped_logs(desc)
        if tuning_logs is not None:
            log.info("using Kiln's shipped tuning records for %s (%s); tuning_logs=False to compile without",
                     desc.name, tuning_logs)
    elif tuning_logs is False:
        tuning_logs = None
    with pipeline.stage("scheduling", fused, groups):
        if tuning_logs is not None:
            applied, tuned = pipeline.apply_records(fused, desc, open_tuning_logs(tuning_logs, desc))
            scheduled = pipeline.schedule(applied, desc)
        else:
            scheduled = pipeline.schedule(fused, desc)
    # CUDA: nvcc-compiled device code is embedded, not CUDA source (compiler/cuda.py)
    with cuda.build_environment(desc.name) if desc.family == "cuda" else contextlib.nullcontext(), \
            pipeline.stage("code generation (build)", scheduled, groups):
        executable = pipeline.build(scheduled, desc)
    kernels = kernel_table(fused, groups)
    meta = module_metadata(imported, desc, kernels)
    meta["outputs"] = [s.to_json() for s in outputs]
    meta["precision"] = precision
    if quant is not None:
        meta["quantization"] = quant.to_json()
    if tuning_logs is not None:
        untuned = sorted(k.name for k in kernels if k.name not in tuned)
        meta["tuning_logs"] = str(tuning_logs)
        meta["tuning_logs_shipped"] = not explicit_logs
        meta["tuned_kernels"] = tuned
        meta["untuned_kernels"] = untuned
        if untuned and explicit_logs:
            log.warning("%d of %d kernels compiled without a tuning record in %s (default schedules): %s",
                        len(untuned), len(kernels), tuning_logs, ", ".join(untuned))
    log.info("compiled for %s in %.1f s", desc.name, time.perf_counter() - t0)
    return CompiledModule(executable, meta)


def export_compiler(target: TargetDescription):
    """The ``fcompile`` used to link an exported library for ``target`` (None: the host compiler)."""
    if target.cross_compiler:
        from tvm.support import cc

        check_cross_compiler(target)
        return cc.cross_compiler(target.cross_compiler, options=[])  # a fresh list: cc appends to it
    return None


def check_cross_compiler(target: TargetDescription) -> None:
    """A clear TargetError naming the package to install when ``target``'s cross compiler is missing."""
    import shutil

    if not target.cross_compiler or shutil.which(target.cross_compiler):
        return
    prefix, sep, tool = target.cross_compiler.rpartition("-")
    package = f"{tool}-{prefix}" if sep and tool in ("g++", "gcc", "c++") else target.cross_compiler
    script = {"arm": "scripts/setup_arm.sh, which installs the ARM cross toolchains and the emulated aarch64 "
                     "device", "mcu": "scripts/setup_mcu.sh"}.get(target.family)
    raise TargetError(
        f"the cross compiler {target.cross_compiler!r} for target {target.name!r} is not installed (not on "
        f"PATH): install it with `apt-get install {package}`" + (f", or run {script}" if script else "")
    )


def load_module(path, device: str = "cpu") -> CompiledModule:
    """See :func:`compiler.load`."""
    import platform

    import tvm

    from . import artifact

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
    if meta.get("format") != artifact.FORMAT_VERSION or _minor(meta.get("kiln_version", "")) != _minor(__version__):
        raise IncompatibleModuleError(
            f"{path} was written by Kiln {meta.get('kiln_version', '?')} (metadata format "
            f"{meta.get('format', '?')}); this is Kiln {__version__}: recompile the model"
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
        lib = tvm.runtime.load_module(str(path))
    except Exception as err:
        raise IncompatibleModuleError(f"cannot load {path}: {err}") from err
    return CompiledModule(lib, meta, device=device)


def _minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])
