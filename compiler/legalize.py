"""Kiln's lowerings of Relax operators to TIR where TVM 0.27's give wrong answers.

Passed to ``LegalizeOps`` by ``pipeline.fuse`` (no global registry is changed); every other operator
keeps TVM's lowering.

* ``relax.max`` / ``relax.min`` on floats: TVM starts the reduction at the largest finite value
  (``-3.4e38`` for a max), so the max of a row of ``-inf`` came out as ``-3.4e38``. ONNX's
  reference, ONNX Runtime, NumPy and PyTorch give ``-inf`` (attention graphs test "is the whole row
  masked" with exactly that). Here the identity is ``-inf`` / ``+inf``; the kernel is otherwise the
  one TVM builds.
* ``relax.nn.relu`` and ``relax.clip`` (ReLU6, hardtanh) on floats: TVM computes ``max(x, 0)`` and
  ``max(min(x, hi), lo)``, which LLVM lowers to ``maxnum``/``minnum``: a NaN comes out as 0 (or as a
  bound), so a corrupted input gave a plausible answer. PyTorch, ONNX Runtime and NumPy return NaN.
  Here they are selects that pass a NaN through (``x < 0 ? 0 : x``): one compare and one blend,
  fused into the producer's epilogue like the max was.
* ``relax.maximum`` / ``relax.minimum`` on floats (ONNX ``Clip``, ``Max``, ``Min`` become these): the
  same, as NumPy's ``maximum`` and PyTorch's ``clamp`` do: ``a > b or a is NaN ? a : b``.
"""

from __future__ import annotations

import tvm
from tvm import te, tirx


def _reduce(x: te.Tensor, axis, keepdims: bool, combine, identity: float, name: str) -> te.Tensor:
    ndim = len(x.shape)
    axes = sorted({int(a) % ndim for a in axis}) if axis is not None else list(range(ndim))
    reducer = te.comm_reducer(combine, lambda dtype: tirx.const(identity, dtype), name=name)
    raxes = {a: te.reduce_axis((0, x.shape[a]), name=f"k{a}") for a in axes}
    out_shape = [(1 if a in raxes else x.shape[a]) for a in range(ndim) if keepdims or a not in raxes]

    def body(*index):
        it = iter(index)
        full = []
        for a in range(ndim):
            if a in raxes:
                full.append(raxes[a].var)
                if keepdims:
                    next(it)
            else:
                full.append(next(it))
        return reducer(x[tuple(full)], axis=[raxes[a] for a in axes])

    return te.compute(out_shape, body, name=f"{x.name}_red", tag="comm_reduce")


def _float_reduction(op_name: str, combine, identity: float, name: str):
    default = tvm.ir.Op.get(op_name).get_attr("FLegalize")

    def legalize(bb, call):
        x = call.args[0]
        if not str(x.ty.dtype).startswith(("float", "bfloat")) or not x.ty.ndim:
            return default(bb, call)
        axis = None if call.attrs.axis is None else [int(a) for a in call.attrs.axis]
        keepdims = bool(call.attrs.keepdims)
        return bb.call_te(lambda t: _reduce(t, axis, keepdims, combine, identity, name), x,
                          primfunc_name_hint=name)

    return legalize


def _nan_propagating(op_name: str, clamp, name: str):
    """An elementwise clamp written as selects, so that a NaN input stays NaN."""
    default = tvm.ir.Op.get(op_name).get_attr("FLegalize")

    def legalize(bb, call):
        x = call.args[0]
        if not str(x.ty.dtype).startswith(("float", "bfloat")):
            return default(bb, call)
        args = [_float_attr(call, a) for a in ("min", "max")] if op_name == "relax.clip" else []
        return bb.call_te(lambda t: te.compute(t.shape, lambda *i: clamp(t[i], *args), name=name), x,
                          primfunc_name_hint=name)

    return legalize


def _float_attr(call, which: str):
    """``relax.clip``'s bound ``which`` as a Python float (TVM passes them as PrimValue arguments)."""
    index = {"min": 1, "max": 2}[which]
    value = call.args[index].value
    return float(value.value) if hasattr(value, "value") else float(value)


def _relu(v):
    return tirx.Select(v < tirx.const(0, v.dtype), tirx.const(0, v.dtype), v)


def _clip(v, lo: float, hi: float):
    below = tirx.Select(v < tirx.const(lo, v.dtype), tirx.const(lo, v.dtype), v)
    return tirx.Select(v > tirx.const(hi, v.dtype), tirx.const(hi, v.dtype), below)


def _nan_propagating_binary(op_name: str, pick_a, name: str):
    """An elementwise max/min of two broadcast operands that returns NaN when either is NaN."""
    default = tvm.ir.Op.get(op_name).get_attr("FLegalize")

    def compute(a: te.Tensor, b: te.Tensor) -> te.Tensor:
        rank = max(len(a.shape), len(b.shape))

        def padded(t):
            return [1] * (rank - len(t.shape)) + [int(d) for d in t.shape]

        da, db = padded(a), padded(b)
        shape = [y if x == 1 else x for x, y in zip(da, db)]

        def at(t, d, index):
            skip = rank - len(t.shape)
            return t[tuple(0 if d[k] == 1 else index[k] for k in range(skip, rank))]

        def body(*index):
            x, y = at(a, da, index), at(b, db, index)
            return tirx.Select(tirx.Or(pick_a(x, y), x != x), x, y)

        return te.compute(shape, body, name=name)

    def legalize(bb, call):
        a, b = call.args
        if not str(a.ty.dtype).startswith(("float", "bfloat")) or not all(
                isinstance(d, tvm.tirx.IntImm) for t in (a, b) for d in t.ty.shape):
            return default(bb, call)
        return bb.call_te(compute, a, b, primfunc_name_hint=name)

    return legalize


def legalize_map() -> dict:
    """``customize_legalize_map`` for ``relax.transform.LegalizeOps``."""
    return {
        "relax.max": _float_reduction("relax.max", lambda a, b: tirx.max(a, b), float("-inf"), "max"),
        "relax.min": _float_reduction("relax.min", lambda a, b: tirx.min(a, b), float("inf"), "min"),
        "relax.nn.relu": _nan_propagating("relax.nn.relu", _relu, "relu"),
        "relax.clip": _nan_propagating("relax.clip", _clip, "clip"),
        "relax.maximum": _nan_propagating_binary("relax.maximum", lambda x, y: x > y, "maximum"),
        "relax.minimum": _nan_propagating_binary("relax.minimum", lambda x, y: x < y, "minimum"),
    }
