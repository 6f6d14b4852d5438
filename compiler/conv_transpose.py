"""Transposed convolutions as ordinary convolutions (sub-pixel decomposition), in Kiln's layouts.

TVM 0.27 lowers ``relax.nn.conv2d_transpose`` only in NCHW/IOHW, and Kiln's layout conversion
(NHWC/HWIO for every convolution) hands it over in NHWC: the operator then reached code generation
unlowered ("CodeGenVM cannot emit this Relax operator directly"). TOPI's own lowering would also be
slow: it inserts ``stride - 1`` zeros between input pixels and runs a dense convolution over them, so
a stride-2 layer does 4x the work (stride 4: 16x), all of it on the generic fallback schedule.

:func:`TransposedConvAsConv` rewrites every transposed convolution with constant weights into

    conv2d (stride 1, the same groups)  ->  depth-to-space  ->  crop

Per spatial axis (input ``I``, kernel ``K``, stride ``s``, dilation ``d``, padding ``pb``/``pe``,
output padding ``op``), the un-cropped output position ``y = i*s + k*d`` is written ``y = q*s + r``
with the phase ``r = k*d mod s`` and ``q = i + m_k``, ``m_k = (k*d) // s``. So for each phase ``r``
the outputs at ``q*s + r`` are a correlation of the input with the taps ``k`` of that phase, at input
offsets ``-m_k``: one convolution computes all ``s_h*s_w`` phases as extra output channels
(``[groups, r_h, r_w, oc/groups]``), with a kernel of ``max(m)/D + 1`` taps (``D``, the gcd of the
offsets, becomes the convolution's dilation) and zero weights where a phase has no tap. A 2x2,
stride-2 layer (DB text detectors, U-Nets) becomes a 1x1 convolution with 4x the output channels; a
4x4, stride-2, padding-1 layer a 2x2 one without a single zero weight. The convolution is a plain
``conv2d`` in the layout the transposed one had (NHWC after layout conversion), so it gets Kiln's
convolution schedule (register-tiled, vectorised over output channels, parallel over rows); the
depth-to-space and crop are one injective kernel into which the following bias, BatchNorm and
activation fuse.

Transposed convolutions whose weights are not constants keep TVM's lowering, moved back to
NCHW/IOHW where layout conversion moved them. ``conv1d_transpose`` (which layout conversion leaves in
NCW) keeps TVM's lowering.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from .graph_passes import mutate_functions


@dataclass(frozen=True)
class AxisPlan:
    """How one spatial axis of a transposed convolution maps onto the ordinary convolution."""

    phases: int  # s: phases (output channels multiply by it)
    taps: int  # kernel extent of the ordinary convolution
    dilation: int  # its dilation D
    pad_before: int  # its padding
    pad_after: int
    crop_begin: int  # input slice [crop_begin, crop_end) taken first (when the padding is negative)
    crop_end: int
    q_len: int  # its output extent Q (outputs Q*s un-cropped positions)
    offset: int  # first kept position in the interleaved output
    out_len: int  # output extent O of the transposed convolution
    tap_of: tuple  # per original tap k: (phase r, tap index t of the ordinary convolution)


def plan_axis(in_len: int, kernel: int, stride: int, dilation: int, pad_begin: int, pad_end: int,
              output_padding: int) -> AxisPlan:
    """The sub-pixel decomposition of one axis (see the module docstring)."""
    s, d = stride, dilation
    out_len = (in_len - 1) * s - pad_begin - pad_end + d * (kernel - 1) + output_padding + 1
    shift = [(k * d) // s for k in range(kernel)]  # m_k: input offset of tap k within its phase
    m_max = max(shift)
    step = math.gcd(*shift) if m_max else 1  # gcd(0, x) = x: the common spacing of the offsets
    q0 = pad_begin // s
    q1 = (pad_begin + out_len - 1) // s
    # input positions q0 - m_max .. q1 are read; pad or crop the input to exactly that range
    lo, hi = q0 - m_max, q1 + 1
    return AxisPlan(
        phases=s, taps=m_max // step + 1, dilation=step,
        pad_before=max(0, -lo), pad_after=max(0, hi - in_len),
        crop_begin=max(0, lo), crop_end=min(in_len, hi),
        q_len=q1 - q0 + 1, offset=pad_begin - q0 * s, out_len=out_len,
        tap_of=tuple(((k * d) % s, (m_max - shift[k]) // step) for k in range(kernel)),
    )


def sub_pixel_weight(weight_iohw: np.ndarray, groups: int, ph: AxisPlan, pw: AxisPlan) -> np.ndarray:
    """The ordinary convolution's OIHW weight, output channels ordered ``[groups, r_h, r_w, oc/groups]``."""
    cin, ocg, kh, kw = weight_iohw.shape
    icg = cin // groups
    w = weight_iohw.reshape(groups, icg, ocg, kh, kw)
    out = np.zeros((groups, ph.phases, pw.phases, ocg, icg, ph.taps, pw.taps), dtype=weight_iohw.dtype)
    for i, (rh, th) in enumerate(ph.tap_of):
        for j, (rw, tw) in enumerate(pw.tap_of):
            out[:, rh, rw, :, :, th, tw] = w[:, :, :, i, j].transpose(0, 2, 1)
    return out.reshape(groups * ph.phases * pw.phases * ocg, icg, ph.taps, pw.taps)


def _dtype(call) -> str:
    dtype = call.ty.dtype
    return str(getattr(dtype, "dtype", dtype))


