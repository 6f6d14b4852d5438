"""Kiln's GPU rule for sliding-window reductions: depthwise/grouped convolutions and pooling.

DLight's ``Matmul`` rule already treats dense convolutions as implicit GEMMs (shared-memory staged,
register tiled). What it rejects are convolutions whose reduction is a small window per output:
depthwise and grouped convolutions (3x3: 9 terms per output) and max/avg pooling. Those fell to
``GeneralReduction`` (a thread block per output element, most threads idle on a 9-term reduction)
or ``Fallback`` (one thread per output, but accumulating in global memory and the epilogue in a
separate pass over memory).

This rule gives each output element to one thread: the window is summed in a register, fully
unrolled, and the fused epilogue (bias, activation, residual add) is applied before the single store.
Threads of a warp take consecutive outputs along the innermost axis, so input reads and output
writes are coalesced in both NCHW and NHWC; the overlapping windows of neighbouring threads hit L1.
A shared-memory input tile would save L1 traffic for large windows: not done yet.
"""

from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.target import Target


def _vars(expr) -> set:
    import tvm_ffi

    found: list = []
    tvm_ffi.structural_walk(expr, (tirx.Var, found.append), order="post")
    return set(found)


def _is_windowed(block) -> bool:
    """Some read index combines a spatial and a reduction iterator (``h * stride + kh``)."""
    spatial = {iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.DataPar}
    reduce = {iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce}
    for region in block.reads:
        for rng in region.region:
            used = _vars(rng.min)
            if used & spatial and used & reduce:
                return True
    return False


class WindowedReduction(GPUScheduleRule):
    """One thread per output element for reductions over a small sliding window (see module doc)."""

    def __init__(self, max_window: int = 64, threads: int = 256):
        self.max_window = max_window
        self.threads = threads

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:  # noqa: C901
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = try_inline(sch, infos)
        reductions = [b for b in infos if b.is_reduction()]
        if len(reductions) != 1 or infos[0] is not reductions[0]:
            return None  # one reduction, nothing left before it (padding was inlined into its reads)
        if not all(b.is_injective() for b in infos[1:]):
            return None
        red = reductions[0].block_rv
        block = sch.get(red)
        window = [iv.dom.extent for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
        spatial = [iv.dom.extent for iv in block.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
        if not all(isinstance(e, tirx.IntImm) for e in window + spatial):
            return None
        if math.prod(int(e) for e in window) > self.max_window or not _is_windowed(block):
            return None
        try:
            store = sch.cache_write(red, 0, "local")  # accumulate in a register; this block stores
            while True:  # fold the elementwise epilogue into the store
                consumers = sch.get_consumers(store)
                if len(consumers) != 1:
                    break
                sch.reverse_compute_inline(consumers[0])
        except (s_tir.ScheduleError, RuntimeError):
            return None
        if sch.get_consumers(store):
            return None  # an epilogue that cannot be fused (e.g. a layout change): leave it to DLight
        total = math.prod(int(e) for e in spatial)
        threads = min(self.threads, max(32, 1 << (total - 1).bit_length()))
        bx, tx = sch.split(sch.fuse(*sch.get_loops(store)), factors=[None, threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        sch.compute_at(red, tx, preserve_unit_loops=True)
        loops = sch.get_loops(red)
        kinds = [iv.iter_type for iv in sch.get(red).iter_vars]
        r_loops = loops[len(loops) - sum(k == tirx.IterVar.CommReduce for k in kinds):]
        try:  # initialise the register before the window loop (else the init is a branch inside it)
            sch.decompose_reduction(red, r_loops[0])
        except s_tir.ScheduleError:
            pass
        sch.annotate(tx, "pragma_auto_unroll_max_step", self.max_window)
        sch.annotate(tx, "pragma_unroll_explicit", 1)
        return sch
