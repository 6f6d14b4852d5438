"""Post-training static INT8 quantization of a Relax module: calibrate, then rewrite.

    qmod, report = quantize(prepared, calibration, input_specs)

It runs between ``pipeline.prepare`` and ``pipeline.fuse`` and knows nothing of the target, so any
target's pipeline can use it (``compile(..., precision="int8", calibration=...)`` on the
microcontroller targets and on the CPU targets).

What it does:

* **Which ops.** Every ``conv2d`` (any groups, plain ``NCHW``/``NHWC``-style layouts) and every
  2-D ``matmul`` whose weight is a constant. Everything else (pooling, softmax, means, activations,
  residual adds) stays float32.
* **Weights**: symmetric, one scale per output channel: ``s_w[c] = max|W[c]| / 127`` and
  ``W_q = round(W / s_w)`` in ``[-127, 127]``, stored as int8 constants (a quarter of the float bytes).
* **Activations** (the data input of each quantized op): one scale per tensor, zero point 0, from the
  **min/max** of that tensor over all calibration batches (no percentile clipping). A tensor whose
  calibrated minimum is >= 0 (after a ReLU) is stored as uint8 in ``[0, 255]`` with
  ``s = max / 255``; any other as int8 in ``[-127, 127]`` with ``s = max|x| / 127``. Values outside
  the calibrated range saturate.
* **Compute**: the op runs on the 8-bit operands with int32 accumulation (``out_dtype="int32"``); a
  constant bias added right after it is folded in as int32 (``round(b / (s_x s_w[c]))``); the int32
  result is dequantized (``acc * s_x s_w[c]``) and the elementwise epilogue (activation, residual
  add) runs in float32.
* **Memory**: the 8-bit tensor replaces the float tensor for *every* consumer (float consumers read
  it dequantized), so ``FuseOps`` fuses dequantize -> bias -> activation -> quantize into the
  producing kernel, and the intermediate that lives in memory between two quantized layers is
  8-bit (a quarter of the RAM).
* **Interface**: model inputs and outputs stay float32 (quantized on entry, dequantized at the
  outputs inside the model), so running a compiled module does not change.

Calibration runs the float module on this machine (TVM's LLVM backend and VM, default pipeline)
with every quantized op's data input added as an extra output. ``calibration`` is a list of example
input batches: NumPy arrays (or torch tensors), or tuples of them for several inputs, each of the
model's input shape, or with a leading dimension that is a multiple of it (split into batches); a
mapping ``{input name: array}`` (an ``.npz``) works the same way. A few dozen representative
samples are enough for the ranges to settle.

Accuracy, the stated tolerance (tested in ``tests/test_quantize.py`` on x86 and ``tests/test_mcu.py``
under QEMU): on inputs like the calibration data, the relative L2 error of the int8 output against
the float32 output, ``|y8 - y32| / |y32|``, is below 5 % on average (measured: keyword-spotting CNN
0.1 %, zoo ``mlp`` 2 %, zoo ``tiny_cnn`` 0.8 %), and a classifier's top-1 class agrees for at least
90 % of such inputs. Inputs far outside the calibrated range saturate and can exceed it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .errors import CompileError, InputShapeError

log = logging.getLogger(__name__)

#: Symmetric ranges: int8 for signed tensors (and all weights), uint8 for tensors calibrated >= 0.
_QMAX = {"int8": 127, "uint8": 255}
_QMIN = {"int8": -127, "uint8": 0}


class MissingCalibrationError(CompileError):
    """``precision="int8"`` without usable calibration data."""


@dataclass
class QuantReport:
    """What :func:`quantize` did: quantized ops, activation ranges, calibration size."""

    ops: list[str] = field(default_factory=list)  # "conv2d lv2", "matmul lv34", ...
    activations: dict[str, dict] = field(default_factory=dict)  # tensor -> {"dtype", "scale", "min", "max"}
    batches: int = 0
    method: str = "min/max"

    def to_json(self) -> dict:
        return {"scheme": "int8 weights per output channel (symmetric), 8-bit activations per tensor "
                          "(symmetric, zero point 0), int32 accumulation and bias",
                "calibration": f"{self.method} over {self.batches} batch(es)", "ops": self.ops,
                "activations": self.activations}


# -- calibration data ----------------------------------------------------------------------------

_HOW = ("pass calibration=[batch, ...]: example inputs like the ones the model will see, one NumPy array "
        "per batch (a tuple of arrays for several inputs), or a batch of N examples stacked on axis 0; "
        "from the command line: --calibration calib.npz (one array per input name)")


def check_calibration(precision: str, calibration) -> None:
    """Fail before any work when int8 has no calibration data, or another precision gets some."""
    if precision == "int8" and calibration is None:
        raise MissingCalibrationError(f"precision='int8' needs calibration data to choose activation scales: {_HOW}")
    if precision != "int8" and calibration is not None:
        raise CompileError(f"calibration data is used by precision='int8' only, not by precision={precision!r}; "
                           "drop calibration or compile with precision='int8'")


def calibration_batches(calibration, input_specs) -> list[list[np.ndarray]]:
    """Normalise ``calibration`` (see the module docstring) to a list of batches, each one array per
    input with exactly the input's shape and dtype."""
    how = _HOW
    if calibration is None:
        raise MissingCalibrationError(f"precision='int8' needs calibration data to choose activation scales: {how}")
    if isinstance(calibration, dict) or hasattr(calibration, "files"):  # {name: array} or np.load(npz)
        keys = list(calibration.keys()) if isinstance(calibration, dict) else list(calibration.files)
        names = [s.name for s in input_specs]
        if set(names) <= set(keys):
            entries = [tuple(calibration[n] for n in names)]
        elif len(keys) == len(names):  # positional (arr_0, arr_1, ... from np.savez(*arrays))
            entries = [tuple(calibration[k] for k in keys)]
        else:
            raise InputShapeError(f"calibration has arrays {keys}; the model's inputs are {names}")
    elif _is_array(calibration):
        entries = [calibration]
    else:
        try:
            entries = list(calibration)
        except TypeError:
            raise MissingCalibrationError(f"calibration must be a list of input batches, not a "
                                          f"{type(calibration).__name__}: {how}") from None
    if not entries:
        raise MissingCalibrationError(f"calibration is empty: {how}")
    batches: list[list[np.ndarray]] = []
    for k, entry in enumerate(entries):
        arrays = [_numpy(a) for a in (entry if isinstance(entry, (tuple, list)) else (entry,))]
        if len(arrays) != len(input_specs):
            raise InputShapeError(f"calibration batch {k} has {len(arrays)} array(s); the model takes "
                                  f"{len(input_specs)} input(s) ({', '.join(s.name for s in input_specs)})")
        split = [_split(a, spec, k) for a, spec in zip(arrays, input_specs)]
        counts = {len(s) for s in split}
        if len(counts) != 1:
            raise InputShapeError(f"calibration batch {k}: the inputs hold different numbers of examples")
        batches += [list(b) for b in zip(*split)]
    return batches


