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

On a core with a vector unit (the M55's Helium, ``vector_lanes`` 4) a float reduction that reads
every operand contiguously along its trailing output dimensions takes a *vector form* instead of
step 2's register blocks: those output loops are fused (up to ``VECTOR_SPAN`` outputs) and moved
innermost, under the reduction loops, as a plain loop over a row of accumulators
(``acc[i] += w * x[i]``), which gcc -O3 turns into Helium loads, multiplies and adds
(``vldrw.32``/``vmul.f32``/``vadd.f32`` on q registers; the toolchain builds M55 libraries at -O3).
Measured under QEMU (instructions): pointwise convolutions of the keyword-spotting CNN 676 K -> 414 K,
the zoo MLP 59 K -> 47 K. Padded windows (bounds checks in the loop), strided reads (a mean over
rows) and int8 reductions (gcc 12 does not vectorise the widening multiply-accumulate) keep the
scalar schedule.

Every primitive is checked by TVM's schedule verifier; a step that does not apply is skipped, so the
result is always equivalent to the input kernel.
"""

from __future__ import annotations

import logging
import re

import tvm
from tvm import s_tir, tirx

log = logging.getLogger(__name__)

#: Reduction loops with at most this many iterations are unrolled.
UNROLL_MAX = 9
#: Outputs computed together by one pass over a reduction (each loaded input feeds this many
#: accumulators, which stay in registers); the innermost output loop is split by it.
REGISTER_BLOCK = 4
#: Vector targets: the most outputs one row of accumulators holds (a stack array of floats).
VECTOR_SPAN = 256


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


def _vector_reduction(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Vector form of a float reduction (for cores with a vector unit, such as the M55's Helium):
    fuse the trailing spatial loops (up to ``VECTOR_SPAN`` outputs, at least ``lanes``), move that
    contiguous loop innermost, under the reduction loops, and keep it a loop (no unrolling), so the
    C compiler's loop vectoriser turns ``acc[i] += w * x[i]`` into vector loads, multiplies and adds;
    the epilogue runs per row of accumulators."""
    ivs = sch.get(block).iter_vars
    loops = sch.get_loops(block)
    kinds = [iv.iter_type == tirx.IterVar.DataPar for iv in ivs]
    n_lead = kinds.index(False) if False in kinds else len(kinds)
    if len(loops) != len(ivs) or n_lead < 2 or any(kinds[n_lead:]) or n_lead == len(kinds):
        raise ValueError("not a fresh spatial-then-reduction block with an outer spatial loop")
    body = sch.get(block).body
    if not hasattr(body, "buffer") or str(body.buffer.dtype) != "float32":
        raise ValueError("not a float32 reduction")  # gcc 12 does not vectorise the widening int8 MACs
    spatial, reduce = list(loops[:n_lead]), list(loops[n_lead:])
    extents = [int(iv.dom.extent) for iv in ivs[:n_lead]]
    k, span = n_lead - 1, extents[-1]
    while k > 1 and span * extents[k - 1] <= VECTOR_SPAN:
        k -= 1
        span *= extents[k]
    if span < lanes:
        raise ValueError(f"{span} outputs per row, fewer than {lanes} lanes")
    _check_contiguous(sch.get(block), [iv.var for iv in ivs[k:n_lead]], extents[k:])
    consumers = [c for c in sch.get_consumers(block) if _is_spatial(sch, c)]
    inner = sch.fuse(*spatial[k:]) if k < n_lead - 1 else spatial[-1]
    sch.reorder(*reduce, inner)
    for consumer in consumers:
        sch.reverse_compute_at(consumer, spatial[k - 1], preserve_unit_loops=True)
    sch.decompose_reduction(block, reduce[0])


def _check_contiguous(block, inner_vars, extents) -> None:
    """Raise unless every buffer ``block`` reads is indexed by ``inner_vars`` in its trailing dimensions
    (``v`` or ``v + offset``, the dimensions as long as the loops), so the fused inner loop walks it
    with stride 1, or not at all (a broadcast operand such as a weight)."""
    names = [v.name for v in inner_vars]
    for region in block.reads:
        buf = region.buffer if hasattr(region, "buffer") else region.source
        mins = [str(r.min) for r in region.region]
        uses = [i for i, m in enumerate(mins) if any(re.search(rf"\b{n}\b", m) for n in names)]
        if not uses:
            continue
        tail = list(range(len(mins) - len(names), len(mins)))
        shape = [int(d) if isinstance(d, tirx.IntImm) else -1 for d in buf.shape][-len(names):]
        unit_stride = all(m == v or (m.startswith(v + " + ") and not any(re.search(rf"\b{x}\b", m[len(v):])
                                                                       for x in names))
                          for m, v in zip([mins[i] for i in tail], names))
        if uses != tail or not unit_stride or shape != list(extents):
            raise ValueError(f"{buf.name} is not read contiguously along the fused inner loop")


def _is_spatial(sch: s_tir.Schedule, block) -> bool:
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def _reads_guarded(sch: s_tir.Schedule, block) -> bool:
    """True when the block reads through ``if_then_else`` (an inlined padding)."""
    return "if_then_else" in str(sch.get(block).body)


def _root_blocks(sch: s_tir.Schedule):
    return sch.get_child_blocks(sch.get_sblock("root"))


def schedule_kernel(func: tirx.PrimFunc, vector_lanes: int = 1) -> tirx.PrimFunc:
    """The MCU schedule of one fused kernel (see the module docstring); never changes results.
    ``vector_lanes`` > 1 (float32 lanes of the core's vector unit) picks the vector form of float
    reductions."""
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
        if vector_lanes > 1 and not _reads_guarded(sch, block):
            trial = sch.copy()
            try:
                _vector_reduction(trial, trial.get_sblock(name), vector_lanes)
                sch = trial
                continue
            except Exception as err:  # pylint: disable=broad-except
                log.debug("vector form of %s skipped: %s", name, err)
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


def schedule_module(mod: tvm.IRModule, vector_lanes: int = 1) -> tvm.IRModule:
    """``mod`` with every PrimFunc given the MCU schedule (Relax functions untouched)."""
    out = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            try:
                func = schedule_kernel(func, vector_lanes)
            except Exception as err:  # pylint: disable=broad-except  # keep the plain loops: still correct
                log.warning("MCU schedule failed for %s (plain loops kept): %s", gv.name_hint, err)
        out[gv] = func
    return tvm.IRModule(out, attrs=mod.attrs, global_infos=mod.global_infos)


def vector_lanes(desc) -> int:
    """float32 lanes of ``desc``'s vector unit: 4 with Helium's floating point (``mve.fp``), else 1."""
    return desc.vector_lanes("float32") if desc.has("mve.fp") else 1
