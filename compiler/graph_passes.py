"""Relax graph passes Kiln adds to TVM's.

:func:`FoldAffineIntoConv` folds BatchNorm (after ``DecomposeOpsForInference`` turned it into
subtract/divide/multiply/add with constants), conv bias and any other per-output-channel affine
chain into the convolution's constant weights and one bias add. TVM's own
``FoldBatchnormToConv2D`` only matches ``conv2d -> batch_norm`` and misses the
``conv2d -> add(bias) -> batch_norm`` graphs that PyTorch exports produce.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import tvm
from tvm import relax

_AFFINE_OPS = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide")


def _channel_vector(const: tvm.ir.Constant, channels: int) -> np.ndarray | None:
    """``const`` as a length-``channels`` vector if it broadcasts per channel of an NCHW tensor."""
    arr = const.value.numpy()
    if arr.size == 1:
        return np.full(channels, arr.reshape(()), dtype=np.float64)
    shape = arr.shape
    if len(shape) < 3 or shape[-2:] != (1, 1) or shape[-3] != channels:
        return None
    if any(d != 1 for d in shape[:-3]):
        return None
    return arr.reshape(channels).astype(np.float64)


def _is_nchw_conv(call) -> bool:
    return (
        isinstance(call, relax.Call)
        and isinstance(call.op, tvm.ir.Op)
        and call.op.name == "relax.nn.conv2d"
        and isinstance(call.args[1], tvm.ir.Constant)
        and call.attrs.data_layout == "NCHW"
        and call.attrs.kernel_layout == "OIHW"
        and call.attrs.out_layout == "NCHW"
        and str(call.args[1].value.dtype) == "float32"
    )


def _plan_block(block: relax.DataflowBlock, uses: Counter) -> dict:
    """Map the last var of each foldable ``conv -> affine...`` chain to (conv call, scale, shift)."""
    value_of = {b.var: b.value for b in block.bindings if isinstance(b, relax.VarBinding)}
    users: dict[relax.Var, list[relax.Var]] = {}
    for var, value in value_of.items():
        for fv in relax.analysis.free_vars(value):
            users.setdefault(fv, []).append(var)

    plan = {}
    for var, value in value_of.items():
        if not _is_nchw_conv(value):
            continue
        channels = int(value.args[1].value.shape[0])
        scale, shift = np.ones(channels), np.zeros(channels)
        end, cur = None, var
        while uses[cur] == 1 and isinstance(cur, relax.DataflowVar) and len(users.get(cur, [])) == 1:
            nxt = users[cur][0]
            call = value_of[nxt]
            if not (isinstance(call, relax.Call) and getattr(call.op, "name", "") in _AFFINE_OPS):
                break
            a, b = call.args
            const_first = isinstance(a, tvm.ir.Constant) and b.same_as(cur)
            if not (const_first or (isinstance(b, tvm.ir.Constant) and a.same_as(cur))):
                break
            vec = _channel_vector(a if const_first else b, channels)
            if vec is None:
                break
            op = call.op.name
            if op == "relax.add":
                shift = shift + vec
            elif op == "relax.multiply":
                scale, shift = scale * vec, shift * vec
            elif op == "relax.subtract":
                scale, shift = (-scale, vec - shift) if const_first else (scale, shift - vec)
            elif op == "relax.divide" and not const_first and np.all(vec != 0):
                scale, shift = scale / vec, shift / vec
            else:
                break
            end, cur = nxt, nxt
        if end is not None and np.all(np.isfinite(scale)) and np.all(np.isfinite(shift)):
            plan[end] = (value, scale, shift)
    return plan


@relax.expr_functor.mutator
class _Folder(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.plan: dict = {}

    def visit_dataflow_block_(self, block):
        uses: Counter = Counter()
        for b in block.bindings:
            for fv in relax.analysis.free_vars(b.value):
                uses[fv] += 1
        self.plan = _plan_block(block, uses)
        return super().visit_dataflow_block_(block)

    def visit_var_binding_(self, binding):
        if binding.var not in self.plan:
            return super().visit_var_binding_(binding)
        conv, scale, shift = self.plan[binding.var]
        weight = conv.args[1].value.numpy()
        new_w = (weight.astype(np.float64) * scale.reshape(-1, 1, 1, 1)).astype(np.float32)
        attrs = conv.attrs
        new_conv = relax.op.nn.conv2d(
            self.visit_expr(conv.args[0]),
            relax.const(new_w),
            strides=attrs.strides,
            padding=attrs.padding,
            dilation=attrs.dilation,
            groups=attrs.groups,
            data_layout="NCHW",
            kernel_layout="OIHW",
            out_dtype=attrs.out_dtype,
        )
        bias = relax.const(shift.astype(np.float32).reshape(1, -1, 1, 1))
        conv_var = self.builder_.emit(new_conv)
        out = relax.op.add(conv_var, bias)
        new_var = self.builder_.emit(out) if isinstance(binding.var, relax.DataflowVar) else self.builder_.emit_output(out)
        self.set_var_remap(binding.var, new_var)


@tvm.transform.module_pass(opt_level=0, name="kiln.FoldAffineIntoConv")
def FoldAffineIntoConv(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (TVM pass naming)
    """Fold per-output-channel affine chains (bias, BatchNorm, scaling) into conv2d weights."""
    return relax.transform.DeadCodeElimination()(mutate_functions(_Folder(mod), mod))


def mutate_functions(mutator: relax.PyExprMutator, mod: tvm.IRModule) -> tvm.IRModule:
    """Run ``mutator`` over every Relax function of ``mod``; the module its builder holds after."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()
