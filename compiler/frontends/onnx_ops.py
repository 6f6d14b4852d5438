"""Kiln's converters for ONNX operators whose TVM 0.27 converter computes something else.

Each one was a silent wrong answer in ONNX's conformance collection (``scripts/onnx_conformance.py``):
an attribute ignored, an output faked. ``onnx._TrackingImporter`` calls these instead of TVM's
converter for the same operator type; ``default`` runs TVM's converter (for the cases it gets right).

A converter is ``fn(bb, inputs, attr, opset, default) -> relax.Expr`` where ``attr`` holds the parsed
ONNX attributes (strings as bytes) and ``default(inputs, attr)`` is TVM's converter.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from tvm import relax

from ..errors import UnsupportedOperatorError

CONVERTERS: dict[str, Callable] = {}


def _converter(op_type: str):
    def register(fn):
        CONVERTERS[op_type] = fn
        return fn

    return register


def _node(attr) -> str:
    return attr.get("tvm_custom", {}).get("name", "")


def _num_outputs(attr) -> int:
    """How many outputs the ONNX node declares (TVM's importer records it with the node's name)."""
    return attr.get("tvm_custom", {}).get("num_outputs", 1)


def _shape(expr) -> list[int]:
    return [int(d) for d in expr.ty.shape]


def _dtype(expr) -> str:
    return str(expr.ty.dtype)


def _const(value, like) -> relax.Constant:
    dtype = _dtype(like)
    return relax.const(np.array(value, dtype=dtype), dtype)  # without dtype, float64 became float32


def _refuse(op_type: str, attr, why: str):
    raise UnsupportedOperatorError([(f"{op_type} with {why}", _node(attr))])


def _text(value, default: str) -> str:
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)


@_converter("IsInf")
def _is_inf(bb, inputs, attr, opset, default):
    """``detect_positive`` / ``detect_negative`` (TVM's converter ignores both)."""
    x = inputs[0]
    positive, negative = int(attr.get("detect_positive", 1)), int(attr.get("detect_negative", 1))
    inf = relax.op.isinf(x)
    if positive and negative:
        return inf
    if positive:
        return relax.op.logical_and(inf, relax.op.greater(x, _const(0, x)))
    if negative:
        return relax.op.logical_and(inf, relax.op.less(x, _const(0, x)))
    return relax.op.logical_and(inf, relax.const(False))


@_converter("SpaceToDepth")
def _space_to_depth(bb, inputs, attr, opset, default):
    """``mode="CRD"`` (opset 28; TVM's converter always uses DCR's order)."""
    mode = _text(attr.get("mode"), "DCR")
    if mode == "DCR":
        return default(inputs, attr)
    if mode != "CRD":
        _refuse("SpaceToDepth", attr, f"mode={mode!r} (DCR and CRD are defined)")
    x, bs = inputs[0], int(attr["blocksize"])
    b, c, h, w = _shape(x)
    y = relax.op.reshape(x, (b, c, h // bs, bs, w // bs, bs))
    y = relax.op.permute_dims(y, [0, 1, 3, 5, 2, 4])
    return relax.op.reshape(y, (b, c * bs * bs, h // bs, w // bs))


@_converter("ConvTranspose")
def _conv_transpose(bb, inputs, attr, opset, default):
    """``output_shape`` (TVM's converter ignores it and returns the natural size).

    The pads follow from it as in ONNX's reference: total = stride * (in - 1) + output_padding +
    (kernel - 1) * dilation + 1 - output_shape, split begin/end (the larger half at the end for
    SAME_UPPER, at the beginning otherwise). A negative total makes the output larger than the natural
    size: those rows and columns get no contribution (zeros, then the bias)."""
    if "output_shape" not in attr:
        return default(inputs, attr)
    x, w = inputs[0], inputs[1]
    spatial = len(_shape(x)) - 2
    out_shape = [int(d) for d in attr["output_shape"]][-spatial:]
    strides = list(attr.get("strides", [1] * spatial))
    dilations = list(attr.get("dilations", [1] * spatial))
    output_padding = list(attr.get("output_padding", [0] * spatial))
    kernel = list(attr.get("kernel_shape", _shape(w)[2:]))
    auto_pad = _text(attr.get("auto_pad"), "NOTSET")
    begin, end = [], []
    for i in range(spatial):
        total = (strides[i] * (_shape(x)[i + 2] - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1
                 - out_shape[i])
        if auto_pad == "SAME_UPPER":
            begin.append(total // 2)
            end.append(total - total // 2)
        else:
            begin.append(total - total // 2)
            end.append(total // 2)
    attr = {k: v for k, v in attr.items() if k not in ("output_shape", "auto_pad")}
    attr["pads"] = [max(p, 0) for p in begin + end]
    y = bb.normalize(default([inputs[0], inputs[1], None], attr))
    grow = [max(-p, 0) for p in begin + end]
    if any(grow):
        pad_width = [0, 0, 0, 0]
        for i in range(spatial):
            pad_width += [grow[i], grow[spatial + i]]
        y = bb.normalize(relax.op.nn.pad(y, pad_width))
    if len(inputs) > 2 and inputs[2] is not None:
        bias = relax.op.reshape(inputs[2], [1, -1] + [1] * spatial)
        y = relax.op.add(y, bias)
    return y


@_converter("Mod")
def _mod(bb, inputs, attr, opset, default):
    """Float ``Mod`` with ``fmod=0`` (the sign of the divisor, as NumPy's ``mod``): TVM's floor-mod
    formula ``x - floor(x / y) * y`` breaks on infinities and signed zeros."""
    a, b = inputs
    if int(attr.get("fmod", 0)) or not _dtype(a).startswith(("float", "bfloat")):
        return default(inputs, attr)
    zero = _const(0, a)
    r = bb.normalize(relax.op.mod(a, b))  # C fmod: the sign of the dividend
    flip = relax.op.logical_and(relax.op.not_equal(r, zero),
                                relax.op.logical_xor(relax.op.less(r, zero), relax.op.less(b, zero)))
    r = bb.normalize(relax.op.where(flip, relax.op.add(r, b), r))
    signed_zero = relax.op.where(relax.op.less(b, zero), _const(-0.0, a), zero)
    return relax.op.where(relax.op.equal(r, zero), signed_zero, r)


@_converter("LayerNormalization")
def _layer_norm(bb, inputs, attr, opset, default):
    """The optional ``Mean`` and ``InvStdDev`` outputs (TVM's converter returns scalar placeholders),
    computed in ``stash_type`` precision over the normalised axes, keeping them as size-1 dims."""
    y = default(inputs, attr)
    x = inputs[0]
    ndim = len(_shape(x))
    axis = int(attr.get("axis", -1)) % ndim
    stash = int(attr.get("stash_type", 1))
    if stash != 1 and stash != 0:
        from onnx import helper

        stash_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(stash)).name
    else:
        stash_dtype = "float32"
    xs = relax.op.astype(x, stash_dtype) if _dtype(x) != stash_dtype else x
    axes = list(range(axis, ndim))
    mean = bb.normalize(relax.op.mean(xs, axes, keepdims=True))
    var = relax.op.mean(relax.op.square(relax.op.subtract(xs, mean)), axes, keepdims=True)
    eps = relax.const(np.array(float(attr.get("epsilon", 1e-5)), dtype=stash_dtype), stash_dtype)
    inv_std = relax.op.rsqrt(relax.op.add(var, eps))
    out = y[0] if isinstance(y, relax.Tuple) else bb.normalize(relax.TupleGetItem(bb.normalize(y), 0))
    return relax.Tuple([out, mean, inv_std])


@_converter("BatchNormalization")
def _batch_norm(bb, inputs, attr, opset, default):
    """``training_mode=1``: normalise with the batch's own mean and (population) variance and return
    the updated running statistics, as ONNX's reference does (TVM's converter used the running ones).
    Before opset 14 training is told by extra outputs, which TVM's converter drops: refused."""
    outputs = _num_outputs(attr)
    if opset < 14:
        if outputs > 1:
            _refuse("BatchNormalization", attr, f"{outputs} outputs (training mode of opset {opset})")
        return default(inputs, attr)
    if not int(attr.get("training_mode", 0)):
        return default(inputs, attr)
    x, scale, bias, mean, var = inputs
    rank = len(_shape(x))
    axes = [0] + list(range(2, rank))
    batch_mean = bb.normalize(relax.op.mean(x, axes))
    batch_var = bb.normalize(relax.op.variance(x, axes))
    momentum = float(attr.get("momentum", 0.9))
    eps = float(attr.get("epsilon", 1e-5))

    def per_channel(v):
        return relax.op.reshape(v, [1, -1] + [1] * (rank - 2))

    centred = relax.op.subtract(x, per_channel(batch_mean))
    denom = relax.op.sqrt(relax.op.add(per_channel(batch_var), _const(eps, x)))
    y = relax.op.add(relax.op.multiply(relax.op.divide(centred, denom), per_channel(scale)), per_channel(bias))
    m, one_m = _const(momentum, mean), _const(1.0 - momentum, mean)
    running_mean = relax.op.add(relax.op.multiply(mean, m), relax.op.multiply(batch_mean, one_m))
    running_var = relax.op.add(relax.op.multiply(var, m), relax.op.multiply(batch_var, one_m))
    return relax.Tuple([y, running_mean, running_var][:max(outputs, 1)])


@_converter("RoiAlign")
def _roi_align(bb, inputs, attr, opset, default):
    """``mode="max"`` is refused: ONNX (and ONNX Runtime) take the largest of the four *weighted* corner
    values of each sample, TVM the largest interpolated sample, so the numbers differ."""
    if _text(attr.get("mode"), "avg") == "max":
        _refuse("RoiAlign", attr, "mode='max' (ONNX's definition, the largest weighted corner of each "
                "sample, is not what TVM computes)")
    return default(inputs, attr)


def _constant(expr):
    """The NumPy value of a constant input, else None."""
    value = getattr(expr, "value", None)
    return value.numpy() if hasattr(value, "numpy") else None


@_converter("Dropout")
def _dropout(bb, inputs, attr, opset, default):
    """Inference Dropout is the identity, and its optional mask is all ``True`` (TVM's converter
    returned a float mask). Training mode (a ``training_mode`` input that is not a constant false)
    drops at random: refused, unless the ratio is 0."""
    x = inputs[0]
    ratio = float(attr.get("ratio", 0.5))
    if len(inputs) > 1 and inputs[1] is not None:
        value = _constant(inputs[1])
        ratio = float(value) if value is not None else float("nan")
    if len(inputs) > 2 and inputs[2] is not None:
        training = _constant(inputs[2])
        if (training is None or bool(training)) and ratio != 0.0:
            _refuse("Dropout", attr, "training_mode (random dropout; export the model in eval mode)")
    mask = relax.op.ones(x.ty.shape, "bool")
    return relax.Tuple([x, mask]) if _num_outputs(attr) > 1 else x


@_converter("Clip")
def _clip(bb, inputs, attr, opset, default):
    """As Relax operators (``relax.clip`` for constant bounds, else ``maximum``/``minimum``) rather than
    TVM's pre-lowered TIR, so that Kiln's lowerings apply: a NaN input stays NaN, as in ONNX Runtime
    (``compiler.legalize``), and the layout pass sees a clip (ReLU6) it can carry through NCHWc."""
    x = inputs[0]
    if not _dtype(x).startswith(("float", "bfloat")):
        return default(inputs, attr)
    if opset < 11:
        bounds = [float(attr.get("min", -np.inf)), float(attr.get("max", np.inf))]
    else:
        bounds = []
        for i in (1, 2):
            given = inputs[i] if len(inputs) > i else None
            value = _constant(given) if given is not None else None
            if given is not None and (value is None or value.size != 1):
                return default(inputs, attr)  # a computed bound: TVM's converter handles it
            bounds.append(None if given is None else float(value.reshape(())))
        bounds = [(-np.inf if i == 0 else np.inf) if b is None or np.isnan(b) else b  # NaN bound: unbounded
                  for i, b in enumerate(bounds)]
    lo, hi = bounds
    if np.isfinite(lo) and np.isfinite(hi):
        return relax.op.clip(x, lo, hi)
    out = x
    if np.isfinite(lo) or lo == np.inf:
        out = bb.emit(relax.op.maximum(out, _const(lo, x)))
    if np.isfinite(hi) or hi == -np.inf:
        out = bb.emit(relax.op.minimum(out, _const(hi, x)))
    return out
