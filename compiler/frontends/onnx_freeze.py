"""Freeze ONNX graph inputs to constants (``compile(..., constant_inputs={"sr": 16000})``).

A static compiler cannot branch on a value it does not know, but many models take such values as
inputs: a sample rate that picks an ``If`` branch (Silero VAD), a shape, a ``k`` or a scale. Freezing
such an input turns it into an initializer, so :mod:`.onnx_fold` folds what depends on it (an ``If``
on a frozen condition is replaced by its taken branch) and the compiled module no longer takes it.

Each value is checked against the input it replaces: the name must be a graph input; the value must
be a number, a bool or an array of them that converts to the input's dtype without loss (16000.5 is
not an int64, 300 is not a uint8) and has the input's shape (a scalar fits any shape of one element:
``[]``, ``[1]``, ``[1, 1]``; symbolic dimensions take the value's size).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import InputShapeError, suggest


def freeze_inputs(model: onnx.ModelProto, constant_inputs: Mapping | None, *, other_args: Mapping | None = None) -> list[str]:
    """Replace the named graph inputs of ``model`` (in place) by initializers holding the given values;
    returns the frozen names. ``other_args`` (``{"input_shapes": {...}, ...}``) may not name them too."""
    if not constant_inputs:
        return []
    if not isinstance(constant_inputs, Mapping):
        raise InputShapeError(f"constant_inputs must be a dict of input name -> value, got "
                              f"{type(constant_inputs).__name__}")
    graph = model.graph
    inputs = {vi.name: vi for vi in graph.input}
    names = list(inputs)
    for name, value in constant_inputs.items():
        if name not in inputs:
            raise InputShapeError(
                f"constant_inputs names {name!r}, which is not an input of the model.{suggest(str(name), names)} "
                f"The model's inputs are: {', '.join(names) or '(none)'}")
        for arg, given in (other_args or {}).items():
            if given and name in given:
                raise InputShapeError(f"input {name!r} is both in constant_inputs and in {arg}: a frozen input "
                                      f"takes its shape and dtype from the model; drop it from {arg}")
    frozen = []
    for name, value in constant_inputs.items():
        graph.initializer.append(numpy_helper.from_array(_value(name, value, inputs[name]), name))
        frozen.append(name)
    kept = [vi for vi in graph.input if vi.name not in constant_inputs]
    del graph.input[:]
    graph.input.extend(kept)
    return frozen


def _value(name: str, value, info: onnx.ValueInfoProto) -> np.ndarray:
    """``value`` as an array of the input's dtype and shape, or an InputShapeError saying why not."""
    if not info.type.HasField("tensor_type"):
        raise InputShapeError(f"constant_inputs[{name!r}]: input {name!r} is not a tensor; only tensor inputs "
                              "can be frozen")
    elem = info.type.tensor_type.elem_type
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    except Exception as err:  # noqa: BLE001 - bfloat16, float8, strings: no exact NumPy dtype to check against
        raise InputShapeError(f"constant_inputs[{name!r}]: Kiln cannot freeze an input of ONNX type "
                              f"{onnx.TensorProto.DataType.Name(elem)}") from err
    if dtype.kind not in "biuf":
        raise InputShapeError(f"constant_inputs[{name!r}]: Kiln cannot freeze an input of dtype {dtype.name}")
    array = _as_array(name, value, dtype)
    converted = _convert(name, array, dtype)
    return _fit_shape(name, converted, info)


def _as_array(name: str, value, dtype: np.dtype) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except Exception as err:  # noqa: BLE001 - ragged lists and other things NumPy refuses
        raise InputShapeError(f"constant_inputs[{name!r}] = {value!r} is not a number or an array") from err
    if array.dtype == object and all(isinstance(v, int) for v in array.reshape(-1).tolist()):
        raise InputShapeError(f"constant_inputs[{name!r}] = {value!r} does not fit the input's dtype {dtype.name}")
    if array.dtype.kind not in "biuf":
        raise InputShapeError(f"constant_inputs[{name!r}] = {value!r} is not a number, a bool or an array of them")
    return array


def _convert(name: str, array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``array`` in ``dtype``; refuses a conversion that changes a value (fractions or out-of-range
    numbers to integers, numbers other than 0 and 1 to bool)."""
    shown = array.tolist() if array.size <= 8 else f"an array of shape {array.shape}"
    if dtype.kind == "f":
        if array.dtype.kind == "f" and np.any(np.isfinite(array) & (np.abs(array) > np.finfo(dtype).max)):
            raise InputShapeError(f"constant_inputs[{name!r}] = {shown} does not fit the input's dtype {dtype.name}")
        return array.astype(dtype)
    values = array.astype(np.float64) if array.dtype.kind == "f" else array
    if dtype.kind == "b":
        ok = bool(np.all((values == 0) | (values == 1)))
    else:
        info = np.iinfo(dtype)
        ok = bool(np.all(np.isfinite(values) & (values == np.round(values)) & (values >= info.min)
                         & (values <= info.max))) if values.dtype.kind == "f" else \
            bool(np.all((values >= info.min) & (values <= info.max)))
    if not ok:
        raise InputShapeError(f"constant_inputs[{name!r}] = {shown} does not fit the input's dtype {dtype.name}"
                              + ("" if dtype.kind == "b" else f" (integers from {info.min} to {info.max})"))
    return array.astype(dtype)


def _fit_shape(name: str, array: np.ndarray, info: onnx.ValueInfoProto) -> np.ndarray:
    ttype = info.type.tensor_type
    if not ttype.HasField("shape"):
        return array  # unknown rank: the value gives the shape
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in ttype.shape.dim]
    declared = "(" + ", ".join(str(d) if d is not None else (dim.dim_param or "?")
                               for d, dim in zip(dims, ttype.shape.dim)) + ")"
    if array.size == 1 and all(d in (None, 1) for d in dims):
        return array.reshape([1] * len(dims))
    if array.ndim == len(dims) and all(d is None or d == s for d, s in zip(dims, array.shape)):
        return array
    raise InputShapeError(f"constant_inputs[{name!r}] has shape {tuple(array.shape)}, but input {name!r} has "
                          f"shape {declared}")
