"""x86 default schedule for pooling: max/avg pool 2d, adaptive (incl. global) average/max pool.

Design
------
Pooling is memory bound: the schedule only has to stream the input once, in vectors, on every
core. With ``PREFERRED_LAYOUTS`` (conv.py) the activations are NHWC, so the innermost spatial
axis of a pool is the channel axis, contiguous in both input and output.

* The padding block is inlined into the pool (a select on the window load; no padded copy).
* The channel axis is split into vectors of ``L`` lanes (the target's vector width, reduced to
  a divisor of the channel count), and the window reduction loops (kh, kw) are moved inside the
  channel block, outside the vector: each output vector is accumulated in a register over the
  window and stored once (the accumulator is a ``local`` buffer / ``cache_write``).
* All outer spatial loops and the channel blocks are fused and run ``parallel``.
* The average's division (and any fused elementwise epilogue) is inlined into one block computed
  at the channel block (``reverse_compute_at``), vectorised.

The same schedule serves NCHW pools (then the vector runs along W, with strided loads) so a
model that keeps NCHW still gets parallel, vectorised pooling. Functions that are not a single
window reduction named like a pool return ``None``.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target
from tvm.s_tir.dlight import ScheduleRule

from targets import TargetDescription

from .conv import _as_int, lane_divisor, load_buffer, schedule_epilogue_vector


def _window_kinds(sch: s_tir.Schedule, block) -> int | None:
    """Number of leading spatial iters when the block is ``S..S R..R`` (at least one of each)."""
    stmt = sch.get(block)
    kinds = [int(iv.iter_type) for iv in stmt.iter_vars]
    if not kinds or 2 not in kinds:
        return None
    k = kinds.index(2)
    if k >= 1 and all(x == 0 for x in kinds[:k]) and all(x == 2 for x in kinds[k:]):
        return k
    return None


def _is_channels_last_sum_or_max(sch: s_tir.Schedule, block) -> bool:
    """``acc = acc + X[..., c]`` or ``acc = max(acc, X[..., c])`` where the innermost axis of the
    4-D input ``X`` is the innermost spatial iter: a global / spatial pooling of an NHWC tensor
    (``mean(x, axis=[1, 2])`` after layout conversion, what adaptive_avg_pool2d(1) becomes)."""
    from .conv import BufferLoadT, _loads

    stmt = sch.get(block)
    body = stmt.body
    if not isinstance(body, tirx.BufferStore) or stmt.init is None:
        return False
    val = body.value
    if not isinstance(val, (tirx.Add, tirx.Max)):
        return False
    loads = _loads(val)
    if len(loads) != 2:
        return False
    src = [ld for ld in loads if not load_buffer(ld).same_as(body.buffer)]
    if len(src) != 1 or len(src[0].indices) != 4:
        return False
    k = _window_kinds(sch, block)
    spatial = [iv.var for iv in stmt.iter_vars[:k]]
    last = src[0].indices[-1]
    return isinstance(last, tirx.Var) and last.same_as(spatial[-1]) and isinstance(src[0], BufferLoadT)


def _is_pool_block(sch: s_tir.Schedule, block) -> bool:
    if _window_kinds(sch, block) is None:
        return False
    if "pool" in sch.get(block).name_hint:
        return True
    return _is_channels_last_sum_or_max(sch, block)


class Pool(ScheduleRule):
    """Parallel, vectorised window reductions (max/avg/adaptive/global pooling); vector lanes from ``desc``."""

    def __init__(self, desc: TargetDescription):
        self.desc = desc

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):  # noqa: D102
        if not isinstance(func, tirx.PrimFunc) or target is None or target.kind.name != "llvm":
            return None
        try:
            return self._apply(func, target)
        except Exception:
            return None

    def _apply(self, func: tirx.PrimFunc, target: Target):
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        pools = [b for b in blocks if _is_pool_block(sch, b)]
        if len(pools) != 1:
            return None
        red = pools[0]
        idx = [i for i, b in enumerate(blocks) if sch.get(b).same_as(sch.get(red))][0]
        before, after = blocks[:idx], blocks[idx + 1 :]
        for b in before + after:
            if any(int(iv.iter_type) != 0 for iv in sch.get(b).iter_vars):
                return None
        stmt = sch.get(red)
        lanes = self.desc.vector_lanes(str(load_buffer(stmt.writes[0]).dtype))

        # padding (and any other producer) inlined into the window loads
        for b in reversed(before):
            try:
                sch.compute_inline(b)
            except Exception:
                pass
        # epilogue: fold into a single block
        kept = []
        for b in after[:-1]:
            try:
                sch.compute_inline(b)
            except Exception:
                kept.append(b)
        if after:
            kept.append(after[-1])

        kinds = [int(iv.iter_type) for iv in stmt.iter_vars]
        k = kinds.index(2)
        loops = sch.get_loops(red)
        if len(loops) != len(kinds):
            return None
        spatial, reduce_ = loops[:k], loops[k:]
        inner = spatial[-1]
        ext = _as_int(sch.get(inner).extent)
        if ext is None:
            return None
        vec = None
        if ext > 1:
            lv = ext if ext <= lanes else lane_divisor(ext, lanes)
            if lv > 1:
                co, vec = sch.split(inner, [None, lv])
                sch.reorder(*spatial[:-1], co, *reduce_, vec)
                outer = sch.fuse(*spatial[:-1], co)
            else:
                outer = sch.fuse(*spatial)
                sch.reorder(outer, *reduce_)
        else:
            outer = sch.fuse(*spatial)
        sch.parallel(outer)

        if kept:
            for b in kept:
                sch.reverse_compute_at(b, outer, preserve_unit_loops=True)
            sch.set_scope(red, 0, "local")
            for b in kept:
                schedule_epilogue_vector(sch, b, lanes)
        else:
            wb = sch.cache_write(red, 0, "local")
            sch.reverse_compute_at(wb, outer, preserve_unit_loops=True)
            schedule_epilogue_vector(sch, wb, lanes)
        if vec is not None:
            sch.vectorize(vec)
        sch.decompose_reduction(red, reduce_[0])
        return sch
