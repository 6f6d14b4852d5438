"""x86 default schedule for reductions: softmax, layer/RMS norm, mean/sum/max over axes, argmax.

Design
------
The kernel's blocks are first simplified: injective blocks with a single consumer are inlined into
it (reshapes, scalings, casts), trailing injective blocks are reverse-inlined into their producer
(e.g. ``broadcast_to`` after softmax); blocks with several consumers (softmax's ``exp``) stay, so
nothing expensive is recomputed. Two shapes are then handled:

**Row reductions** (every reduction reduces trailing axes, every block shares the leading spatial
axes: softmax, layer norm, mean over the last axes of NCHW): as in DLight's CPU ``Reduction``, the
shared leading spatial loops of the last block are fused and parallelised over the cores and every
other block is ``compute_at`` that loop, so one row's statistics and data stay in L1. Unlike
DLight's, the reductions themselves are vectorised: each is ``rfactor``-ed over a vector-lane inner
split of its (fused) reduction loop, giving ``lanes`` partial accumulators updated with whole-vector
loads and one short horizontal reduction at the end (done before ``compute_at`` because ``rfactor``
wants the block to own its loop nest). Injective blocks vectorise their inner axis. When the row
length is not a multiple of a power-of-two vector length the reduction is unrolled instead.

**Column reductions** (one reduction whose input is contiguous along a *spatial* axis, e.g. a
global average pool of NHWC ``[N, H, W, C] -> [N, C]``): the loops are reordered to
``spatial-outer, reduction..., spatial-inner`` and the contiguous spatial axis is vectorised, so
each step adds a whole vector of channels; the parallel loop is the outer spatial part (or the
outer split of the vectorised axis when that is all there is). The epilogue (the division of a
mean) is attached per tile.

The row path also serves matmul-vector against an ``[N, K]`` matrix (``y[n] = sum_k x[k] W[n, k]``,
delegated here by ``Matmul``): each output is a row reduction, rows in parallel, K vectorised.

Anything else (e.g. softmax over a non-innermost axis with several blocks), or any schedule
primitive refusing, returns ``None`` and the kernel falls through to ``Fallback``.
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func

from .elementwise import GuardedRule, PARALLEL_MIN_ELEMENTS, schedule_spatial_block

log = logging.getLogger(__name__)


def _int(x):
    return int(x) if isinstance(x, (int, tirx.IntImm)) else None


def _lead_s(kinds: str) -> int:
    return len(kinds) - len(kinds.lstrip("S"))


def _pow2_divisor(extent: int, lanes: int) -> int:
    v = lanes
    while v >= 4:
        if extent % v == 0:
            return v
        v //= 2
    return 1


class Reduction(GuardedRule):
    """Parallel rows, vectorised (rfactor) row reductions, vectorised column reductions."""

    # ------------------------------------------------------------------------------------------
    def _apply(self, func, target):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or any(set(b.dom_kind()) - {"S", "R"} for b in infos):
            return None
        if all(b.is_injective() for b in infos):
            return None
        self._simplify(sch, infos)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        if any(_int(d) is None for b in infos for d in b.dom()):
            return None  # dynamic shapes: fallback

        reductions = [b for b in infos if not b.is_injective()]
        # column reduction: a single reduction over axes that are not innermost in its input
        if len(reductions) == 1 and self._is_column(sch, reductions[0]):
            return self._column(sch, infos, reductions[0])
        return self._rows(sch, infos)

    @staticmethod
    def _simplify(sch, infos):
        """Inline single-consumer injective blocks; reverse-inline trailing injective blocks."""
        root = sch.get_sblock("root")
        outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
        for info in infos:
            if not info.is_injective() or info.name in outputs:
                continue
            try:
                if len(sch.get_consumers(info.block_rv)) == 1:
                    sch.compute_inline(info.block_rv)
            except Exception:  # pylint: disable=broad-except
                pass
        # trailing copies (broadcast_to / reshape after softmax): fold into the injective producer
        for info in reversed(infos):
            try:
                blk = sch.get_sblock(info.name)
            except Exception:  # pylint: disable=broad-except
                continue
            if info.name not in outputs or not info.is_injective():
                continue
            prods = sch.get_producers(blk)
            if len(prods) != 1:
                continue
            pinfo = [i for i in infos if i.name == sch.get(prods[0]).name_hint]
            if not pinfo or not pinfo[0].is_injective():
                continue
            try:
                sch.reverse_compute_inline(blk)
            except Exception:  # pylint: disable=broad-except
                pass

    # -- row reductions -------------------------------------------------------------------------
    def _rows(self, sch, infos):
        kinds = [b.dom_kind() for b in infos]
        for k in kinds:
            if not k or k[0] != "S":
                return None
            if "R" in k and k[_lead_s(k):].count("S"):
                return None  # a spatial axis inside the reduction: not a row reduction
        lead = min(_lead_s(k) for k in kinds)
        # the shared leading loops must have equal extents
        ext0 = [_int(d) for d in infos[-1].dom()[:lead]]
        for b in infos:
            if [_int(d) for d in b.dom()[:lead]] != ext0:
                return None
        rows = 1
        for e in ext0:
            rows *= e
        size = max(_prod([_int(d) for d in b.dom()]) for b in infos)

        # 1. vectorised partial reductions (rfactor) while every block still owns its loops
        plan = []  # (block name, kind) in program order
        for b in infos:
            if b.is_injective():
                plan.append((b.name, "S"))
                continue
            dtype = sch.get(b.block_rv).writes[0].source.dtype
            lanes = self.desc.vector_lanes(dtype)
            lps = sch.get_loops(b.block_rv)
            rloops = lps[_lead_s(b.dom_kind()):]
            r = sch.fuse(*rloops) if len(rloops) > 1 else rloops[0]
            rext = _int(sch.get(r).extent)
            vec = _pow2_divisor(rext, lanes) if rext is not None else 1
            done = False
            if vec > 1 and rext >= 2 * vec:
                try:
                    ro, ri = sch.split(r, factors=[None, vec])
                    rf = sch.rfactor(ri, factor_axis=len(sch.get(b.block_rv).writes[0].region))
                    plan.append((sch.get(rf).name_hint, "RF"))
                    plan.append((b.name, "WB"))
                    done = True
                except Exception:  # pylint: disable=broad-except
                    done = False
            if not done:
                plan.append((b.name, "R"))

        # 2. parallel rows on the last block, everything else computed per row
        last = sch.get_sblock(plan[-1][0])
        loops = sch.get_loops(last)
        par = sch.fuse(*loops[:lead]) if lead > 1 else loops[0]
        for name, _ in reversed(plan[:-1]):
            sch.compute_at(sch.get_sblock(name), par, preserve_unit_loops=True)
        if rows >= 2 and size >= PARALLEL_MIN_ELEMENTS // 4:
            sch.parallel(par)

        # 3. per-block inner treatment
        for name, kind in plan:
            blk = sch.get_sblock(name)
            lps = sch.get_loops(blk)[1:]
            if not lps:
                continue
            dtype = sch.get(blk).writes[0].source.dtype
            lanes = self.desc.vector_lanes(dtype)
            if kind in ("RF", "WB") and len(lps) > 1:
                # compute_at lays loops out in block-iter order, where rfactor put the factored
                # (vector) axis first: make it innermost
                sch.reorder(*lps[1:], lps[0])
                lps = sch.get_loops(blk)[1:]
            if kind == "S":
                _vectorize_inner(sch, blk, lps, lanes)
            elif kind == "RF":
                # loops: [unit spatial...] ro, ri  -> vectorise ri (spatial in the rf block)
                sch.vectorize(lps[-1])
                sch.decompose_reduction(blk, lps[-2])
            elif kind == "WB":
                sch.unroll(lps[-1])
                sch.decompose_reduction(blk, lps[-1])
            else:
                inner = lps[-1]
                ext = _int(sch.get(inner).extent)
                if ext is not None and ext > lanes:
                    _, inner = sch.split(inner, factors=[None, lanes])
                sch.unroll(inner)
        return sch

    # -- column reductions ----------------------------------------------------------------------
    @staticmethod
    def _is_column(sch, info) -> bool:
        stmt = sch.get(info.block_rv)
        kind_of = {it.var: it.kind for it in info.iters}
        for region in stmt.reads:
            last = region.region[-1].min if region.region else None
            if isinstance(last, tirx.Var) and kind_of.get(last) == "S" and "R" in info.dom_kind():
                # read contiguous along a spatial axis: vectorise that axis
                return True
        return False

    def _column(self, sch, infos, red):
        stmt = sch.get(red.block_rv)
        kind_of = {it.var: it.kind for it in red.iters}
        # the contiguous spatial axis (last index of the biggest read)
        reads = sorted(stmt.reads, key=lambda r: -len(r.region))
        vvar = reads[0].region[-1].min
        if not isinstance(vvar, tirx.Var) or kind_of.get(vvar) != "S":
            return None
        red_pos = [i for i, b in enumerate(infos) if b.name == red.name][0]
        producers = [b.block_rv for b in infos[:red_pos]]
        consumers = [b.block_rv for b in infos[red_pos + 1 :]]
        for p in reversed(producers):
            sch.compute_inline(p)  # raises (-> None) if impossible
        loops = sch.get_loops(red.block_rv)
        s_loops, r_loops, v_loop = [], [], None
        for it, lp in zip(red.iters, loops):
            if it.var.same_as(vvar):
                v_loop = lp
            elif it.kind == "S":
                s_loops.append(lp)
            else:
                r_loops.append(lp)
        sch.reorder(*s_loops, *r_loops, v_loop)
        dtype = stmt.writes[0].source.dtype
        lanes = self.desc.vector_lanes(dtype)
        vext = _int(sch.get(v_loop).extent)
        vec = lanes if vext % lanes == 0 else _pow2_divisor(vext, lanes)
        if vec <= 1:
            vec = vext if vext < lanes else 1
        if vec > 1 and vec < vext:
            vo, vi = sch.split(v_loop, factors=[None, vec])
        elif vec > 1:
            vo, vi = None, v_loop
        else:
            vo, vi = v_loop, None
        outer = s_loops + ([vo] if vo is not None else [])
        sch.reorder(*outer, *r_loops, *([vi] if vi is not None else []))
        par = sch.fuse(*outer) if len(outer) > 1 else (outer[0] if outer else None)
        if vi is not None:
            sch.vectorize(vi)
        if par is not None and _int(sch.get(par).extent) and _int(sch.get(par).extent) > 1:
            sch.parallel(par)
        if r_loops:
            sch.decompose_reduction(red.block_rv, r_loops[0])
        for c in consumers:
            attached = False
            if par is not None:
                try:
                    sch.reverse_compute_at(c, par, preserve_unit_loops=True)
                    attached = True
                    lps = sch.get_loops(c)[1:]
                    if lps:
                        _vectorize_inner(sch, c, lps, lanes)
                except Exception:  # pylint: disable=broad-except
                    attached = False
            if not attached:
                schedule_spatial_block(sch, c, self.desc)
        return sch


def _prod(xs):
    out = 1
    for x in xs:
        out = out * x
    return out


def _vectorize_inner(sch, blk, lps, lanes):
    inner = lps[-1]
    ext = _int(sch.get(inner).extent)
    if ext is None or ext < 2:
        return
    if ext > lanes:
        vec = _pow2_divisor(ext, lanes)
        if vec <= 1:
            return
        _, inner = sch.split(inner, factors=[None, vec])
    sch.vectorize(inner)