def _is_array(x) -> bool:
    return isinstance(x, np.ndarray) or type(x).__name__ == "Tensor"


def _numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _split(arr: np.ndarray, spec, k: int) -> list[np.ndarray]:
    shape = tuple(int(d) for d in spec.shape)
    arr = arr.astype(spec.dtype, copy=False)
    if arr.shape == shape:
        return [np.ascontiguousarray(arr)]
    if (arr.ndim == len(shape) and arr.ndim > 0 and arr.shape[1:] == shape[1:] and shape[0] > 0
            and arr.shape[0] % shape[0] == 0):
        return [np.ascontiguousarray(arr[i:i + shape[0]]) for i in range(0, arr.shape[0], shape[0])]
    raise InputShapeError(f"calibration batch {k}: input {spec.name!r} has shape {list(arr.shape)}; the model "
                          f"takes {list(shape)} (or N such batches stacked on axis 0)")


# -- the graph: which ops, which tensors ---------------------------------------------------------

def _op_name(call) -> str:
    return getattr(call.op, "name", "")


def _is_const(expr) -> bool:
    return type(expr).__name__ in ("GenericConst", "Constant")


def _shape(expr) -> tuple[int, ...]:
    return tuple(int(d) for d in expr.ty.shape)


def _quantizable(call) -> str | None:
    """``"conv2d"`` / ``"matmul"`` when ``call`` is an op this pass quantizes, else None."""
    from tvm import relax

    if not isinstance(call, relax.Call) or len(call.args) < 2 or not _is_const(call.args[1]):
        return None
    data = call.args[0]
    if not isinstance(data, relax.Var) or str(getattr(data.ty, "dtype", "")) != "float32":
        return None
    op = _op_name(call)
    if op == "relax.nn.conv2d":
        a = call.attrs
        layouts = (str(a.data_layout), str(a.kernel_layout), str(a.out_layout or a.data_layout))
        if any(len(s) != 4 or not s.isupper() for s in layouts) or "O" not in layouts[1] or "C" not in layouts[2]:
            return None  # blocked layouts (NCHW8c, ...) are not quantized
        return "conv2d"
    if op == "relax.matmul" and len(_shape(call.args[1])) == 2 and len(_shape(call)) >= 1:
        return "matmul"
    return None


