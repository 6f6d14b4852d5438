"""x86 default schedule for matmul-like kernels: dense, plain / batched matmul, matmul-vector.

Design
------
Any fused PrimFunc with exactly one reduction block of the form ``C[S, I, J] += A[S, I, K] * B[S, J, K]``
(in any index order and with any number of axes per role; ``_iter_kinds`` classifies each block iter
by the buffers it indexes) plus injective producers and epilogues (bias add, GELU, residual add,
scaling, casts) is scheduled as a register-blocked GEMM:

* Roles: batch ``S`` (in A, B and C), rows ``I`` (A and C), columns ``J`` (B and C), reduction ``K``.
  The innermost ``I`` and ``J`` loops are tiled; other ``I``/``J`` loops become outer loops (tiles
  never straddle a row of the output, so the epilogue attached to a tile is exact); ``K`` loops are
  fused into one.
* The ``MR x NR`` output tile (``MR`` rows, ``NR = NV x vec`` columns) is the micro-kernel: its
  accumulator is a ``local`` buffer whose loops are unrolled and vectorised, so LLVM keeps it in vector
  registers (checked in the assembly: for 8 x 2 vectors, 16 zmm accumulators and per ``k`` 8 broadcasts,
  2 loads, 16 FMAs, no spills).
  Per ``k``: ``MR`` broadcasts of ``A``, ``NV`` vector loads of ``B``, ``MR x NV`` FMAs. ``vec`` is the
  target's lanes (``llvm_get_vector_width``; 16 x f32 with AVX-512, 8 with AVX2) or, when N is not a
  multiple, the largest power of two >= 4 that divides N (a guard on the vector lanes would make the
  vectoriser fall back to scalar code); ``MR``/``NV`` follow the register count (32 vector registers
  with AVX-512, 16 otherwise), preferring an ``MR`` that divides the row count: 8 x 3 vectors on
  AVX-512 (8 x 2 when N is not a multiple of 48), 4-6 x 2 on AVX2.
* ``B`` contiguous along ``J`` (``[K, N]``: the layout ``nn.Linear`` weights reach TIR in, FoldConstant
  having folded the transpose of the constant). Read in place, each ``K x NR`` panel is a walk down K
  rows with a stride of N floats, which the hardware prefetchers do not follow across pages: with the
  weights not in cache (the normal case inside a model) that measured 1.5x slower than with them hot.
  So when B is 2-D and at least ``stream_min_bytes`` (256 KiB) and there are at least
  ``stream_min_rows`` (16) rows, each core first copies its share of the columns into contiguous
  ``[N/NR, K, NR]`` panels (``cache_read`` + ``transform_layout`` + ``compute_at`` the per-core loop;
  the copy reads whole row segments and is vectorised), then runs the micro-kernel over the panels
  (BERT's FFN GEMMs: 1.37 -> 0.99 ms cold). Small B is read in place, panel loop outside the row
  loop so the panel stays in L1/L2 for all row tiles. ``B`` contiguous along ``K`` (``[N, K]``, "NT",
  a non-constant transposed operand) is packed per column panel into ``[K, NR]``, reused by every
  row tile of the panel.
* Loop nest ``batch, J-outer, j_panel, I-outer, i_tile | k | i_inner, j_vec_outer, j_vec``: the loops
  left of ``|`` are fused and parallelised over the cores (only above ``PARALLEL_MIN_MACS``; tiny
  kernels stay on one core), the epilogue is ``reverse_compute_at`` the tile loop so it runs on the tile
  while it is in registers/L1, and the full-size intermediate disappears.
* Producers (reshapes/transposes of the inputs fused in by FuseOps) are inlined; anything that can
  not be inlined or attached gets a plain parallel + vectorised loop at the root.
* Matmul-vector (one row, e.g. a classifier head) against a large ``[K, N]`` matrix is memory
  bound: loops ``column-chunk per core | k | columns (vectorised)`` read B row by row (contiguous
  segments) into a per-core accumulator segment that stays in L1 (1x1000x512 with cold weights:
  0.30 -> 0.08 ms). Small ones use the tile kernel with ``MR = 1`` and up to 4 column vectors.
  Against an ``[N, K]`` matrix it is a dot product per output, scheduled by ``Reduction`` (rows in
  parallel, K vectorised).
* Conv-like kernels (several ``I`` and ``K`` axes, padded input) also match; they normally go to the
  Conv2D rule first, but the implicit-GEMM schedule here is exact if one reaches it.

The rule returns ``None`` (so the next rule gets the kernel) for anything it does not recognise,
dynamic shapes, or when a schedule primitive refuses; it never raises.
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.gpu.matmul import IterKind
from tvm.tirx.analysis import undefined_vars
from tvm.target import Target

from .elementwise import GuardedRule, schedule_spatial_block, vector_bits, vector_lanes

log = logging.getLogger(__name__)

#: Below this many multiply-adds a kernel runs on one core (the thread-pool wake-up costs more).
PARALLEL_MIN_MACS = 1 << 19


def _int(x):
    return int(x) if isinstance(x, (int, tirx.IntImm)) else None


def _index_vars(region) -> list:
    """The variables each dimension of an access region is indexed by (None when not a plain var)."""
    out = []
    for r in region:
        out.append(r.min if isinstance(r.min, tirx.Var) else None)
    return out


def _iter_kinds(stmt) -> dict | None:
    """Role of each block iter in ``C[S, I, J] += A[S, I, K] * B[S, J, K]`` (any index order).

    Like DLight's ``detect_iter_traits`` but an ``I`` axis of extent 1 stays ``I`` (matmul-vector),
    and a kernel without ``I`` axes (``y[n] = sum_k x[k] W[k, n]``) is accepted."""
    if len(stmt.reads) != 2 or len(stmt.writes) != 1:
        return None

    def axes(region):
        out = set()
        for r in region:
            if not (isinstance(r.extent, tirx.IntImm) and r.extent.value == 1):
                return None
            out |= set(undefined_vars(r.min))
        return out

    a_axes, b_axes, c_axes = axes(stmt.reads[0].region), axes(stmt.reads[1].region), axes(stmt.writes[0].region)
    if a_axes is None or b_axes is None or c_axes is None:
        return None
    kinds = {}
    for iv in stmt.iter_vars:
        v = iv.var
        if iv.iter_type == tirx.IterVar.DataPar:
            if v in c_axes and v in a_axes and v in b_axes:
                kind = IterKind.kIter_S
            elif v in c_axes and v in a_axes:
                kind = IterKind.kIter_I
            elif v in c_axes and v in b_axes:
                kind = IterKind.kIter_J
            elif isinstance(iv.dom.extent, tirx.IntImm) and iv.dom.extent.value == 1:
                kind = IterKind.kIter_T
            else:
                return None
        elif iv.iter_type == tirx.IterVar.CommReduce:
            if v in a_axes and v in b_axes and v not in c_axes:
                kind = IterKind.kIter_K
            else:
                return None
        else:
            return None
        kinds[v] = kind
    present = set(kinds.values())
    if IterKind.kIter_J not in present or IterKind.kIter_K not in present:
        return None
    return kinds


def _gemv_rows_impl(self, sch, main_rv, func, target, unit_loops, j_loop, k_loop, vec, cores, epilogue, lanes,
                    leftover_producers, macs):
    jt, jo, jv = sch.split(j_loop, factors=[cores, None, vec])
    sch.reorder(*unit_loops, jt, k_loop, jo, jv)
    par = sch.fuse(*unit_loops, jt) if unit_loops else jt
    if macs >= PARALLEL_MIN_MACS:
        sch.parallel(par)
    attached = _attach_epilogue(sch, main_rv, epilogue, par, target)
    sch.vectorize(jv)
    sch.decompose_reduction(main_rv, k_loop)
    for e in attached:
        _vectorize_tail(sch, e, lanes, par)
    for p in leftover_producers:
        schedule_spatial_block(sch, p, target)
    return sch


def _chunks(units: int, cores: int) -> int:
    """The largest number of equal column chunks (at most ``cores``) that ``units`` splits into."""
    for d in range(max(cores, 1), 0, -1):
        if units % d == 0:
            return d
    return 1


def _num_cores(target: Target) -> int:
    try:
        return max(1, int(target.attrs.get("num-cores", 1) or 1))
    except Exception:  # pylint: disable=broad-except
        return 1


def _pick_mr(m: int, max_mr: int) -> int:
    """Rows per micro-kernel: the largest divisor of ``m`` in [max_mr/2, max_mr], else ``max_mr``."""
    if m <= max_mr:
        return m
    for mr in range(max_mr, max(max_mr // 2, 1) - 1, -1):
        if m % mr == 0:
            return mr
    return max_mr


def _attach_epilogue(sch, main_rv, epilogue: list, loop, target: Target) -> list:
    """Compute the epilogue blocks (or, without any, a register cache of the result) per tile
    under ``loop``; when all of them attach, the main block accumulates in registers.
    Returns the blocks that were attached under ``loop``."""
    writes_local = not epilogue
    if writes_local:
        epilogue = [sch.cache_write(main_rv, 0, "local")]
    attached = []
    for e in epilogue:
        try:
            sch.reverse_compute_at(e, loop, preserve_unit_loops=True)
            attached.append(e)
        except Exception:  # pylint: disable=broad-except
            schedule_spatial_block(sch, e, target)
    if not writes_local and len(attached) == len(epilogue):
        try:
            sch.set_scope(main_rv, 0, "local")
        except Exception:  # pylint: disable=broad-except
            pass
    return attached


class Matmul(GuardedRule):
    """Register-blocked, vectorised, parallel GEMM / batched GEMM / GEMV with fused epilogues."""

    def __init__(self, max_rows: int | None = None, max_col_vectors: int | None = None,
                 stream_pack: bool = True, stream_min_rows: int = 16, stream_min_bytes: int = 256 << 10):
        self.max_rows = max_rows
        self.max_col_vectors = max_col_vectors
        self.stream_pack = stream_pack
        self.stream_min_rows = stream_min_rows
        self.stream_min_bytes = stream_min_bytes

    _gemv_rows = _gemv_rows_impl

    # ------------------------------------------------------------------------------------------
    def _apply(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        reductions = [b for b in infos if not b.is_injective()]
        if len(reductions) != 1 or any(set(b.dom_kind()) - {"S", "R"} for b in infos):
            return None
        main = reductions[0]
        main_rv = main.block_rv
        stmt = sch.get(main_rv)
        kind_of = _iter_kinds(stmt)
        if kind_of is None:
            return None
        if any(_int(i.dom) is None for i in main.iters):
            return None  # dynamic shapes: leave to the fallback
        # the output must be contiguous along a column (J) axis so tiles store whole vectors
        c_vars = _index_vars(stmt.writes[0].region)
        if not c_vars or c_vars[-1] is None or kind_of.get(c_vars[-1]) != IterKind.kIter_J:
            return None
        b_vars = _index_vars(stmt.reads[1].region)
        b_last = kind_of.get(b_vars[-1]) if b_vars and b_vars[-1] is not None else None
        # B is [.., N, K]: pack column panels to [K, NR]
        pack_b = (b_last == IterKind.kIter_K and len(b_vars) >= 2 and b_vars[-2] is not None
                  and kind_of.get(b_vars[-2]) == IterKind.kIter_J)
        b_buffer = stmt.reads[1].source

        out_dtype = stmt.writes[0].source.dtype
        lanes = vector_lanes(target, out_dtype)
        nregs = 32 if vector_bits(target) >= 512 else 16

        block_names = [sch.get(b.block_rv).name_hint for b in infos]
        main_pos = block_names.index(stmt.name_hint)
        producers = [b.block_rv for b in infos[:main_pos]]
        consumers = [b.block_rv for b in infos[main_pos + 1 :]]

        # -- 1. inline producers (input reshapes / transposes) -------------------------------------
        leftover_producers = []
        for p in reversed(producers):
            try:
                sch.compute_inline(p)
            except Exception:  # pylint: disable=broad-except
                leftover_producers.append(p)

        # -- 2. inline the epilogue chain into its last blocks --------------------------------------
        out_blocks = {sch.get(b).name_hint for b in sch.get_output_blocks(sch.get_sblock("root"))}
        epilogue = []
        for c in consumers:
            name = sch.get(c).name_hint
            if name in out_blocks:
                epilogue.append(c)
                continue
            try:
                sch.compute_inline(c)
            except Exception:  # pylint: disable=broad-except
                epilogue.append(c)

        # -- 3. loop structure of the main block ----------------------------------------------------
        loops = sch.get_loops(main_rv)
        groups = {IterKind.kIter_S: [], IterKind.kIter_I: [], IterKind.kIter_J: [], IterKind.kIter_K: [],
                  IterKind.kIter_T: []}
        for it, lp in zip(main.iters, loops):
            groups[kind_of[it.var]].append(lp)
        # trivial (extent 1) loops go first, then S, I, J, K
        order = groups[IterKind.kIter_T] + groups[IterKind.kIter_S] + groups[IterKind.kIter_I] + \
            groups[IterKind.kIter_J] + groups[IterKind.kIter_K]
        sch.reorder(*order)

        def fuse(lps):
            if not lps:
                return None
            return sch.fuse(*lps) if len(lps) > 1 else lps[0]

        # Only the innermost I and J loops are tiled: fusing several I (or J) loops would make a
        # tile straddle rows of the output, and the epilogue attached to the tile would then
        # (over-approximated by a bounding box) touch elements the tile did not compute.
        def ext(lp):
            return _int(sch.get(lp).extent)

        b_loops = groups[IterKind.kIter_T] + groups[IterKind.kIter_S]
        i_loops, j_loops = groups[IterKind.kIter_I], groups[IterKind.kIter_J]
        i_loop = i_loops[-1] if i_loops else None
        i_outer = i_loops[:-1]
        j_loop, j_outer = j_loops[-1], j_loops[:-1]
        k_loop = fuse(groups[IterKind.kIter_K])
        m = ext(i_loop) if i_loop is not None else 1
        n = ext(j_loop)
        macs = 1
        for lp in b_loops + i_loops + j_loops + [k_loop]:
            macs *= ext(lp)
        m_total = macs // (n * ext(k_loop))
        if pack_b and m_total == 1:
            # matmul-vector against an [N, K] matrix: a dot product per output; the Reduction
            # rule's row schedule (rows in parallel, K vectorised by rfactor) is the better kernel,
            # packing would copy all of B per call.
            from .reduction import Reduction

            return Reduction().apply(func, target, False)

        # -- 4. micro-kernel shape -------------------------------------------------------------------
        if m == 1:
            nv = self.max_col_vectors or 4
        else:
            # 8 x 3 vectors (24 accumulators) measured 6-10 % faster than 8 x 2 on AVX-512 for the
            # BERT shapes; with 16 registers 2 column vectors leave room for more rows
            nv = self.max_col_vectors or (3 if nregs >= 32 else 2)
        if n <= lanes:
            vec, nv = n, 1
        else:
            # vectors must not straddle the end of a row (that would need a guard on the vector
            # lanes, which the vectoriser turns back into scalar code): narrower vectors when the
            # row length is not a multiple of the lanes, keeping ~the same columns per tile
            vec = lanes
            while vec > 4 and n % vec != 0:
                vec //= 2
            if n % vec != 0:
                vec = lanes  # odd N: the guarded tail is scalar
            nv = max(1, min(nv * lanes // vec, 8, n // vec))
            while nv > 1 and n % (nv * vec) != 0:
                nv -= 1
        max_mr = self.max_rows or max(1, min(8, (nregs - nv - 2) // nv))
        mr = _pick_mr(m, max_mr)

        # Streamed packing of a large 2-D [K, N] B (weights): each core first copies its share of
        # columns, reading whole row segments (prefetcher-friendly), into contiguous [K, NR] panels;
        # the micro-kernel then reads panels sequentially. Reading B in place walks K rows with a
        # stride of N floats per panel, which the hardware prefetchers do not follow across pages:
        # measured 1.5x slower than hot when B is not in cache (as in a model, weights stream).
        cores = _num_cores(target)
        nr = nv * vec
        stream = (self.stream_pack and not pack_b and len(b_vars) == 2 and not j_outer
                  and b_vars[0] is not None and kind_of.get(b_vars[0]) == IterKind.kIter_K
                  and b_vars[1] is not None and kind_of.get(b_vars[1]) == IterKind.kIter_J
                  and not groups[IterKind.kIter_S] and m_total >= self.stream_min_rows
                  and n * ext(k_loop) * 4 >= self.stream_min_bytes and n % nr == 0)
        chunks = _chunks(n // nr if n % nr == 0 else 1, cores)
        # Matmul-vector against a large [K, N] matrix: memory-bound, so B is read row by row (each
        # core a contiguous segment of every row, prefetcher-friendly) into a per-core accumulator
        # segment that stays in L1: loops ``j_chunk | k, j_vec_outer, j_vec``.
        gemv = (self.stream_pack and m_total == 1 and not pack_b and len(b_vars) == 2
                and b_vars[0] is not None and kind_of.get(b_vars[0]) == IterKind.kIter_K
                and b_vars[1] is not None and kind_of.get(b_vars[1]) == IterKind.kIter_J
                and not groups[IterKind.kIter_S] and not j_outer and n % vec == 0
                and n * ext(k_loop) * 4 >= self.stream_min_bytes)
        if gemv:
            return self._gemv_rows(sch, main_rv, func, target, b_loops + i_loops, j_loop, k_loop, vec,
                                   _chunks(n // vec, cores),
                                   epilogue, lanes, leftover_producers, macs)
        if i_loop is not None:
            io, ii = sch.split(i_loop, factors=[None, mr])
        else:
            io = ii = None
        jt = None
        if stream:
            jt, jo, jv1, jv = sch.split(j_loop, factors=[chunks, None, nv, vec])
        elif nv > 1:
            jo, jv1, jv = sch.split(j_loop, factors=[None, nv, vec])
        else:
            jo, jv = sch.split(j_loop, factors=[None, vec])
            jv1 = None
        inner = [x for x in (ii, jv1, jv) if x is not None]
        outer = b_loops + j_outer + ([jt] if jt is not None else []) + [jo] + i_outer + ([io] if io is not None else [])
        sch.reorder(*outer, k_loop, *inner)

        # -- 5. pack B column panels when B is [N, K] -------------------------------------------------
        if stream:
            par = fuse(b_loops + [jt])
            tile_loop = fuse([jo] + i_outer + ([io] if io is not None else []))
            b_idx = [i for i, r in enumerate(stmt.reads) if r.source.same_as(b_buffer)][0]
            packed = sch.cache_read(main_rv, b_idx, "global")
            sch.transform_layout(packed, ("write", 0), lambda k, j: (j // nr, k, j % nr))
            sch.compute_at(packed, par, preserve_unit_loops=True)
            plps = sch.get_loops(packed)
            _, pv = sch.split(plps[-1], factors=[None, vec])
            sch.vectorize(pv)
        elif pack_b:
            panel = b_loops + j_outer + [jo]
            par = fuse(panel)
            tile_loop = fuse(i_outer + [io]) if io is not None else par
            b_idx = [i for i, r in enumerate(stmt.reads) if r.source.same_as(b_buffer)][0]
            packed = sch.cache_read(main_rv, b_idx, "global")
            nd = len(b_buffer.shape)
            sch.transform_layout(packed, ("write", 0),
                                 tirx.IndexMap.from_func(lambda *ax: (*ax[:-2], ax[-1], ax[-2]), ndim=nd))
            sch.compute_at(packed, par, preserve_unit_loops=True)
        else:
            par = fuse(outer)
            tile_loop = par
        if macs >= PARALLEL_MIN_MACS:
            sch.parallel(par)

        # -- 6. accumulator tile in registers --------------------------------------------------------
        attached = _attach_epilogue(sch, main_rv, epilogue, tile_loop, target)

        # vectorise / unroll before decompose_reduction: the primitives need the block to still be
        # a complete reduction; the init block copies the loop kinds.
        sch.vectorize(inner[-1])
        for lp in inner[:-1]:
            sch.unroll(lp)
        sch.decompose_reduction(main_rv, k_loop)

        for e in attached:
            _vectorize_tail(sch, e, lanes, tile_loop)
        for p in leftover_producers:
            schedule_spatial_block(sch, p, target)
        return sch


def _vectorize_tail(sch: s_tir.Schedule, block, lanes: int, tile_loop) -> None:
    """Vectorise the innermost loop of an epilogue attached under ``tile_loop``."""
    loops = sch.get_loops(block)
    tile = sch.get(tile_loop)
    depth = next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(tile)) + 1
    mine = loops[depth:]
    if not mine:
        return
    last = mine[-1]
    ext = _int(sch.get(last).extent)
    if ext is None or ext < 2:
        return
    if ext > lanes and ext % lanes == 0:
        _, last = sch.split(last, factors=[None, lanes])
    elif ext > lanes:
        return
    sch.vectorize(last)
