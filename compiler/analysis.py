"""What a model is made of: operators, parameters and FLOPs per layer, and the fused kernels.

FLOPs count a multiply-add as 2 FLOPs (convolutions, matmuls); other operators count one FLOP per
output element. Kernel FLOPs come from TVM's TIR estimator (``estimate_tir_flops``), which uses the
same convention for multiply-adds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import tvm
from tvm import relax

FLOPS_NOTE = "FLOPs: a multiply-add counts as 2 FLOPs; other operators count 1 per output element."


@dataclass(frozen=True)
class LayerInfo:
    name: str
    op: str
    shape: tuple[int, ...]
    params: int
    flops: int


@dataclass(frozen=True)
class KernelInfo:
    name: str
    ops: tuple[str, ...]
    calls: int
    flops: int

    def to_json(self) -> dict:
        return asdict(self)


def _shape(sinfo) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in sinfo.shape)
    except (AttributeError, TypeError):
        return ()


def _numel(shape) -> int:
    return int(math.prod(shape)) if shape else 1


def _op_flops(call: relax.Call, out_shape: tuple[int, ...]) -> int:
    op = call.op.name
    if op in ("relax.nn.conv2d", "relax.nn.conv1d", "relax.nn.conv3d", "relax.nn.conv2d_transpose"):
        w = _shape(call.args[1].ty)
        # weight: [O, I/groups, *kernel] in OIHW-like layouts; MACs = out elements * (I/groups) * kernel
        layout = str(call.attrs.kernel_layout)
        if "O" in layout and "I" in layout and len(w) == len(layout):
            per_out = _numel([d for d, ax in zip(w, layout) if ax != "O"])
        else:
            per_out = _numel(w[1:])
        return 2 * _numel(out_shape) * per_out
    if op in ("relax.matmul", "relax.linear"):
        a = _shape(call.args[0].ty)
        return 2 * _numel(out_shape) * (a[-1] if a else 1)
    return _numel(out_shape)


def layer_table(mod: tvm.IRModule, func: str = "main") -> list[LayerInfo]:
    """One row per operator call of ``func`` in a Relax module (before lowering)."""
    rows: list[LayerInfo] = []
    fn = mod[func]

    def visit(binding):
        value = binding.value
        if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)):
            return
        shape = _shape(binding.var.ty)
        params = sum(_numel(_shape(a.ty)) for a in value.args if isinstance(a, tvm.ir.Constant))
        rows.append(LayerInfo(binding.var.name, value.op.name.removeprefix("relax."), shape, params,
                              _op_flops(value, shape)))

    for block in fn.body.blocks:
        for binding in block.bindings:
            visit(binding)
    return rows


def fused_groups(mod: tvm.IRModule) -> dict[str, tuple[str, ...]]:
    """After ``FuseOps`` (before ``FuseTIR``): fused function name -> names of the ops inside."""
    groups = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function) or not (func.attrs and "Primitive" in func.attrs):
            continue
        ops = []
        for block in func.body.blocks:
            for b in block.bindings:
                v = b.value
                if isinstance(v, relax.Call) and getattr(v.op, "name", "") == "relax.call_tir":
                    ops.append(v.args[0].name_hint)
        groups[gv.name_hint] = tuple(ops)
    return groups


def kernel_table(fused: tvm.IRModule, groups: dict[str, tuple[str, ...]]) -> list[KernelInfo]:
    """One row per TIR kernel of a fused module: the ops it fuses, how often main calls it, FLOPs."""
    from tvm.s_tir.analysis import estimate_tir_flops

    calls: dict[str, int] = {}

    def count(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_tir":
            calls[expr.args[0].name_hint] = calls.get(expr.args[0].name_hint, 0) + 1

    relax.analysis.post_order_visit(fused["main"], count)
    rows = []
    for gv, func in fused.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        name = gv.name_hint
        try:
            flops = int(estimate_tir_flops(tvm.IRModule({name: func})))
        except Exception:  # the estimator rejects some data-dependent loops
            flops = 0
        rows.append(KernelInfo(name, groups.get(name, (name,)), calls.get(name, 0), flops * calls.get(name, 0)))
    return sorted(rows, key=lambda k: -k.flops)


def _bytes(sinfo) -> int:
    """Bytes of a tensor with a static shape (0 for anything else: tuples, shapes, symbolic dims)."""
    if not isinstance(sinfo, relax.TensorType) or sinfo.shape is None:
        return 0
    try:
        dims = [int(d) for d in sinfo.shape.values]
    except (AttributeError, TypeError):
        return 0
    bits = tvm.runtime.DataType(str(sinfo.dtype)).bits * tvm.runtime.DataType(str(sinfo.dtype)).lanes
    return _numel(dims) * max(bits // 8, 1)


def memory_estimate(fused: tvm.IRModule) -> dict:
    """Bytes of the tensors of a fused module's ``main``: ``inputs``, ``weights`` (constants),
    ``largest_intermediate``, ``intermediates`` (their sum: what would be held with no buffer reuse)
    and ``outputs``. A run needs at least inputs + outputs + the largest intermediate at once."""
    main = fused["main"]
    inputs = sum(_bytes(p.ty) for p in main.params)
    weights, sizes = 0, []

    def visit(expr):
        nonlocal weights
        if isinstance(expr, tvm.ir.Constant):
            weights += _bytes(expr.ty)

    relax.analysis.post_order_visit(main, visit)
    for block in main.body.blocks:
        for binding in block.bindings:
            sizes.append(_bytes(binding.var.ty))
    result = main.body.body.ty
    outputs = _bytes(result) if isinstance(result, relax.TensorType) \
        else sum(_bytes(f) for f in getattr(result, "fields", ()))
    return {"inputs": inputs, "weights": weights, "outputs": outputs,
            "largest_intermediate": max(sizes, default=0), "intermediates": sum(sizes)}
