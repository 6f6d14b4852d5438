"""Kiln: one call from a trained model to a fast, deployable module.

    import compiler
    mod = compiler.compile(torch_model, target="x86", example_inputs=(x,))
    y = mod(x.numpy())
    mod.export("model.so")
    same = compiler.load("model.so")
"""

from .errors import KilnError
from .version import __version__


def compile(model, target="x86", *, example_inputs=None, input_shapes=None, input_dtypes=None,
            tuning_logs=None, precision="fp32", calibration=None, constant_inputs=None):
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
    accumulation in matmuls and convolutions; inputs and outputs stay FP32) or ``"int8"`` (CPU and
    microcontroller targets: post-training static quantization of convolutions and matmuls, per-channel
    int8 weights, 8-bit activations calibrated by min/max, int32 accumulation; inputs and outputs stay
    FP32; see ``compiler/quantize.py`` for the scheme and the tolerance). Anything else, or a precision
    the target does not support, is a ``KilnError`` naming the choices.
    ``calibration``: required with ``precision="int8"``: a list of example input batches (NumPy
    arrays, or tuples of arrays for several inputs; a batch of N examples stacked on axis 0 is split).
    ``constant_inputs``: inputs frozen to values, e.g. ``{"sr": 16000}``: the compiled module no longer
    takes them. ONNX: each value must fit the input's dtype and shape; what depends on it folds (an
    ``If`` on a frozen condition keeps only its taken branch). ``torch.nn.Module``: the named
    ``forward`` arguments are bound to the values (Python numbers stay Python numbers, arrays become
    tensors) and ``example_inputs`` gives the other arguments, in order. An exported program already
    fixed its inputs: there it is refused. An unknown name or a value that does not fit is a
    ``KilnError`` listing the inputs.
    """
    from .driver import compile_model

    return compile_model(model, target, example_inputs=example_inputs, input_shapes=input_shapes,
                         input_dtypes=input_dtypes, tuning_logs=tuning_logs, precision=precision,
                         calibration=calibration, constant_inputs=constant_inputs)


def tune(model, target="x86", *, example_inputs=None, input_shapes=None, trials=None, time_budget=None,
         log_dir="tuning_logs", resume=True, early_stopping=None, progress=None, rpc_tracker=None, rpc_key=None,
         precision="fp32", calibration=None, constant_inputs=None):
    """Search schedules for ``model``'s kernels on ``target``; return a ``TuningReport``.

    Tasks are the fused kernels ``compile`` builds (same pipeline, so every record applies). The
    search is MetaSchedule's evolutionary search guided by an XGBoost cost model, run in batches of a
    few trials on one kernel. A task scheduler picks each batch's kernel: first every kernel gets one
    batch (warm-up), then the kernel whose next batch promises the largest end-to-end gain (calls x
    recent improvement rate of its best latency, plus an optimistic term for kernels with few trials,
    as Ansor's gradient scheduler). It stops at whichever comes first:

    * ``trials``: the total number of measured trials for this model *in the logs*, records already
      there included; no kernel takes more than half of them (or an even split, if larger). Rerunning
      an interrupted call finishes the job rather than starting over. Default: 32 per kernel when no
      ``time_budget`` is given, unlimited otherwise.
    * ``time_budget``: wall-clock budget of this call, seconds or ``"8h"``, ``"30m"``, ``"90s"``,
      ``"1h30m"``. MetaSchedule itself only counts trials, so the budget is honoured between batches:
      before each batch (one kernel's trials of a round) Kiln predicts its duration from the seconds
      per trial measured so far in this run and starts it only if it fits in what is left. A batch is
      never cut short, so a run ends up to one batch early, or late by one batch's misprediction.
    * ``early_stopping``: a number of trials; after the warm-up, stop when no batch has lowered its
      kernel's best latency by more than 1 % for that many trials. Default: when a ``time_budget`` is
      given, 64 or 8 per kernel (one more batch each), whichever is more; off otherwise; 0 turns it off.

    ``log_dir``: the tuning-log directory; records go to ``log_dir/<target fingerprint>/`` (one
    MetaSchedule JSON database per target, see ``compiler.tuning.database``) and are appended as each
    trial is measured, so Ctrl-C or ``kill -9`` loses at most the trial in flight.
    ``resume=False`` sets existing logs for this target aside (renamed) and starts over.
    ``progress``: a live display (``rich``) when True, INFO lines on the ``compiler.tuning`` logger when
    False; None (default) picks the live display when stdout is a terminal. Each batch is also
    appended to ``log_dir/<fingerprint>/progress/<model>.jsonl`` (trials, estimated latency).
    Compile with the records: ``compile(model, target, tuning_logs=log_dir)``.

    ``rpc_tracker`` (``"host:port"``) and ``rpc_key``: measure candidates on the devices registered under
    that key at a TVM RPC tracker instead of on this machine (``compiler.remote``); they are built here
    (cross-compiled for ARM targets) and timed by MetaSchedule's ``RPCRunner`` (``compiler.tuning.rpc``), one measurement worker per
    free device. This is how ARM targets are tuned; without a tracker a cross target is a ``TargetError``.

    ``precision``, ``calibration`` and ``constant_inputs``: as for :func:`compile`; tuning runs the very
    same lowering (``pipeline.lower``), so an fp16 or int8 compile finds the records an fp16 or int8
    tuning run wrote, and a compile with inputs frozen finds those of a tuning run with the same ones.
    """
    from .tuning import tune as _tune

    return _tune(model, target, example_inputs=example_inputs, input_shapes=input_shapes, trials=trials,
                 time_budget=time_budget, log_dir=log_dir, resume=resume, early_stopping=early_stopping,
                 progress=progress, rpc_tracker=rpc_tracker, rpc_key=rpc_key, precision=precision,
                 calibration=calibration, constant_inputs=constant_inputs)


def load(path, device: str = "cpu"):
    """Load a ``.so`` written by ``CompiledModule.export`` (no original model needed)."""
    from .module import load as load_module

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
