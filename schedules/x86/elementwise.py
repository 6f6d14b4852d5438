"""x86 default schedules for injective kernels, plus the catch-all fallback.

``Elementwise`` — kernels whose blocks are all spatial (elementwise chains, transpose/permute,
concat, split, reshape copies, resize, pad, layout_transform, take/gather, where, cast):

1. every intermediate block is inlined into its consumer (``compute_inline``, then
   ``reverse_compute_inline``), so normally one block per output remains;
2. each remaining block: the innermost loop is split by ``vec`` (the target's vector lanes for the
   output dtype, or the largest power of two that divides the innermost extent, so vectors never
   straddle rows and loads stay contiguous ramps), the ``vec`` loop is vectorised, all the other loops
   are fused into one loop which is parallelised over the cores when the kernel is big enough to pay
   for the thread-pool wake-up (otherwise it is left serial, still vectorised).

``Fallback`` — anything no other rule took. For every block at the root it parallelises the leading
data-parallel loops (fused) and, for purely spatial blocks, uses the elementwise treatment above.
Every primitive is checked by TVM's schedule verifier (an illegal one raises and is skipped), so the
result is always equivalent to the input; when nothing can be done it returns ``None``.
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.s_tir.dlight import ScheduleRule
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.target import Target

from targets import TargetDescription

log = logging.getLogger(__name__)

#: Kernels with fewer output elements than this stay on one core (thread wake-up costs ~5-10 us).
PARALLEL_MIN_ELEMENTS = 8192


def _int(x):
    return int(x) if isinstance(x, (int, tirx.IntImm)) else None


def _block_dtype(sch: s_tir.Schedule, block) -> str:
    stmt = sch.get(block)
    if stmt.writes:
        return stmt.writes[0].source.dtype
    return "float32"


def _vec_factor(extent: int | None, lanes: int) -> int:
    """Vector length for an innermost loop of ``extent``: ``lanes`` if it divides, else the largest
    power of two (>= 2) that divides the extent, else 1 (no vectorisation)."""
    if extent is None or extent < 2:
        return 1
    if extent % lanes == 0:
        return lanes
    v = lanes // 2
    while v >= 2:
        if extent % v == 0:
            return v
        v //= 2
    return extent if extent < lanes and extent >= 2 else 1


def schedule_spatial_block(sch: s_tir.Schedule, block, desc: TargetDescription) -> bool:
    """Parallelise and vectorise one spatial block that owns its loop nest (``desc``'s vector lanes
    for the block's dtype). Returns True when changed."""
    loops = sch.get_loops(block)
    if not loops:
        return False
    exts = [_int(sch.get(lp).extent) for lp in loops]
    lanes = desc.vector_lanes(_block_dtype(sch, block))
    total = 1
    for e in exts:
        total = total * e if (e is not None and total is not None) else None
    changed = False
    vec_loop = None
    vec = _vec_factor(exts[-1], lanes)
    outer = list(loops)
    if vec > 1:
        try:
            if vec == exts[-1]:
                vec_loop = loops[-1]
                outer = list(loops[:-1])
            else:
                a, vec_loop = sch.split(loops[-1], factors=[None, vec])
                outer = list(loops[:-1]) + [a]
        except Exception:  # pylint: disable=broad-except
            vec_loop, outer = None, list(loops)
    fused = None
    if outer:
        try:
            fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        except Exception:  # pylint: disable=broad-except
            fused = outer[0]
    if vec_loop is not None:
        try:
            sch.vectorize(vec_loop)
            changed = True
        except Exception:  # pylint: disable=broad-except
            pass
    if fused is not None and (total is None or total >= PARALLEL_MIN_ELEMENTS):
        try:
            sch.parallel(fused)
            changed = True
        except Exception:  # pylint: disable=broad-except
            pass
    return changed


def _read_strides(sch: s_tir.Schedule, block) -> list[int] | None:
    """For each iterator of ``block`` (one loop each), how far one step moves the flat address of the
    largest buffer it reads (div/mod indices measured at the origin: ``w // 2`` moves 0, ``w % 2`` one)."""
    import tvm.sym

    from .conv import _loads, load_buffer

    stmt = sch.get(block)
    loads = _loads(stmt.body)
    if not loads:
        return None
    load = max(loads, key=lambda ld: _size(load_buffer(ld)) or 0)
    shape = [_int(d) for d in load_buffer(load).shape]
    if None in shape:
        return None
    flat = tirx.const(0, "int64")
    for i, idx in enumerate(load.indices):
        step = 1
        for d in shape[i + 1:]:
            step *= d
        flat = flat + tirx.Cast("int64", idx) * step
    ivs = [iv.var for iv in stmt.iter_vars]

    def at(one) -> int | None:  # the flat address with every iterator 0 but ``one`` (1)
        analyzer = tvm.sym.Analyzer()
        for v in ivs:
            analyzer.bind(v, tirx.const(1 if v.same_as(one) else 0, _expr_dtype(v)))
        return _int(analyzer.simplify(flat))

    base = at(None)
    strides = []
    for v in ivs:
        moved = at(v)
        if moved is None or base is None:
            return None
        strides.append(moved - base)
    return strides


def _size(buf) -> int | None:
    total = 1
    for d in buf.shape:
        d = _int(d)
        if d is None:
            return None
        total *= d
    return total


def schedule_transposing_block(sch: s_tir.Schedule, block, desc: TargetDescription) -> bool:
    """A spatial block that writes along one axis and reads its largest input along another (a
    transpose, NHWC -> NCHW, depth-to-space...): tile both, ``(outer axes) x [read axis] x [lanes of the
    write axis]``, so each tile reads whole cache lines and writes whole vectors. Left to
    :func:`schedule_spatial_block` (which would walk the input with a large stride once per element of
    the read axis: 16x the memory traffic for a 64-channel NHWC -> NCHW copy) unless the innermost axis
    reads with a stride other than 1 and another axis reads contiguously. Returns True when it
    scheduled the block."""
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    if len(loops) != len(stmt.iter_vars) or len(loops) < 2:
        return False
    exts = [_int(sch.get(lp).extent) for lp in loops]
    strides = _read_strides(sch, block)
    if strides is None or None in exts or abs(strides[-1]) == 1:
        return False
    # each loop must drive exactly its own iterator (true after inlining into a fresh output block)
    for lp, iv in zip(loops, stmt.iter_vars):
        if _int(sch.get(lp).extent) != _int(iv.dom.extent):
            return False
    contiguous = [i for i, st in enumerate(strides[:-1]) if abs(st) == 1 and exts[i] > 1]
    if not contiguous:
        return False
    lanes = desc.vector_lanes(_block_dtype(sch, block))
    vec = _vec_factor(exts[-1], lanes)
    if vec < 2:
        return False
    c = contiguous[0]
    w_out, w_in = sch.split(loops[-1], factors=[None, vec])
    outer = [lp for i, lp in enumerate(loops[:-1]) if i != c] + [w_out]
    sch.reorder(*outer, loops[c], w_in)
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    total = 1
    for e in exts:
        total *= e
    if total >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(fused)
    sch.vectorize(w_in)
    return True


def _inline_all(sch: s_tir.Schedule, blocks: list) -> list:
    """Inline every block that can be inlined; return those that remain (outputs, mostly)."""
    remaining = list(blocks)
    progress = True
    while progress and len(remaining) > 1:
        progress = False
        for fn in (sch.compute_inline, sch.reverse_compute_inline):
            for b in list(remaining):
                try:
                    fn(b)
                except Exception:  # pylint: disable=broad-except
                    continue
                remaining.remove(b)
                progress = True
                break
            if progress:
                break
    return remaining


class GuardedRule(ScheduleRule):
    """Base of Kiln's LLVM rules: ``apply`` declines (returns None) for non-LLVM targets and for any
    function on which a schedule primitive fails, so the next rule gets its turn. Subclasses write
    ``_apply(func, target) -> Schedule | None`` and read the target's facts (vector lanes, registers,
    caches, cores) from ``self.desc``, the description the rule was made for."""

    def __init__(self, desc: TargetDescription):
        self.desc = desc

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        try:
            return self._apply(func, target)
        except Exception as err:  # pylint: disable=broad-except
            log.debug("%s rule declined: %s", type(self).__name__, err)
            return None

    def _apply(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        raise NotImplementedError


class Elementwise(GuardedRule):
    """Injective kernels: inline into the outputs, vectorise the contiguous axis, parallelise the rest."""

    def _apply(self, func, target):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not all(b.is_injective() for b in infos):
            return None
        remaining = _inline_all(sch, [b.block_rv for b in infos])
        for b in remaining:
            if not schedule_transposing_block(sch, b, self.desc):
                schedule_spatial_block(sch, b, self.desc)
        return sch


class Fallback(GuardedRule):
    """Anything left: parallelise the leading data-parallel loops of every root block, vectorise
    purely spatial blocks. Never changes semantics (TVM verifies each primitive)."""

    def _apply(self, func, target):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        changed = False
        if infos is not None:
            for info in infos:
                kinds = info.dom_kind()
                if kinds and all(k == "S" for k in kinds):
                    changed |= schedule_spatial_block(sch, info.block_rv, self.desc)
                    continue
                lead = len(kinds) - len(kinds.lstrip("S"))
                if lead == 0:
                    continue
                lps = info.get_loops()[:lead]
                try:
                    fused = sch.fuse(*lps) if len(lps) > 1 else lps[0]
                    sch.parallel(fused)
                    changed = True
                except Exception:  # pylint: disable=broad-except
                    pass
        else:
            root = sch.get_sblock("root")
            for blk in sch.get_child_blocks(root):
                lps = sch.get_loops(blk)
                if not lps:
                    continue
                try:
                    sch.parallel(lps[0])
                    changed = True
                except Exception:  # pylint: disable=broad-except
                    pass
        return sch if changed else None


# ----------------------------------------------------------------------------------------------
# Vectorisable transcendental functions
# ----------------------------------------------------------------------------------------------
#
# TVM's LLVM lowering maps ``exp``/``tanh``/``sigmoid`` to LLVM intrinsics and ``erf`` to libm's
# ``erff``; without a vector math library LLVM scalarises them, so a vectorised GELU/softmax/SiLU
# kernel still makes one libm call per element (erf: 3.0 ms for 128x1536 floats, 28x slower than
# the polynomial below). These rules lower the float32 (and float16, computed in float32) forms to
# branch-free polynomial / rational approximations that LLVM vectorises (the same approximations as
# TOPI's ``fast_exp``/``fast_erf``/``fast_tanh``: max relative error about 3e-7). Other dtypes keep
# TVM's default lowering. The rules are registered for the ``llvm`` target kind once per process by
# ``install_vector_math`` (via ``schedules.install_hooks``; TVM's intrinsic-lowering table is process-global).


def _expr_dtype(e) -> str:
    try:
        return str(e.dtype)
    except Exception:  # pylint: disable=broad-except
        return str(e.ty.dtype)


def _const(v, like):
    return tirx.const(v, _expr_dtype(like))


def _horner(x, coeffs):
    acc = _const(coeffs[0], x)
    for c in coeffs[1:]:
        acc = acc * x + _const(c, x)
    return acc


def _exp_f32(x):
    import tvm.sym

    lanes = tvm.DataType(_expr_dtype(x)).lanes
    xc = tirx.max(tirx.min(x, _const(88.3762626647950, x)), _const(-88.3762626647949, x))
    n = tirx.floor(xc * _const(1.44269504088896341, x) + _const(0.5, x))
    f = xc - n * _const(0.6931471805599453, x)
    p = _horner(f, [1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                    1.6666665459e-1, 5.0000001201e-1])
    y = p * f * f + f + _const(1.0, x)
    idt = "int32" if lanes == 1 else f"int32x{lanes}"
    two_n = tirx.reinterpret(_expr_dtype(x), tirx.shift_left(tirx.Cast(idt, n + _const(127.0, x)),
                                                               tirx.const(23, idt)))
    return tirx.max(two_n * y, x)


def _erf_f32(x):
    xc = tirx.max(tirx.min(x, _const(4.0, x)), _const(-4.0, x))
    x2 = xc * xc
    p = _horner(x2, [-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
                     -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
                     -1.60960333262415e-02]) * xc
    q = _horner(x2, [-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
                     -7.37332916720468e-03, -1.42647390514189e-02])
    return p / q


def _tanh_f32(x):
    xc = tirx.max(tirx.min(x, _const(9.0, x)), _const(-9.0, x))
    x2 = xc * xc
    p = _horner(x2, [-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
                     5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
                     4.89352455891786e-03]) * xc
    q = _horner(x2, [1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
                     4.89352518554385e-03])
    return p / q


def _sigmoid_f32(x):
    one = _const(1.0, x)
    return one / (one + _exp_f32(-x))


def _lowering(fn32):
    def rule(op):
        import tvm

        x = op.args[0]
        dt = tvm.DataType(_expr_dtype(x))
        base = _expr_dtype(x).split("x")[0]
        if base == "float32":
            return fn32(x)
        if base == "float16":
            f32 = "float32" if dt.lanes == 1 else f"float32x{dt.lanes}"
            return tirx.Cast(_expr_dtype(x), fn32(tirx.Cast(f32, x)))
        return op

    return rule


_VECTOR_MATH_INSTALLED = False


def install_vector_math() -> None:
    """Register the vectorisable exp/erf/tanh/sigmoid lowerings for LLVM targets (idempotent)."""
    global _VECTOR_MATH_INSTALLED  # pylint: disable=global-statement
    if _VECTOR_MATH_INSTALLED:
        return
    for name, fn in (("exp", _exp_f32), ("erf", _erf_f32), ("tanh", _tanh_f32), ("sigmoid", _sigmoid_f32)):
        tirx.register_intrin_lowering(f"tirx.{name}", "llvm", f=_lowering(fn), level=99)
    _VECTOR_MATH_INSTALLED = True

