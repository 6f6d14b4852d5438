"""Frontends: turn a trained model into a Relax IRModule with its weights bound as constants.

Each frontend returns an :class:`ImportedModel`; everything after import is frontend-independent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import tvm

from ..errors import ModelFormatError


@dataclass(frozen=True)
class TensorSpec:
    """Name, static shape and dtype of one model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], tuple(int(x) for x in d["shape"]), d["dtype"])


@dataclass
class ImportedModel:
    """A Relax module whose ``main`` takes the model inputs in order; weights are constants."""

    mod: tvm.IRModule
    inputs: list[TensorSpec]
    output_names: list[str] = field(default_factory=list)
    source: str = ""  # "torch", "onnx"
    #: Trainable parameter count as the source framework counts it (torch: ``parameters()``;
    #: ONNX: elements of floating-point initializers), before Kiln folds anything.
    num_params: int = 0


def import_model(model, *, example_inputs=None, input_shapes=None, input_dtypes=None,
                 constant_inputs=None) -> ImportedModel:
    """Dispatch on the kind of ``model``: torch module, exported program, ONNX path/proto, ``zoo:NAME``.
    ``constant_inputs`` freezes ONNX graph inputs (:mod:`.onnx_freeze`) or binds ``forward`` arguments
    of a ``torch.nn.Module`` (:func:`.torch.bind_constants`); exported programs are refused."""
    import torch

    from . import torch as torch_frontend

    if isinstance(model, (str, os.PathLike)) and str(model).startswith("zoo:"):
        from .. import zoo

        model, zoo_inputs = zoo.load(str(model)[4:])
        example_inputs = example_inputs if example_inputs is not None else zoo_inputs
    if isinstance(model, torch.export.ExportedProgram):
        torch_frontend.refuse_constants_for_program(constant_inputs)
        return torch_frontend.import_exported(model)
    if isinstance(model, torch.nn.Module):
        if constant_inputs:
            model, example_inputs = torch_frontend.bind_constants(model, example_inputs, constant_inputs)
        return torch_frontend.import_module(model, example_inputs)
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.exists():
            raise ModelFormatError(f"model file not found: {path}")
        if path.suffix in (".pt2", ".ep"):
            from . import pt2

            torch_frontend.refuse_constants_for_program(constant_inputs)
            return torch_frontend.import_exported(pt2.load(path))
    from .onnx import import_onnx

    try:
        import onnx
    except ImportError:  # pragma: no cover
        onnx = None
    if isinstance(model, (str, os.PathLike)) or (onnx is not None and isinstance(model, onnx.ModelProto)):
        return import_onnx(model, input_shapes=input_shapes, input_dtypes=input_dtypes,
                           constant_inputs=constant_inputs)
    raise ModelFormatError(
        f"cannot compile a {type(model).__name__}: pass a torch.nn.Module (with example_inputs), a "
        "torch.export.ExportedProgram, an ONNX file path or onnx.ModelProto, or 'zoo:NAME'"
    )
