"""Default schedules for microcontroller kernels: RAM first, then simple loop tiling.

A fused kernel straight out of ``FuseTIR`` materialises every intermediate it computes (the padded
input of a convolution, the convolution result before its bias and ReLU, ...). On a host those
buffers are cheap; on a Cortex-M with 256 KB of RAM they are what decides whether a model fits,
because they become ``TVMBackendAllocWorkspace`` calls. The MCU schedule therefore:

1. inlines every spatial (injective) intermediate block into its consumers (``compute_inline``),
   padding included: the convolution reads its input through a bounds check instead of a copy;
2. for every remaining reduction block (convolution, matmul, pooling, mean, ...) whose result is an
   intermediate, moves its spatial consumers (bias, activation, residual add) under the reduction's
   innermost spatial loop (``reverse_compute_at``), so the intermediate shrinks to one element, a
   register, instead of a whole feature map;
   when the reduction reads no padding, the innermost output loop is also register-blocked: split by
   ``REGISTER_BLOCK``, moved inside the reduction loops and unrolled, so each loaded input feeds four
   accumulators (pointwise convolutions and matmuls ran in about half the instructions), with the
   accumulator initialisation hoisted out of the reduction (``decompose_reduction``);
3. unrolls short innermost reduction loops (the 3x3 window of a convolution) so the compiler sees
   straight-line multiply-accumulates.

Every primitive is checked by TVM's schedule verifier; a step that does not apply is skipped, so the
result is always equivalent to the input kernel.
"""

from __future__ import annotations

import logging

import tvm
from tvm import s_tir, tirx

log = logging.getLogger(__name__)

#: Reduction loops with at most this many iterations are unrolled.
UNROLL_MAX = 9
#: Outputs computed together by one pass over a reduction (each loaded input feeds this many
#: accumulators, which stay in registers); the innermost output loop is split by it.
REGISTER_BLOCK = 4


def _block_reduction(sch: s_tir.Schedule, block, width: int) -> None:
    """Split the innermost spatial loop of reduction ``block`` into ``width`` outputs computed together
    (moved inside the reduction loops and unrolled), move the spatial consumers under the remaining
    spatial loops, and hoist the accumulator initialisation out of the reduction loops."""
    ivs = sch.get(block).iter_vars
    loops = sch.get_loops(block)
    kinds = [iv.iter_type == tirx.IterVar.DataPar for iv in ivs]
    n_lead = kinds.index(False) if False in kinds else len(kinds)
    if len(loops) != len(ivs) or n_lead == 0 or any(kinds[n_lead:]):
        raise ValueError("not a fresh spatial-then-reduction block")
    spatial, reduce = list(loops[:n_lead]), list(loops[n_lead:])
    consumers = [c for c in sch.get_consumers(block) if _is_spatial(sch, c)]
    inner = None
    if width > 1 and reduce:
        ext = int(ivs[n_lead - 1].dom.extent)
        factor = ext if ext <= 2 * width else next((f for f in (width, 5, 3, 2) if ext % f == 0), 1)
        if factor <= 1:
            raise ValueError(f"no blocking factor for extent {ext}")
        if factor < ext:
            outer, inner = sch.split(spatial[-1], [None, factor])
            anchor = outer
        else:
            if n_lead < 2:
                raise ValueError("nothing left to anchor the epilogue at")
            inner, anchor = spatial[-1], spatial[-2]
        sch.reorder(*reduce, inner)
    else:
        anchor = spatial[-1]
    for consumer in consumers:
        sch.reverse_compute_at(consumer, anchor, preserve_unit_loops=True)
    if reduce and width > 1:
        init = sch.decompose_reduction(block, reduce[0])
        if inner is not None:
            sch.unroll(inner)
            sch.unroll(sch.get_loops(init)[-1])


def _is_spatial(sch: s_tir.Schedule, block) -> bool:
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def _reads_guarded(sch: s_tir.Schedule, block) -> bool:
    """True when the block reads through ``if_then_else`` (an inlined padding)."""
    return "if_then_else" in str(sch.get(block).body)


def _root_blocks(sch: s_tir.Schedule):
    return sch.get_child_blocks(sch.get_sblock("root"))


def schedule_kernel(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The MCU schedule of one fused kernel (see the module docstring); never changes results."""
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    # 1. inline spatial intermediates, producers first (repeat: inlining can enable more inlining)
    changed = True
    while changed:
        changed = False
        for block in _root_blocks(sch):
            if not _is_spatial(sch, block):
                continue
            try:
                sch.compute_inline(block)
                changed = True
                break
            except Exception:
                continue
    # 2. reductions: register-block the innermost output loop, keep epilogues in registers
    for name in [sch.get(b).name_hint for b in _root_blocks(sch)]:
        try:
            block = sch.get_sblock(name)
            if _is_spatial(sch, block):
                continue
        except Exception:
            continue
        trial = sch.copy()
        try:
            if _reads_guarded(sch, block):  # padded windows: blocking measured slower (bounds checks)
                raise ValueError("guarded (padded) reads")
            _block_reduction(trial, trial.get_sblock(name), REGISTER_BLOCK)
            sch = trial
        except Exception as err:  # keep the unblocked loops, still move the epilogue in
            log.debug("register blocking of %s skipped: %s", name, err)
            try:
                _block_reduction(sch, sch.get_sblock(name), 1)
            except Exception as err2:
                log.debug("epilogue of %s not moved: %s", name, err2)
    # 3. unroll short reduction windows
    for block in list(_root_blocks(sch)):
        try:
            ivs = sch.get(block).iter_vars
            loops = sch.get_loops(block)
        except Exception:
            continue
        if len(loops) != len(ivs):
            continue
        for lp, iv in zip(loops, ivs):
            ext = iv.dom.extent
            if iv.iter_type != tirx.IterVar.DataPar and isinstance(ext, tirx.IntImm) and 1 < int(ext) <= UNROLL_MAX:
                try:
                    sch.unroll(lp)
                except Exception:
                    pass
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_module(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every PrimFunc given the MCU schedule (Relax functions untouched)."""
    out = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            try:
                func = schedule_kernel(func)
            except Exception as err:  # pylint: disable=broad-except  # keep the plain loops: still correct
                log.warning("MCU schedule failed for %s (plain loops kept): %s", gv.name_hint, err)
        out[gv] = func
    return tvm.IRModule(out, attrs=mod.attrs, global_infos=mod.global_infos)