def _channel_axes(call, kind: str) -> tuple[int, int]:
    """(axis of the output channel in the weight, in the result)."""
    if kind == "conv2d":
        a = call.attrs
        return str(a.kernel_layout).index("O"), str(a.out_layout or a.data_layout).index("C")
    return 1, len(_shape(call)) - 1


def _bindings(func):
    for block in func.body.blocks:
        yield from block.bindings


def _uses(func) -> dict:
    """Number of uses of every var in ``func`` (the return value counts)."""
    from tvm import relax

    counts: dict = {}

    def visit(e):
        if isinstance(e, relax.Var):
            counts[e] = counts.get(e, 0) + 1

    relax.analysis.post_order_visit(func.body, visit)
    return counts


# -- rebuilding main -----------------------------------------------------------------------------

class _Rebuilder:
    """Re-emits ``main`` binding by binding through a BlockBuilder; subclasses rewrite bindings."""

    def __init__(self, func):
        from tvm import relax

        self.relax = relax
        self.func = func
        self.bb = relax.BlockBuilder()
        self.remap: dict = {}

    def subst(self, e):
        r = self.relax
        if isinstance(e, r.Var):
            return self.use(e)
        if isinstance(e, r.Tuple):
            return r.Tuple([self.subst(f) for f in e.fields])
        if isinstance(e, r.TupleGetItem):
            return r.TupleGetItem(self.subst(e.tuple_value), e.index)
        if isinstance(e, r.Call):
            return r.Call(e.op, [self.subst(a) for a in e.args], e.attrs, e.ty_args)
        return e

    def use(self, var):
        """The expression a (non-quantized) consumer reads for ``var``."""
        return self.remap.get(var, var)

    def binding(self, binding, dataflow: bool):
        """Emit ``binding``; the default copies it."""
        self.emit_as(binding.var, self.subst(binding.value), dataflow)

    def emit_as(self, var, expr, dataflow: bool):
        r = self.relax
        is_output = dataflow and not isinstance(var, r.DataflowVar)
        new = self.bb.emit_output(expr, name_hint=var.name) if is_output else self.bb.emit(expr, name_hint=var.name)
        self.remap[var] = new
        return new

    def finish_block(self):
        """Called at the end of each dataflow block, inside it."""

    def result(self):
        return self.subst(self.func.body.body)

    def run(self):
        r = self.relax
        func = self.func
        attrs = dict(func.attrs) if func.attrs else None
        with self.bb.function("main", list(func.params), attrs=attrs):
            out = None
            for block in func.body.blocks:
                if isinstance(block, r.DataflowBlock):
                    with self.bb.dataflow():
                        for b in block.bindings:
                            self.binding(b, True)
                        self.finish_block()
                else:
                    for b in block.bindings:
                        self.binding(b, False)
            out = self.result()
            self.bb.emit_func_output(out)
        return self.bb.get()["main"]


class _Probe(_Rebuilder):
    """``main`` returning its outputs plus every watched tensor (for calibration)."""

    def __init__(self, func, watched):
        super().__init__(func)
        self.watched = list(watched)
        self.params = set(func.params)
        self.exported: dict = {}

    def finish_block(self):  # dataflow vars must leave their block as outputs to be returned
        for v in self.watched:
            if v not in self.exported and (v in self.remap or v in self.params):
                self.exported[v] = self.bb.emit_output(self.remap.get(v, v))

    def result(self):
        extra = [self.exported.get(v, self.remap.get(v, v)) for v in self.watched]
        return self.relax.Tuple([super().result(), *extra])


