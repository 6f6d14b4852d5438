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


@relax.expr_functor.mutator
class _StackRewriter(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.stack"):
            return call
        tensors = call.args[0]
        fields = list(tensors.fields) if isinstance(tensors, relax.Tuple) else None
        if fields is None:  # a tuple-typed variable: unpack it
            count = len(tensors.ty.fields)
            fields = [self.builder_.emit(relax.TupleGetItem(tensors, i)) for i in range(count)]
        ndim = fields[0].ty.ndim
        axis = int(call.attrs.axis) if call.attrs.axis is not None else 0
        axis = axis + ndim + 1 if axis < 0 else axis
        expanded = [self.builder_.emit(relax.op.expand_dims(f, [axis])) for f in fields]
        return relax.op.concat(expanded, axis=axis)


@tvm.transform.module_pass(opt_level=0, name="kiln.StackAsConcat")
def StackAsConcat(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (TVM pass naming)
    """``stack(xs, axis)`` as ``concat([expand_dims(x, axis) ...], axis)``: the same values, but TVM 0.27's
    layout inference for ``relax.stack`` kills the process (SIGFPE) on rank-0 inputs and raises on others,
    for any ``ConvertLayout`` call, whatever layouts are asked for. ONNX's Max/Min/Sum/Mean with several
    inputs and DynamicQuantizeLinear import as stacks."""
    return mutate_functions(_StackRewriter(mod), mod)


@relax.expr_functor.mutator
class _SqueezeAxesRewriter(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.squeeze") or call.attrs.axis is None:
            return call
        ndim = call.args[0].ty.ndim
        axes = [int(a) for a in call.attrs.axis]
        if ndim < 0 or all(a >= 0 for a in axes):
            return call
        return relax.op.squeeze(call.args[0], [a + ndim if a < 0 else a for a in axes])


@tvm.transform.module_pass(opt_level=0, name="kiln.NonNegativeSqueezeAxes")
def NonNegativeSqueezeAxes(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (TVM pass naming)
    """``squeeze(x, axis=[-1])`` as ``squeeze(x, axis=[ndim - 1])``. TVM 0.27's layout inference for
    squeeze indexes the layout with the negative axis as given and dies with ``std::bad_alloc`` in
    ``ConvertLayout`` (a 1-D conv stack ending in ``squeeze(-1)``, torch's ``x.squeeze(-1)``)."""
    return mutate_functions(_SqueezeAxesRewriter(mod), mod)


def _op(expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def _is_zero(expr) -> bool:
    return isinstance(expr, tvm.ir.Constant) and expr.value.numpy().size == 1 and float(expr.value.numpy()) == 0.0


@relax.expr_functor.mutator
class _PReLURewriter(relax.PyExprMutator):
    """``where(x > 0, x, alpha * x)`` with a constant per-channel (or single) ``alpha`` on axis 1 of ``x``
    as ``nn.prelu(x, alpha, axis=1)``."""

    def _value(self, expr):
        return self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not _op(call, "relax.where"):
            return call
        cond, x, other = call.args
        cond, other = self._value(cond), self._value(other)
        if not (_op(cond, "relax.greater") and cond.args[0].same_as(x) and _is_zero(cond.args[1])
                and _op(other, "relax.multiply")):
            return call
        a, b = other.args
        alpha = b if a.same_as(x) else a if b.same_as(x) else None
        ndim = x.ty.ndim if hasattr(x.ty, "ndim") else -1
        if not isinstance(alpha, tvm.ir.Constant) or ndim < 2 or str(x.ty.dtype) != str(alpha.value.dtype):
            return call
        channels = x.ty.shape[1] if isinstance(x.ty.shape, relax.ShapeExpr) else None
        if channels is None or not isinstance(channels, tvm.tirx.IntImm):
            return call
        arr, c = alpha.value.numpy(), int(channels)
        padded = (1,) * (ndim - arr.ndim) + arr.shape if arr.ndim <= ndim else None
        if arr.size == 1:
            vec = np.full(c, arr.reshape(()), dtype=arr.dtype)
        elif padded is not None and padded[1] == c and arr.size == c:  # broadcasts along axis 1 only
            vec = arr.reshape(c)
        else:
            return call
        return relax.op.nn.prelu(x, relax.const(vec), axis=1)


@tvm.transform.module_pass(opt_level=0, name="kiln.PReLUFromWhere")
def PReLUFromWhere(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (TVM pass naming)
    """PReLU back as one operator. TVM's PyTorch frontend decomposes ``aten.prelu`` into
    ``where(x > 0, x, alpha * x)``; ``greater`` and ``where`` then get no channels-last layout, so
    the layout conversion put six transposes around each PReLU and none fused into its convolution
    (the zoo's R-Net: 15 kernels where the ONNX route has 11, 1.6x slower). ``nn.prelu`` computes the
    same select and fuses into the convolution's epilogue."""
    return mutate_functions(_PReLURewriter(mod), mod)


#: Operators whose result is exact in the half type (they move, select or compare values; no
#: arithmetic to round): left in half precision.
_EXACT_IN_HALF = frozenset({
    "relax.reshape", "relax.permute_dims", "relax.expand_dims", "relax.squeeze", "relax.flatten",
    "relax.concat", "relax.split", "relax.take", "relax.strided_slice", "relax.dynamic_strided_slice",
    "relax.broadcast_to", "relax.tile", "relax.repeat", "relax.flip", "relax.gather_elements",
    "relax.gather_nd", "relax.where", "relax.astype", "relax.layout_transform", "relax.collapse_sum_to",
    "relax.nn.pad", "relax.max", "relax.min", "relax.maximum", "relax.minimum",
})
_HALF = ("float16", "bfloat16")


def _half_tensor(expr) -> bool:
    ty = getattr(expr, "ty", None)
    return isinstance(ty, relax.TensorType) and str(ty.dtype) in _HALF


@relax.expr_functor.mutator
class _HalfInFloat(relax.PyExprMutator):
    def visit_call_(self, call):
        call = self.builder_.normalize(super().visit_call_(call))
        if (not isinstance(call.op, tvm.ir.Op) or call.op.name in _EXACT_IN_HALF or not _half_tensor(call)
                or not any(_half_tensor(a) for a in call.args)):
            return call
        half = str(call.ty.dtype)
        if call.op.name == "relax.nn.softmax":  # as the frameworks: each step rounded to the half type
            return self._softmax(call.args[0], int(call.attrs.axis), half)
        args = [relax.op.astype(a, "float32") if _half_tensor(a) else a for a in call.args]
        try:
            wide = self.builder_.normalize(relax.Call(call.op, args, call.attrs, call.ty_args))
        except Exception:  # noqa: BLE001 - the op insists on its input dtype: keep it as it was
            return call
        if not isinstance(wide.ty, relax.TensorType) or str(wide.ty.dtype) != "float32":
            return call
        return relax.op.astype(self.builder_.emit(wide), half)

    def _softmax(self, x, axis: int, half: str):
        def step(expr):  # computed in float32, rounded to the half type
            return self.builder_.emit(relax.op.astype(self.builder_.emit(expr), half))

        def wide(v):
            return relax.op.astype(v, "float32")

        shifted = step(relax.op.subtract(wide(x), wide(relax.op.max(x, [axis], keepdims=True))))
        exp = step(relax.op.exp(wide(shifted)))
        total = step(relax.op.sum(wide(exp), [axis], keepdims=True))
        return relax.op.astype(relax.op.divide(wide(exp), wide(total)), half)


@tvm.transform.module_pass(opt_level=0, name="kiln.HalfComputeInFloat")
def HalfComputeInFloat(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (TVM pass naming)
    """On CPUs, compute each float16/bfloat16 operator in float32 and round its result back to the
    half type, as ONNX Runtime's CPU provider and NumPy do (CPUs have no half-precision arithmetic to
    speak of). Left alone, TVM accumulated matmuls, convolutions and reductions in half precision:
    outputs several units in the last place away from the frameworks' (ONNX's fp16 attention
    cases). Rounding stays per operator, so results match the frameworks', not a float32 model's.
    Operators exact in the half type (data movement, max/min) stay in it."""
    return mutate_functions(_HalfInFloat(mod), mod)
