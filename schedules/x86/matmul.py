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
  target's lanes (``desc.vector_lanes``; 16 x f32 with AVX-512, 8 with AVX2) or, when N is not a
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
from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.gpu.matmul import IterKind
from tvm.tirx.analysis import undefined_vars
from tvm.target import Target

from targets import TargetDescription

from .elementwise import GuardedRule, schedule_spatial_block

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


@dataclass
class _Gemm:
    """The matched GEMM: its main (reduction) block, the role of each iter and how B is laid out."""

    info: object  # DLight BlockInfo of the reduction block
    block: object  # its SBlockRV
    stmt: object  # the SBlock
    kind_of: dict  # iter var -> IterKind
    b_vars: list  # the var indexing each dimension of B (None when not a plain var)
    b_buffer: tirx.Buffer
    pack_b: bool  # B is [.., N, K]: packed per column panel into [K, NR]
    out_dtype: str


@dataclass
class _Loops:
    """The main block's loops grouped by role (after :func:`_group_loops` reordered them)."""

    b_loops: list  # trivial (extent 1) and batch (S) loops, outermost
    i_loops: list  # row (I) loops
    j_loops: list  # column (J) loops
    k_loop: object  # the reduction (K) loops, fused
    m: int  # extent of the innermost row loop (1 without rows)
    n: int  # extent of the innermost column loop
    k: int  # extent of the fused reduction
    macs: int  # multiply-adds of the whole kernel
    m_total: int  # rows of all batches and row loops: macs / (n * k)
    batched: bool  # there are batch (S) loops

    @property
    def i_loop(self):
        return self.i_loops[-1] if self.i_loops else None

    @property
    def i_outer(self) -> list:
        return self.i_loops[:-1]

    @property
    def j_loop(self):
        return self.j_loops[-1]

    @property
    def j_outer(self) -> list:
        return self.j_loops[:-1]


@dataclass
class _Tile:
    """The micro-kernel: ``mr`` rows x ``nv`` vectors of ``vec`` columns."""

    mr: int
    nv: int
    vec: int

    @property
    def nr(self) -> int:
        return self.nv * self.vec


def _chunks(units: int, cores: int) -> int:
    """The largest number of equal column chunks (at most ``cores``) that ``units`` splits into."""
    for d in range(max(cores, 1), 0, -1):
        if units % d == 0:
            return d
    return 1


def _tile_registers(desc: TargetDescription) -> int:
    """Vector registers the micro-kernel is sized for: the target's on x86 (32 with AVX-512, 16 with
    AVX2). On ARM 16, as this rule has always assumed there, although AArch64 has 32: tiles for 32
    registers (8 x 3 vectors) were measured on AVX-512 only, not yet on NEON."""
    return desc.vector_registers if desc.family == "x86" else 16