class _Quantizer(_Rebuilder):
    def __init__(self, func, ranges: dict, report: QuantReport):
        super().__init__(func)
        self.ranges = ranges  # watched var -> (min, max)
        self.report = report
        self.q: dict = {}  # var -> (8-bit var, scale)
        self.deq: dict = {}  # var -> dequantized float var
        uses = _uses(func)
        # a constant bias add right after a quantized op (its only use): folded in as int32
        self.bias_of: dict = {}
        self.folded: set = set()
        for b in _bindings(func):
            v = b.value
            if isinstance(v, self.relax.Call) and _op_name(v) == "relax.add" and isinstance(b.var, self.relax.DataflowVar):
                a0, a1 = v.args
                prod, const = (a0, a1) if _is_const(a1) else (a1, a0)
                if isinstance(prod, self.relax.Var) and _is_const(const) and uses.get(prod) == 1:
                    self.bias_of[prod] = (const, b.var)

    # activations
    def quantized(self, var):
        """(8-bit var, scale) for ``var``, emitting the quantize ops on first use."""
        if var not in self.q:
            lo, hi = self.ranges[var]
            dtype = "uint8" if lo >= 0 else "int8"
            bound = max(abs(lo), abs(hi))
            scale = float(bound / _QMAX[dtype]) if bound > 0 else 1.0
            r, bb = self.relax, self.bb
            x = self.remap.get(var, var)
            t = bb.emit(r.op.multiply(x, r.const(np.float32(1.0 / scale))), name_hint=f"{var.name}_qs")
            t = bb.emit(r.op.clip(t, _QMIN[dtype], _QMAX[dtype]))
            # round to nearest by truncating a value made positive: a float-to-int conversion, where
            # round() would be a libm call per element on a microcontroller
            offset = 128 if dtype == "int8" else 0
            t = bb.emit(r.op.add(t, r.const(np.float32(offset + 0.5))))
            if offset:
                t = bb.emit(r.op.astype(t, "int32"))
                t = bb.emit(r.op.subtract(t, r.const(np.int32(offset))))
            qv = bb.emit(r.op.astype(t, dtype), name_hint=f"{var.name}_q")
            self.q[var] = (qv, scale)
            self.report.activations[var.name] = {"dtype": dtype, "scale": scale, "min": float(lo), "max": float(hi)}
        return self.q[var]

    def use(self, var):
        if var in self.ranges:  # stored 8-bit: float consumers read it dequantized
            if var not in self.deq:
                r, bb = self.relax, self.bb
                qv, scale = self.quantized(var)
                f = bb.emit(r.op.astype(qv, "float32"))
                self.deq[var] = bb.emit(r.op.multiply(f, r.const(np.float32(scale))), name_hint=f"{var.name}_dq")
            return self.deq[var]
        return super().use(var)

    def binding(self, binding, dataflow):
        r = self.relax
        var, call = binding.var, binding.value
        if var in self.folded:
            return  # emitted with its producer
        kind = _quantizable(call)
        if kind is None or call.args[0] not in self.ranges:
            return super().binding(binding, dataflow)
        xq, sx = self.quantized(call.args[0])
        w = call.args[1].value.numpy().astype(np.float32)
        w_axis, out_axis = _channel_axes(call, kind)
        wmax = np.abs(np.moveaxis(w, w_axis, 0).reshape(w.shape[w_axis], -1)).max(axis=1)
        sw = np.where(wmax > 0, wmax / 127.0, 1.0).astype(np.float64)
        bshape = [1] * w.ndim
        bshape[w_axis] = -1
        wq = np.clip(np.round(w / sw.reshape(bshape)), -127, 127).astype(np.int8)
        bb = self.bb
        if kind == "conv2d":
            a = call.attrs
            acc_expr = r.op.nn.conv2d(xq, r.const(wq), strides=a.strides, padding=a.padding, dilation=a.dilation,
                                      groups=int(a.groups), data_layout=str(a.data_layout),
                                      kernel_layout=str(a.kernel_layout), out_layout=str(a.out_layout or a.data_layout),
                                      out_dtype="int32")
        else:
            acc_expr = r.op.matmul(xq, r.const(wq), out_dtype="int32")
        acc = bb.emit(acc_expr, name_hint=f"{var.name}_acc")
        out_rank = len(_shape(acc))
        cshape = [1] * out_rank
        cshape[out_axis] = -1
        scale = (sx * sw).reshape(cshape)
        target_var = var
        bias = self._bias(var, out_rank, out_axis, w.shape[w_axis])
        if bias is not None:
            b, add_var = bias
            bq = np.round(b.astype(np.float64) / (sx * sw)).astype(np.int64)
            bq = np.clip(bq, -(2 ** 31), 2 ** 31 - 1).astype(np.int32).reshape(cshape)
            acc = bb.emit(r.op.add(acc, r.const(bq)), name_hint=f"{var.name}_bias")
            self.folded.add(add_var)
            target_var = add_var
        f = bb.emit(r.op.astype(acc, "float32"))
        out = self.emit_as(target_var, r.op.multiply(f, r.const(scale.astype(np.float32))), dataflow)
        self.remap[var] = out
        self.report.ops.append(f"{kind} {var.name}" + (" (+ int32 bias)" if bias is not None else ""))

    def _bias(self, var, out_rank: int, out_axis: int, channels: int):
        """The folded bias vector and the add it replaces, when ``var`` feeds only a constant add along
        its channel axis."""
        if var not in self.bias_of:
            return None
        const, add_var = self.bias_of[var]
        b = const.value.numpy()
        if b.dtype != np.float32 or b.ndim > out_rank:
            return None
        full = [1] * (out_rank - b.ndim) + list(b.shape)
        if any(d != 1 for i, d in enumerate(full) if i != out_axis) or full[out_axis] not in (1, channels):
            return None
        vec = np.broadcast_to(b.reshape(-1), (channels,)) if b.size in (1, channels) else None
        return (vec, add_var) if vec is not None else None


