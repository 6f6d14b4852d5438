"""Winograd convolution: 3x3 stride-1 convolutions rewritten as transform, batched GEMM, transform.

Why
---
Direct 3x3 convolutions in ResNet-style networks are compute bound: Kiln's register-tiled schedule
and ONNX Runtime's MLAS both run them at 55-65 % of the FMA peak, so a faster kernel has to do fewer
multiplies. Winograd's minimal filtering F(m x m, 3 x 3) computes an ``m x m`` output tile from an
``(m+2) x (m+2)`` input tile with ``(m+2)^2`` multiplies per channel pair instead of ``9 m^2``:
2.25x fewer for F(2, 3), 4x fewer for F(4, 3) (Lavin & Gray, 2015). ONNX Runtime's CPU provider does
not use it for float convolutions.

How (Relax level, at the start of ``pipeline.fuse``, after ``prepare`` converted layouts to NHWC/HWIO)::

    conv2d(x[N,H,W,C], w[3,3,C,K])  ->  V = input_transform(x)        [A*A, P, C]   (A = m+2, P tiles)
                                        M = matmul(V, U)              [A*A, P, K]   U = G w G^T, a constant
                                        y = output_transform(M)       [N, H, W, K]

* ``U`` is computed here in float64 from the constant weights and stored as float32: the weight
  transform costs nothing at run time.
* The batched GEMM is an ordinary ``relax.matmul`` with a constant right operand, so Kiln's matmul
  schedule (register-blocked micro-kernel) runs it and MetaSchedule can tune it.
* The transforms are TE computes whose ``A*A`` (input) or ``m*m`` (output) cases are selected by a
  chain of ``Select`` on the case index; ``schedules.x86.winograd`` unrolls that index so every
  case becomes straight-line vector code with only its non-zero coefficients (the row transform is
  written once per row, so LLVM shares it between the cases). The input transform first copies
  each zero-padded input tile into a small buffer (``winograd_tile``). The input transform is marked opaque for FuseOps (nothing fuses into it); the
  output transform is injective, so the bias / BatchNorm shift / ReLU / residual add that follow
  the convolution fuse into it and each output is written once.

When
----
Only where it pays and the numbers stay close: float32, 3x3, stride 1, dilation 1, one group, constant
weights, at least ``MIN_CHANNELS`` input and output channels. ``m`` is 4 when it divides the output
height and width and the output is at least ``MIN_F4_SIZE`` wide, else 2 when that divides them; other
shapes keep the direct convolution (a 7x7 map would waste a third of its tiles and, at 512 channels,
stream 1.8x more weight bytes). Numerics: F(2, 3) adds ~1e-7, F(4, 3) ~1e-6 relative error to a
ResNet-18's logits (the transforms' coefficients are small integers and 1/4, 1/6, 1/12, 1/24).
Targets opt in with ``winograd = true`` in their TOML description (``targets/``); to turn it off,
compile for ``dataclasses.replace(targets.get("x86"), winograd=False)``.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import tvm
from tvm import relax, te, tirx

#: Fewer channels than this and the transforms cost more than the multiplies saved.
MIN_CHANNELS = 32
#: F(4, 3) only from this output width on (smaller maps: F(2, 3), if 2 divides them).
MIN_F4_SIZE = 16
#: FuseOps patterns (tvm/relax/op_attr_types: kInjective = 2, kOpaque = 8).
_INJECTIVE, _OPAQUE = 2, 8

F = Fraction
#: (B^T, G, A^T) for F(m, 3), Lavin & Gray's interpolation points 0, +-1, +-2, infinity.
MATRICES = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [F(1, 2), F(1, 2), F(1, 2)], [F(1, 2), F(-1, 2), F(1, 2)], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[F(1, 4), 0, 0], [F(-1, 6), F(-1, 6), F(-1, 6)], [F(-1, 6), F(1, 6), F(-1, 6)],
         [F(1, 24), F(1, 12), F(1, 6)], [F(1, 24), F(-1, 12), F(1, 6)], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}


def tile_size(out_h: int, out_w: int) -> int | None:
    """The ``m`` of F(m, 3) for an output of ``out_h x out_w`` (None: keep the direct convolution)."""
    if out_h % 4 == 0 and out_w % 4 == 0 and min(out_h, out_w) >= MIN_F4_SIZE:
        return 4
    if out_h % 2 == 0 and out_w % 2 == 0:
        return 2
    return None


def transform_weights(w_hwio: np.ndarray, m: int) -> np.ndarray:
    """``U[a*A + b, c, k] = (G w[:, :, c, k] G^T)[a, b]`` in float64, returned as float32."""
    g = np.array(MATRICES[m][1], dtype=np.float64)
    u = np.einsum("ai,ijck,bj->abck", g, w_hwio.astype(np.float64), g)
    alpha = m + 2
    return u.reshape(alpha * alpha, *w_hwio.shape[2:]).astype(np.float32)


def _combine(coeffs, terms):
    """``sum(c * t)`` over the non-zero coefficients, without multiplying by 1 or -1."""
    out = None
    for c, t in zip(coeffs, terms):
        if c == 0:
            continue
        c = float(c)
        term = t if c == 1 else (-t if c == -1 else t * tirx.const(c, "float32"))
        out = term if out is None else out + term
    return out if out is not None else tirx.const(0.0, "float32")


def _select(index, cases):
    """``cases[index]`` for a symbolic ``index`` as a chain of Selects (folded once ``index`` is unrolled)."""
    out = cases[-1]
    for i in range(len(cases) - 2, -1, -1):
        out = tirx.Select(index == i, cases[i], out)
    return out


def input_transform(x: te.Tensor, m: int, pad_top: int, pad_left: int, out_h: int, out_w: int) -> te.Tensor:
    """``V[a*A + b, p, c] = (B^T d_p B)[a, b]`` for every tile ``p`` of the (zero-padded) input."""
    bt = MATRICES[m][0]
    alpha = m + 2
    n, h, w, c = (int(s) for s in x.shape)
    th, tw = out_h // m, out_w // m

    def load(p, i, j, ch):
        b_ = p // (th * tw)
        hi = p // tw % th * m + i - pad_top
        wj = p % tw * m + j - pad_left
        inside = tirx.all(hi >= 0, hi < h, wj >= 0, wj < w)
        return tirx.if_then_else(inside, x[b_, hi, wj, ch], tirx.const(0.0, "float32"))

    # the (zero-padded) input tiles: the schedule computes each in a small local buffer, so the
    # unrolled transform below reads plain loads (no bounds checks in its expressions)
    tile = te.compute((n * th * tw, alpha, alpha, c), load, name="winograd_tile")

    def compute(k, p, ch):
        ds = [[tile[p, i, j, ch] for j in range(alpha)] for i in range(alpha)]
        rows = [[_combine(bt[a], [ds[i][j] for i in range(alpha)]) for j in range(alpha)] for a in range(alpha)]
        cases = [_combine(bt[bb], rows[a]) for a in range(alpha) for bb in range(alpha)]
        return _select(k, cases)

    return te.compute((alpha * alpha, n * th * tw, c), compute, name=f"winograd_input_m{m}")


def output_transform(mm: te.Tensor, m: int, n: int, out_h: int, out_w: int) -> te.Tensor:
    """``y[n, ty*m + a, tx*m + b, k] = (A^T M_p A)[a, b]`` for the tile ``p = (n, ty, tx)``."""
    at = MATRICES[m][2]
    alpha = m + 2
    th, tw = out_h // m, out_w // m
    k = int(mm.shape[2])

    def compute(b_, hh, ww, ch):
        p = (b_ * th + hh // m) * tw + ww // m
        ms = [[mm[xi * alpha + nu, p, ch] for nu in range(alpha)] for xi in range(alpha)]
        rows = [[_combine(at[a], [ms[xi][nu] for xi in range(alpha)]) for nu in range(alpha)] for a in range(m)]
        cases = [_combine(at[bb], rows[a]) for a in range(m) for bb in range(m)]
        return _select(hh % m * m + ww % m, cases)

    return te.compute((n, out_h, out_w, k), compute, name=f"winograd_output_m{m}")


def _static_shape(sinfo) -> tuple[int, ...] | None:
    shape = getattr(sinfo, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    try:
        return tuple(int(v) for v in shape.values)
    except TypeError:
        return None


def _plan(call) -> tuple[int, int, int, int, int, int] | None:
    """``(m, batch, pad_top, pad_left, out_h, out_w)`` when ``call`` is a conv2d Winograd should
    take, else None."""
    if not isinstance(call, relax.Call) or call.op != tvm.ir.Op.get("relax.nn.conv2d"):
        return None
    attrs = call.attrs
    if (attrs.data_layout != "NHWC" or attrs.kernel_layout != "HWIO" or attrs.out_layout != "NHWC"
            or int(attrs.groups) != 1 or [int(s) for s in attrs.strides] != [1, 1]
            or [int(d) for d in attrs.dilation] != [1, 1]):
        return None
    x, w = call.args
    if not isinstance(w, tvm.ir.Constant) or str(w.value.dtype) != "float32":
        return None
    xs, ws = _static_shape(x.ty), tuple(int(s) for s in w.value.shape)
    out_dtype = str(attrs.out_dtype) if attrs.out_dtype else "float32"
    if (xs is None or len(xs) != 4 or x.ty.dtype != "float32" or out_dtype not in ("", "float32")
            or ws[:2] != (3, 3) or ws[2] != xs[3] or min(ws[2], ws[3]) < MIN_CHANNELS):
        return None
    top, left, bottom, right = (int(p) for p in attrs.padding)
    out_h, out_w = xs[1] + top + bottom - 2, xs[2] + left + right - 2
    m = tile_size(out_h, out_w) if out_h > 0 and out_w > 0 else None
    if m is None:
        return None
    return m, xs[0], top, left, out_h, out_w


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.rewritten = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        plan = _plan(call)
        if plan is None:
            return call
        m, batch, top, left, out_h, out_w = plan
        bb = self.builder_
        u = relax.const(transform_weights(call.args[1].value.numpy(), m))
        v = bb.emit_te(input_transform, call.args[0], m, top, left, out_h, out_w,
                       primfunc_name_hint="winograd_input")
        mm = bb.emit(relax.op.matmul(v, u))
        self.rewritten += 1
        return bb.emit_te(output_transform, mm, m, batch, out_h, out_w, primfunc_name_hint="winograd_output")


@tvm.transform.module_pass(opt_level=0, name="kiln.MarkWinogradPatterns")
def MarkTransformPatterns(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (TVM pass naming)
    """Run after ``AnnotateTIROpPattern``: input transforms opaque (a producer inlined into them would
    be recomputed for every tile that reads it), output transforms injective so the convolution's
    epilogue (bias, ReLU, residual add) fuses into them."""
    for gv, func in list(mod.functions_items()):
        if isinstance(func, tirx.PrimFunc) and gv.name_hint.startswith("winograd_"):
            pattern = _INJECTIVE if gv.name_hint.startswith("winograd_output") else _OPAQUE
            mod[gv] = func.with_attr("op_pattern", pattern)
    return mod


@tvm.transform.module_pass(opt_level=0, name="kiln.WinogradConv")
def WinogradConv(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (TVM pass naming)
    """Rewrite eligible NHWC/HWIO 3x3 stride-1 convolutions into Winograd F(m, 3) (see module doc)."""
    from .graph_passes import mutate_functions

    rewriter = _Rewriter(mod)
    rewritten = mutate_functions(rewriter, mod)
    if not rewriter.rewritten:
        return mod
    mod = relax.transform.CanonicalizeBindings()(rewritten)  # no `y = lv` aliases: FuseOps stops at them
    return relax.transform.DeadCodeElimination()(mod)
