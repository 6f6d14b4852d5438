"""Kiln's lowerings of Relax operators to TIR where TVM 0.27's give wrong answers.

Passed to ``LegalizeOps`` by ``pipeline.fuse`` (no global registry is changed); every other operator
keeps TVM's lowering.

* ``relax.max`` / ``relax.min`` on floats: TVM starts the reduction at the largest finite value
  (``-3.4e38`` for a max), so the max of a row of ``-inf`` came out as ``-3.4e38``. ONNX's
  reference, ONNX Runtime, NumPy and PyTorch give ``-inf`` (attention graphs test "is the whole row
  masked" with exactly that). Here the identity is ``-inf`` / ``+inf``; the kernel is otherwise the
  one TVM builds.
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


def legalize_map() -> dict:
    """``customize_legalize_map`` for ``relax.transform.LegalizeOps``."""
    return {
        "relax.max": _float_reduction("relax.max", lambda a, b: tirx.max(a, b), float("-inf"), "max"),
        "relax.min": _float_reduction("relax.min", lambda a, b: tirx.min(a, b), float("inf"), "min"),
    }