def _pick_mr(m: int, max_mr: int) -> int:
    """Rows per micro-kernel: the largest divisor of ``m`` in [max_mr/2, max_mr], else ``max_mr``."""
    if m <= max_mr:
        return m
    for mr in range(max_mr, max(max_mr // 2, 1) - 1, -1):
        if m % mr == 0:
            return mr
    return max_mr


def _attach_epilogue(sch, main_rv, epilogue: list, loop, desc: TargetDescription) -> list:
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
            schedule_spatial_block(sch, e, desc)
    if not writes_local and len(attached) == len(epilogue):
        try:
            sch.set_scope(main_rv, 0, "local")
        except Exception:  # pylint: disable=broad-except
            pass
    return attached


def _match(sch: s_tir.Schedule, infos) -> _Gemm | None:
    """The kernel's single GEMM-like reduction block (None when the kernel is not one this rule takes:
    several reductions, dynamic shapes, an output not contiguous along a column axis)."""
    reductions = [b for b in infos if not b.is_injective()]
    if len(reductions) != 1 or any(set(b.dom_kind()) - {"S", "R"} for b in infos):
        return None
    main = reductions[0]
    stmt = sch.get(main.block_rv)
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
    return _Gemm(main, main.block_rv, stmt, kind_of, b_vars, stmt.reads[1].source, pack_b,
                 stmt.writes[0].source.dtype)


def _inline_producers(sch: s_tir.Schedule, producers: list) -> list:
    """Inline the producers (input reshapes / transposes); return those that cannot be."""
    leftover = []
    for p in reversed(producers):
        try:
            sch.compute_inline(p)
        except Exception:  # pylint: disable=broad-except
            leftover.append(p)
    return leftover


def _inline_epilogue(sch: s_tir.Schedule, consumers: list) -> list:
    """Inline the epilogue chain into its last blocks (the kernel's outputs and whatever cannot be
    inlined); return those blocks."""
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
    return epilogue


def _fuse(sch: s_tir.Schedule, lps: list):
    if not lps:
        return None
    return sch.fuse(*lps) if len(lps) > 1 else lps[0]


def _group_loops(sch: s_tir.Schedule, gemm: _Gemm) -> _Loops:
    """Reorder the main block's loops to trivial, S, I, J, K and group them by role; the K loops are
    fused. Only the innermost I and J loops are tiled later: fusing several I (or J) loops would make a
    tile straddle rows of the output, and the epilogue attached to the tile would then
    (over-approximated by a bounding box) touch elements the tile did not compute."""
    loops = sch.get_loops(gemm.block)
    groups = {IterKind.kIter_S: [], IterKind.kIter_I: [], IterKind.kIter_J: [], IterKind.kIter_K: [],
              IterKind.kIter_T: []}
    for it, lp in zip(gemm.info.iters, loops):
        groups[gemm.kind_of[it.var]].append(lp)
    # trivial (extent 1) loops go first, then S, I, J, K
    order = groups[IterKind.kIter_T] + groups[IterKind.kIter_S] + groups[IterKind.kIter_I] + \
        groups[IterKind.kIter_J] + groups[IterKind.kIter_K]
    sch.reorder(*order)

    def ext(lp):
        return _int(sch.get(lp).extent)

    b_loops = groups[IterKind.kIter_T] + groups[IterKind.kIter_S]
    i_loops, j_loops = groups[IterKind.kIter_I], groups[IterKind.kIter_J]
    k_loop = _fuse(sch, groups[IterKind.kIter_K])
    m = ext(i_loops[-1]) if i_loops else 1
    n = ext(j_loops[-1])
    macs = 1
    for lp in b_loops + i_loops + j_loops + [k_loop]:
        macs *= ext(lp)
    k = ext(k_loop)
    return _Loops(b_loops, i_loops, j_loops, k_loop, m, n, k, macs, macs // (n * k), bool(groups[IterKind.kIter_S]))


def _b_is_k_by_n(gemm: _Gemm) -> bool:
    """B is a plain 2-D ``[K, N]`` matrix (the layout ``nn.Linear`` weights reach TIR in)."""
    b = gemm.b_vars
    return (not gemm.pack_b and len(b) == 2 and b[0] is not None and gemm.kind_of.get(b[0]) == IterKind.kIter_K
            and b[1] is not None and gemm.kind_of.get(b[1]) == IterKind.kIter_J)


class Matmul(GuardedRule):
    """Register-blocked, vectorised, parallel GEMM / batched GEMM / GEMV with fused epilogues; lanes,
    registers and cores from ``desc``."""

    def __init__(self, desc: TargetDescription, max_rows: int | None = None, max_col_vectors: int | None = None,
                 stream_pack: bool = True, stream_min_rows: int = 16, stream_min_bytes: int = 256 << 10):
        super().__init__(desc)
        self.max_rows = max_rows
        self.max_col_vectors = max_col_vectors
        self.stream_pack = stream_pack
        self.stream_min_rows = stream_min_rows
        self.stream_min_bytes = stream_min_bytes

    # ------------------------------------------------------------------------------------------
    def _apply(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        gemm = _match(sch, infos)
        if gemm is None:
            return None
        lanes = self.desc.vector_lanes(gemm.out_dtype)

        block_names = [sch.get(b.block_rv).name_hint for b in infos]
        main_pos = block_names.index(gemm.stmt.name_hint)
        leftover_producers = _inline_producers(sch, [b.block_rv for b in infos[:main_pos]])
        epilogue = _inline_epilogue(sch, [b.block_rv for b in infos[main_pos + 1:]])
        loops = _group_loops(sch, gemm)
        if gemm.pack_b and loops.m_total == 1:
            # matmul-vector against an [N, K] matrix: a dot product per output; the Reduction
            # rule's row schedule (rows in parallel, K vectorised by rfactor) is the better kernel,
            # packing would copy all of B per call.
            from .reduction import Reduction

            return Reduction(self.desc).apply(func, target, False)

        tile = self._choose_tile(loops.m, loops.n, lanes)
        cores = self.desc.cores
        if self._gemv(gemm, loops, tile):
            self._gemv_rows(sch, gemm, loops, tile.vec, _chunks(loops.n // tile.vec, cores), epilogue, lanes)
        else:
            self._tiled(sch, gemm, loops, tile, self._stream(gemm, loops, tile), cores, epilogue, lanes)
        for p in leftover_producers:
            schedule_spatial_block(sch, p, self.desc)
        return sch

    # -- 1. micro-kernel shape -------------------------------------------------------------------
    def _choose_tile(self, m: int, n: int, lanes: int) -> _Tile:
        """Rows ``mr`` and ``nv`` column vectors of ``vec`` lanes for an ``m x n`` output."""
        nregs = _tile_registers(self.desc)
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
        return _Tile(_pick_mr(m, max_mr), nv, vec)

    # -- 2. how B is read ------------------------------------------------------------------------
    def _stream(self, gemm: _Gemm, loops: _Loops, tile: _Tile) -> bool:
        """Streamed packing of a large 2-D [K, N] B (weights): each core first copies its share of
        columns, reading whole row segments (prefetcher-friendly), into contiguous [K, NR] panels; the
        micro-kernel then reads panels sequentially. Reading B in place walks K rows with a stride of
        N floats per panel, which the hardware prefetchers do not follow across pages: measured 1.5x
        slower than hot when B is not in cache (as in a model, weights stream)."""
        return (self.stream_pack and _b_is_k_by_n(gemm) and not loops.j_outer and not loops.batched
                and loops.m_total >= self.stream_min_rows
                and loops.n * loops.k * 4 >= self.stream_min_bytes and loops.n % tile.nr == 0)

    def _gemv(self, gemm: _Gemm, loops: _Loops, tile: _Tile) -> bool:
        """Matmul-vector against a large [K, N] matrix: memory-bound, so B is read row by row (each
        core a contiguous segment of every row, prefetcher-friendly) into a per-core accumulator
        segment that stays in L1: loops ``j_chunk | k, j_vec_outer, j_vec``."""
        return (self.stream_pack and loops.m_total == 1 and _b_is_k_by_n(gemm) and not loops.batched
                and not loops.j_outer and loops.n % tile.vec == 0
                and loops.n * loops.k * 4 >= self.stream_min_bytes)

    # -- 3. matmul-vector: columns per core, B row by row ----------------------------------------
    def _gemv_rows(self, sch, gemm: _Gemm, loops: _Loops, vec: int, cores: int, epilogue: list, lanes: int):
        unit_loops = loops.b_loops + loops.i_loops
        jt, jo, jv = sch.split(loops.j_loop, factors=[cores, None, vec])
        sch.reorder(*unit_loops, jt, loops.k_loop, jo, jv)
        par = sch.fuse(*unit_loops, jt) if unit_loops else jt
        if loops.macs >= PARALLEL_MIN_MACS:
            sch.parallel(par)
        attached = _attach_epilogue(sch, gemm.block, epilogue, par, self.desc)
        sch.vectorize(jv)
        sch.decompose_reduction(gemm.block, loops.k_loop)
        for e in attached:
            _vectorize_tail(sch, e, lanes, par)

    # -- 4. register-tiled GEMM ------------------------------------------------------------------
    def _tiled(self, sch, gemm: _Gemm, loops: _Loops, tile: _Tile, stream: bool, cores: int, epilogue: list,
               lanes: int) -> None:
        """Loop nest ``batch, J-outer, [j_chunk,] j_panel, I-outer, i_tile | k | i_inner, j_vec_outer,
        j_vec``, B packed where it pays, the epilogue per tile, the accumulators in registers."""
        outer, inner, jt, jo, io = self._split_tiles(sch, loops, tile, stream, cores)
        par, tile_loop = self._pack_b(sch, gemm, loops, tile, stream, outer, jt, jo, io)
        if loops.macs >= PARALLEL_MIN_MACS:
            sch.parallel(par)
        self._micro_kernel(sch, gemm, loops, inner, tile_loop, epilogue, lanes)

    @staticmethod
    def _split_tiles(sch, loops: _Loops, tile: _Tile, stream: bool, cores: int):
        """Split the innermost I loop by ``mr`` and the innermost J loop by ``nv x vec`` (first into
        per-core chunks when streaming B) and reorder ``outer | k | inner``. Returns the outer loops,
        the inner ones and the chunk, panel and row-tile loops (None where absent)."""
        if loops.i_loop is not None:
            io, ii = sch.split(loops.i_loop, factors=[None, tile.mr])
        else:
            io = ii = None
        jt = None
        if stream:
            chunks = _chunks(loops.n // tile.nr if loops.n % tile.nr == 0 else 1, cores)
            jt, jo, jv1, jv = sch.split(loops.j_loop, factors=[chunks, None, tile.nv, tile.vec])
        elif tile.nv > 1:
            jo, jv1, jv = sch.split(loops.j_loop, factors=[None, tile.nv, tile.vec])
        else:
            jo, jv = sch.split(loops.j_loop, factors=[None, tile.vec])
            jv1 = None
        inner = [x for x in (ii, jv1, jv) if x is not None]
        outer = loops.b_loops + loops.j_outer + ([jt] if jt is not None else []) + [jo] + loops.i_outer + \
            ([io] if io is not None else [])
        sch.reorder(*outer, loops.k_loop, *inner)
        return outer, inner, jt, jo, io

    @staticmethod
    def _pack_b(sch, gemm: _Gemm, loops: _Loops, tile: _Tile, stream: bool, outer: list, jt, jo, io):
        """Pack B where it pays (streamed [K, N] panels per core, or [N, K] column panels) and fuse the
        parallel loop. Returns (parallel loop, loop the tile's epilogue is attached under)."""
        if stream:
            par = _fuse(sch, loops.b_loops + [jt])
            tile_loop = _fuse(sch, [jo] + loops.i_outer + ([io] if io is not None else []))
            nr, vec = tile.nr, tile.vec
            b_idx = [i for i, r in enumerate(gemm.stmt.reads) if r.source.same_as(gemm.b_buffer)][0]
            packed = sch.cache_read(gemm.block, b_idx, "global")
            sch.transform_layout(packed, ("write", 0), lambda k, j: (j // nr, k, j % nr))
            sch.compute_at(packed, par, preserve_unit_loops=True)
            plps = sch.get_loops(packed)
            _, pv = sch.split(plps[-1], factors=[None, vec])
            sch.vectorize(pv)
        elif gemm.pack_b:
            panel = loops.b_loops + loops.j_outer + [jo]
            par = _fuse(sch, panel)
            tile_loop = _fuse(sch, loops.i_outer + [io]) if io is not None else par
            b_idx = [i for i, r in enumerate(gemm.stmt.reads) if r.source.same_as(gemm.b_buffer)][0]
            packed = sch.cache_read(gemm.block, b_idx, "global")
            nd = len(gemm.b_buffer.shape)
            sch.transform_layout(packed, ("write", 0),
                                 tirx.IndexMap.from_func(lambda *ax: (*ax[:-2], ax[-1], ax[-2]), ndim=nd))
            sch.compute_at(packed, par, preserve_unit_loops=True)
        else:
            par = _fuse(sch, outer)
            tile_loop = par
        return par, tile_loop

    def _micro_kernel(self, sch, gemm: _Gemm, loops: _Loops, inner: list, tile_loop, epilogue: list,
                      lanes: int) -> None:
        """The accumulator tile in registers: the epilogue computed per tile, the inner loops unrolled
        and vectorised, the init split off, the epilogue's inner loop vectorised."""
        attached = _attach_epilogue(sch, gemm.block, epilogue, tile_loop, self.desc)
        # vectorise / unroll before decompose_reduction: the primitives need the block to still be
        # a complete reduction; the init block copies the loop kinds.
        sch.vectorize(inner[-1])
        for lp in inner[:-1]:
            sch.unroll(lp)
        sch.decompose_reduction(gemm.block, loops.k_loop)
        for e in attached:
            _vectorize_tail(sch, e, lanes, tile_loop)


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
