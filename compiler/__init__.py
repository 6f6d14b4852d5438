"""Kiln: one call from a trained model to a fast, deployable module.

    import compiler
    mod = compiler.compile(torch_model, target="x86", example_inputs=(x,))
    y = mod(x.numpy())
    mod.export("model.so")
    same = compiler.load("model.so")
"""

__version__ = "0.1.0"

from .errors import KilnError  # noqa: E402


def compile(model, target="x86", *, example_inputs=None, input_shapes=None, input_dtypes=None,
            tuning_logs=None, precision="fp32"):
    """Compile ``model`` for ``target`` and return a :class:`CompiledModule`.

    ``model``: a ``torch.nn.Module`` (with ``example_inputs``), a ``torch.export.ExportedProgram``,
    an ONNX file path or ``onnx.ModelProto`` (``input_shapes={"name": (1, 3, 224, 224)}`` when it
    has symbolic dimensions, ``input_dtypes`` to override), or ``"zoo:NAME"``.
    ``target``: a name from ``kiln targets`` (``"x86"`` is this machine) or a ``TargetDescription``.
    ``tuning_logs``: a tuning-log directory written by :func:`tune`; the best record of each kernel
    for this target is applied, every other kernel gets Kiln's default schedule (a warning lists
    them; ``CompiledModule.meta`` gets ``tuned_kernels`` and ``untuned_kernels``). A missing
    directory, or one with no records for this target, is a ``TuningError``.
    ``precision``: ``"fp32"`` (default) or ``"fp16"`` (NVIDIA GPU targets: FP16 compute with FP32
    accumulation in matmuls and convolutions; inputs and outputs stay FP32). Anything else, or fp16
    on a CPU target, is a ``KilnError`` naming the choices.
    """
    from .build import compile_model

    return compile_model(model, target, example_inputs=example_inputs, input_shapes=input_shapes,
                         input_dtypes=input_dtypes, tuning_logs=tuning_logs, precision=precision)


def tune(model, target="x86", *, example_inputs=None, input_shapes=None, trials=None, time_budget=None,
         log_dir="tuning_logs", resume=True):
    """Search schedules for ``model``'s kernels on ``target``; return a ``TuningReport``.

    Tasks are the fused kernels ``compile`` builds (same pipeline, so every record applies). The
    search is MetaSchedule's evolutionary search guided by an XGBoost cost model, run in rounds of a
    few trials per kernel, the kernels weighing most on the end-to-end latency first, and stops at
    whichever comes first:

    * ``trials``: the total number of measured trials for this model *in the logs*, records already
      there included, split evenly over the kernels. Rerunning an interrupted call finishes the job
      rather than starting over; kernels whose records already reach their share get no new trials.
      Default: 32 per kernel when no ``time_budget`` is given, unlimited otherwise.
    * ``time_budget``: wall-clock budget of this call, seconds or ``"8h"``, ``"30m"``, ``"90s"``,
      ``"1h30m"``. MetaSchedule itself only counts trials, so the budget is honoured between batches:
      before each batch (one kernel's trials of a round) Kiln predicts its duration from the seconds
      per trial measured so far in this run and starts it only if it fits in what is left. A batch is
      never cut short, so a run ends up to one batch early, or late by one batch's misprediction.

    ``log_dir``: the tuning-log directory; records go to ``log_dir/<target fingerprint>/`` (one
    MetaSchedule JSON database per target, see ``schedules.database``) and are appended as each
    trial is measured, so Ctrl-C or ``kill -9`` loses at most the trial in flight.
    ``resume=False`` sets existing logs for this target aside (renamed) and starts over.
    Progress (one line per round) is logged at INFO level on the ``compiler.tuning`` logger.
    Compile with the records: ``compile(model, target, tuning_logs=log_dir)``.
    """
    from .tuning import tune as _tune

    return _tune(model, target, example_inputs=example_inputs, input_shapes=input_shapes, trials=trials,
                 time_budget=time_budget, log_dir=log_dir, resume=resume)


def load(path, device: str = "cpu"):
    """Load a ``.so`` written by ``CompiledModule.export`` (no original model needed)."""
    from .build import load_module

    return load_module(path, device=device)


def __getattr__(name):  # lazy: importing compiler must not import TVM or torch
    if name == "CompiledModule":
        from .module import CompiledModule

        return CompiledModule
    if name == "TargetDescription":
        from targets import TargetDescription

        return TargetDescription
    if name == "zoo":
        import importlib

        return importlib.import_module(".zoo", __name__)
    raise AttributeError(f"module 'compiler' has no attribute {name!r}")


__all__ = ["compile", "tune", "load", "KilnError", "CompiledModule", "TargetDescription", "zoo", "__version__"]
