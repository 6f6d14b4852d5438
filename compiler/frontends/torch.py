"""PyTorch frontend: ``torch.nn.Module`` (with example inputs) or ``torch.export.ExportedProgram``."""

from __future__ import annotations

import logging
import re
import warnings
from typing import Sequence

import numpy as np

from ..errors import CompileError, InputShapeError, ModelFormatError, UnsupportedOperatorError, suggest
from . import ImportedModel, TensorSpec

log = logging.getLogger(__name__)


def _dtype_name(t) -> str:
    return str(t.dtype).replace("torch.", "")


def export_module(model, example_inputs: Sequence | None):
    """``torch.export`` a module in eval mode; example inputs are required."""
    import torch

    if example_inputs is None:
        raise InputShapeError(
            "a torch.nn.Module needs example_inputs (a tuple of tensors with the shapes to compile for), "
            "e.g. compile(model, example_inputs=(torch.randn(1, 3, 224, 224),))"
        )
    if isinstance(example_inputs, (torch.Tensor, np.ndarray)):
        example_inputs = (example_inputs,)
    args = tuple(torch.as_tensor(a) for a in example_inputs)
    model = model.eval()
    try:
        with torch.no_grad():
            return torch.export.export(model, args)
    except Exception as err:  # torch raises many types; name the model and the cause
        raise ModelFormatError(f"torch.export failed for {type(model).__name__}: {err}") from err


def import_exported(program) -> ImportedModel:
    """Import an ``ExportedProgram``; weights become constants of the Relax module."""
    from tvm.relax.frontend.torch import from_exported_program

    user_inputs = program.graph_signature.user_inputs
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    inputs = []
    for name in user_inputs:
        val = placeholders[name].meta.get("val")
        if val is None or not hasattr(val, "shape"):
            raise InputShapeError(f"exported program input {name!r} is not a tensor")
        try:
            shape = tuple(int(d) for d in val.shape)
        except TypeError as err:
            raise InputShapeError(
                f"input {name!r} has a dynamic shape {tuple(val.shape)}; Kiln compiles static shapes: "
                "export with concrete example inputs and no dynamic_shapes"
            ) from err
        inputs.append(TensorSpec(name, shape, _dtype_name(val)))
    # Decompose here (TVM would do it inside) so that the graph Kiln inspects is the one TVM converts:
    # negative ``select`` indices are normalised below, and unsupported ops are found by node name.
    with warnings.catch_warnings():  # torch's own deprecation notices about its pytree internals
        warnings.filterwarnings("ignore", category=FutureWarning)
        program = program.run_decompositions()
    _normalize_negative_selects(program)
    try:
        mod = from_exported_program(program, keep_params_as_input=False, run_ep_decomposition=False)
    except AssertionError as err:
        ops = re.findall(r"'([\w.]+)'", str(err))
        if "Unsupported function" in str(err) and ops:
            nodes = {
                op: [n.name for n in program.graph.nodes if n.op == "call_function" and str(n.target).endswith(op)]
                for op in ops
            }
            raise UnsupportedOperatorError(
                [(op, name) for op in ops for name in (nodes[op] or [""])], frontend="PyTorch"
            ) from err
        raise CompileError(f"PyTorch import failed: {err}") from err
    except Exception as err:
        raise CompileError(f"PyTorch import failed: {type(err).__name__}: {err}") from err
    outputs = [s.arg.name for s in program.graph_signature.output_specs]
    num_params = sum(int(p.numel()) for p in program.parameters())
    return ImportedModel(mod, inputs, outputs, source="torch", num_params=num_params)


def _normalize_negative_selects(program) -> None:
    """``x[:, -1]`` exports as ``aten.select.int(x, 1, -1)``, which TVM 0.27 converts to
    ``take(x, -1, mode="fast")``: an out-of-bounds read that silently returns garbage. Rewrite
    negative indices to ``index + size`` (``program`` is Kiln's own decomposed copy)."""
    import torch

    for node in program.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.select.int:
            continue
        src, dim, index = node.args[:3]
        val = getattr(src, "meta", {}).get("val")
        if isinstance(index, int) and index < 0 and val is not None:
            size = val.shape[dim]
            if isinstance(size, int):
                node.args = (src, dim, index + size, *node.args[3:])


def import_module(model, example_inputs) -> ImportedModel:
    """Export ``model`` with ``example_inputs`` and import the program."""
    return import_exported(export_module(model, example_inputs))


# ---------------------------------------------------------------- constant inputs


def refuse_constants_for_program(constant_inputs) -> None:
    """An exported program fixed its inputs when it was exported: ``constant_inputs`` cannot apply."""
    if constant_inputs:
        raise InputShapeError(
            f"constant_inputs ({', '.join(map(repr, constant_inputs))}) cannot apply to an exported program: "
            "torch.export fixed its inputs already. Pass the torch.nn.Module itself with constant_inputs, or "
            "bind the values before exporting")


def bind_constants(model, example_inputs, constant_inputs) -> tuple:
    """A module whose ``forward`` takes the arguments of ``model.forward`` that ``constant_inputs``
    does not name, in their order and under their names, and calls ``model`` with the constants; and
    the example inputs for it. ``example_inputs`` may list every argument of ``forward`` (the frozen
    ones are dropped) or only the others. Python numbers stay Python numbers (``torch.export``
    specialises on them, as ``if sr == 16000`` needs); arrays become tensors."""
    import inspect

    import torch

    if not hasattr(constant_inputs, "items"):
        raise InputShapeError(f"constant_inputs must be a dict of argument name -> value, got "
                              f"{type(constant_inputs).__name__}")
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    names = [p.name for p in params]
    for name in constant_inputs:
        if name not in names:
            raise InputShapeError(
                f"constant_inputs names {name!r}, which is not an argument of {type(model).__name__}.forward."
                f"{suggest(str(name), names)} Its arguments are: {', '.join(names) or '(none)'}")
    values = {name: _constant_value(name, value) for name, value in constant_inputs.items()}
    free = [p for p in params if p.name not in values]
    if example_inputs is not None:
        if isinstance(example_inputs, (torch.Tensor, np.ndarray)):
            example_inputs = (example_inputs,)
        example_inputs = tuple(example_inputs)
        if len(example_inputs) == len(params) and len(params) != len(free):
            example_inputs = tuple(x for x, p in zip(example_inputs, params) if p.name not in values)
        elif len(example_inputs) != len(free):
            raise InputShapeError(
                f"example_inputs has {len(example_inputs)} value(s); with constant_inputs "
                f"{', '.join(map(repr, values))} {type(model).__name__}.forward takes {len(free)}: "
                f"{', '.join(p.name for p in free) or '(none)'}")
    return _Bound(model, [p.name for p in free], values), example_inputs


def _constant_value(name: str, value):
    import torch

    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        array = np.asarray(value)
    except Exception:  # noqa: BLE001 - ragged lists and other things NumPy refuses
        array = None
    if array is None or array.dtype.kind not in "biuf":
        raise InputShapeError(f"constant_inputs[{name!r}] = {value!r} is not a number, a bool or an array of them")
    return torch.from_numpy(np.ascontiguousarray(array))


def _Bound(model, free: list[str], values: dict):
    """``model`` with some ``forward`` arguments bound; the signature of ``forward`` names the others,
    so the exported program's inputs keep their names."""
    import inspect

    import torch

    class Bound(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *args):
            return self.model(**dict(zip(free, args)), **values)

    Bound.__name__ = Bound.__qualname__ = f"{type(model).__name__}WithConstants"
    Bound.forward.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in free])
    return Bound()