def _ints(values) -> list[int]:
    return [int(v) for v in values]


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d_transpose"):
            return call
        attrs = call.attrs
        layout, kernel_layout = str(attrs.data_layout), str(attrs.kernel_layout)
        if (layout not in ("NCHW", "NHWC") or str(attrs.out_layout) != layout
                or sorted(kernel_layout) != sorted("IOHW")):
            return call
        data, weight = call.args
        try:
            in_shape = _ints(data.ty.shape)
        except (TypeError, AttributeError):
            in_shape = None
        if not isinstance(weight, tvm.ir.Constant) or in_shape is None:
            return self._topi_layout(call, layout)
        return self._sub_pixel(call, data, weight, in_shape, layout, kernel_layout)

    def _topi_layout(self, call, layout: str):
        """TVM lowers transposed convolutions in NCHW/IOHW only: move one that is not there back."""
        attrs = call.attrs
        if layout == "NCHW" and str(attrs.kernel_layout) == "IOHW":
            return call
        data, weight = call.args
        if layout == "NHWC":
            data = self.builder_.emit(relax.op.permute_dims(data, [0, 3, 1, 2]))
        kl = str(attrs.kernel_layout)
        if kl != "IOHW":
            weight = self.builder_.emit(relax.op.permute_dims(weight, [kl.index(c) for c in "IOHW"]))
        out = self.builder_.emit(relax.op.nn.conv2d_transpose(
            data, weight, strides=attrs.strides, padding=attrs.padding, output_padding=attrs.output_padding,
            dilation=attrs.dilation, groups=attrs.groups, data_layout="NCHW", kernel_layout="IOHW",
            out_dtype=_dtype(call)))
        return relax.op.permute_dims(out, [0, 2, 3, 1]) if layout == "NHWC" else out

    def _sub_pixel(self, call, data, weight, in_shape, layout: str, kernel_layout: str):
        attrs = call.attrs
        groups = int(attrs.groups)
        w = weight.value.numpy().transpose([kernel_layout.index(c) for c in "IOHW"])
        (sh, sw), (dh, dw) = _ints(attrs.strides), _ints(attrs.dilation)
        pt, pl, pb, pr = _ints(attrs.padding)
        oph, opw = _ints(attrs.output_padding)
        hax, wax = (2, 3) if layout == "NCHW" else (1, 2)
        ph = plan_axis(in_shape[hax], w.shape[2], sh, dh, pt, pb, oph)
        pw = plan_axis(in_shape[wax], w.shape[3], sw, dw, pl, pr, opw)
        if [ph.out_len, pw.out_len] != [int(call.ty.shape[hax]), int(call.ty.shape[wax])]:
            return self._topi_layout(call, layout)  # not the output size we derive: leave it to TVM
        ocg = w.shape[1]
        sub = sub_pixel_weight(w, groups, ph, pw)
        x = data
        crop = [(ax, p) for ax, p in ((hax, ph), (wax, pw)) if (p.crop_begin, p.crop_end) != (0, in_shape[ax])]
        if crop:
            x = self.builder_.emit(relax.op.strided_slice(
                x, [a for a, _ in crop], [p.crop_begin for _, p in crop], [p.crop_end for _, p in crop]))
        if layout == "NCHW":
            kernel, klayout = sub, "OIHW"
        else:
            kernel, klayout = sub.transpose(2, 3, 1, 0), "HWIO"
        y = self.builder_.emit(relax.op.nn.conv2d(
            x, relax.const(np.ascontiguousarray(kernel)), strides=[1, 1],
            padding=[ph.pad_before, pw.pad_before, ph.pad_after, pw.pad_after],
            dilation=[ph.dilation, pw.dilation], groups=groups, data_layout=layout, kernel_layout=klayout,
            out_layout=layout, out_dtype=_dtype(call)))
        n, qh, qw = in_shape[0], ph.q_len, pw.q_len
        full_h, full_w = qh * sh, qw * sw
        if sh * sw > 1:  # depth-to-space: channel (g, r_h, r_w, j) of pixel (q_h, q_w) -> (q_h*s_h + r_h, ...)
            if layout == "NHWC":
                y = self.builder_.emit(relax.op.reshape(y, [n, qh, qw, groups, sh, sw, ocg]))
                y = self.builder_.emit(relax.op.permute_dims(y, [0, 1, 4, 2, 5, 3, 6]))
                y = self.builder_.emit(relax.op.reshape(y, [n, full_h, full_w, groups * ocg]))
            else:
                y = self.builder_.emit(relax.op.reshape(y, [n, groups, sh, sw, ocg, qh, qw]))
                y = self.builder_.emit(relax.op.permute_dims(y, [0, 1, 4, 5, 2, 6, 3]))
                y = self.builder_.emit(relax.op.reshape(y, [n, groups * ocg, full_h, full_w]))
        if (ph.offset, pw.offset, ph.out_len, pw.out_len) != (0, 0, full_h, full_w):
            y = relax.op.strided_slice(y, [hax, wax], [ph.offset, pw.offset],
                                       [ph.offset + ph.out_len, pw.offset + pw.out_len])
        return y


@tvm.transform.module_pass(opt_level=0, name="kiln.TransposedConvAsConv")
def TransposedConvAsConv(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (TVM pass naming)
    """Every ``conv2d_transpose`` with constant weights as a stride-1 ``conv2d`` plus depth-to-space
    (module docstring); others moved to the NCHW/IOHW layout TVM lowers."""
    return mutate_functions(_Rewriter(mod), mod)
