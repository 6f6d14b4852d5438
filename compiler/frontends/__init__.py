"""Frontends: turn a trained model into a Relax IRModule with its weights bound as constants.

Each frontend returns an :class:`ImportedModel`; everything after import is frontend-independent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm


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