# -- the pass --------------------------------------------------------------------------------------

def watched_tensors(func) -> list:
    """The data inputs of every op :func:`quantize` quantizes, in order of first use."""
    seen = []
    for b in _bindings(func):
        if _quantizable(b.value) and b.value.args[0] not in seen:
            seen.append(b.value.args[0])
    return seen


def calibrate(mod, batches: list[list[np.ndarray]], watched) -> dict:
    """Run the float ``mod`` on every batch (TVM LLVM backend, VM) and return each watched var's
    (min, max) over all batches."""
    import tvm
    from tvm import relax

    probe = tvm.IRModule({"main": _Probe(mod["main"], watched).run()})
    with tvm.transform.PassContext(opt_level=3):
        ex = tvm.compile(probe, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    lo = np.full(len(watched), np.inf)
    hi = np.full(len(watched), -np.inf)
    for batch in batches:
        outs = vm["main"](*[tvm.runtime.tensor(a) for a in batch])
        for i in range(len(watched)):
            v = outs[i + 1].numpy()
            lo[i] = min(lo[i], float(v.min()))
            hi[i] = max(hi[i], float(v.max()))
    return {v: (lo[i], hi[i]) for i, v in enumerate(watched)}


def quantize(mod, calibration, input_specs) -> tuple:
    """Calibrate ``mod`` (a Relax module after ``pipeline.prepare``) on ``calibration`` and rewrite it
    to int8 (see the module docstring). Returns ``(module, QuantReport)``."""
    import tvm

    batches = calibration_batches(calibration, input_specs)
    main = mod["main"]
    watched = watched_tensors(main)
    report = QuantReport(batches=len(batches))
    if not watched:
        log.warning("precision='int8': the model has no conv2d or matmul with constant weights; nothing quantized")
        return mod, report
    try:
        ranges = calibrate(mod, batches, watched)
    except Exception as err:  # pylint: disable=broad-except
        raise CompileError(f"calibration run failed: {str(err).strip().splitlines()[-1]}") from err
    new_main = _Quantizer(main, ranges, report).run()
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs, global_infos=mod.global_infos)
    out["main"] = new_main
    log.info("int8: quantized %d ops, %d activation tensors, calibrated on %d batch(es)",
             len(report.ops), len(report.activations), len(batches))
    return out, report
