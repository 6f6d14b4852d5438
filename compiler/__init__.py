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
            tuning_logs=None):
    """Compile ``model`` for ``target`` and return a :class:`CompiledModule`.

    ``model``: a ``torch.nn.Module`` (with ``example_inputs``), a ``torch.export.ExportedProgram``,
    an ONNX file path or ``onnx.ModelProto`` (``input_shapes={"name": (1, 3, 224, 224)}`` when it
    has symbolic dimensions, ``input_dtypes`` to override), or ``"zoo:NAME"``.
    ``target``: a name from ``kiln targets`` (``"x86"`` is this machine) or a ``TargetDescription``.
    ``tuning_logs``: a tuning-log directory; records for this target are applied, every other
    kernel gets Kiln's default schedule.
    """
    from .build import compile_model

    return compile_model(model, target, example_inputs=example_inputs, input_shapes=input_shapes,
                         input_dtypes=input_dtypes, tuning_logs=tuning_logs)


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


__all__ = ["compile", "load", "KilnError", "CompiledModule", "TargetDescription", "zoo", "__version__"]
