"""x86 default schedule for 2-D convolutions (regular, strided, 1x1, grouped, depthwise).

Design
------
Layout. ``PREFERRED_LAYOUTS`` converts every ``relax.nn.conv2d`` to NHWC activations and HWIO
weights; pooling, elementwise ops and reductions follow their producer's layout, so activations
stay channels-last between convolutions (``relax.clip``, i.e. ReLU6, gets the unary layout rule
registered by ``register_clip_layout_inference``, which TVM 0.27 lacks: without it MobileNetV2 bounced NCHW<->NHWC). TOPI
cannot legalize channel-blocked layouts (NCHWc) in TVM 0.27, so NHWC/HWIO is the packed layout we
can have: the output channel is the innermost axis of both the weights and the output, so a
vector of output channels is one contiguous load of weights and one contiguous store of outputs,
and an input pixel's channel is a scalar that is broadcast. The weights are constants of the
module, so their transpose to HWIO is folded at compile time.

Register tile (the micro-kernel). For each output row ``oh`` and a block of ``R`` consecutive
output pixels ``ow .. ow+R`` times ``V`` vectors of ``L`` output channels (``L`` = vector width /
32 bits, ``desc.vector_lanes``: 16 on AVX-512, 8 on AVX2), the ``R*V`` accumulators live in vector
registers for the whole reduction::

    for (kh, kw, ic):                     # reduction, outside the register tile
        w[0..V) = W[kh, kw, ic, oc:oc+V*L]          # V vector loads
        for r in 0..R:                    # unrolled
            x = broadcast(In[oh*s+kh, (ow+r)*s+kw, ic])
            for v in 0..V: acc[r][v] += x * w[v]     # unrolled, L lanes vectorized

``R`` and ``V`` are chosen per shape by a small cost model (FMA throughput vs loads vs FMA
latency, ``R*V`` accumulators kept below the register file: 32 zmm registers on AVX-512, 16 ymm
on AVX2), with ``R`` a divisor of the output width so no tail guards are needed (odd widths such
as 7, 13 or 15 get R = 7, 13, 5 ...). ``L`` is reduced to a divisor of the channel count when the
channels are not a multiple of the vector (24 -> 8 lanes, 3 -> 3 lanes).

Accumulators are a ``local`` buffer (the conv intermediate, or a ``cache_write`` when the conv
writes the function output directly); the init is split off with ``decompose_reduction`` and the
whole epilogue chain (bias, folded BN scale/shift, relu/relu6/clip, SiLU, residual add, a layout
transform back to NCHW...) is inlined into one block that is ``reverse_compute_at`` the register
tile, so every output is stored exactly once, already activated.

Loop nest and parallelism: ``n, oc_block, oh`` (fused, ``parallel`` over the cores) ``, ow_block
| kh, kw, ic | r, v, lane``. Output-channel blocks are outermost so a block of weights
(KH*KW*IC*V*L floats) stays in L2 while the whole image streams through it; when the whole
weight tensor is small (fits half of the target's L2, ``desc.l2_bytes``) rows are outermost instead so
the input rows stay in L1.

Weights are repacked per register tile, ``HWIO -> [OC/B, KH, KW, IC, B]`` with ``B = V*L``, so the
weights one tile streams through are contiguous. In plain HWIO a tile's weights are ``B`` floats
every ``OC*4`` bytes: at OC = 256/512 that power-of-two stride maps them onto a few L1/L2 sets and
the 3x3 convolutions ran at a third of their speed (47 vs 162 GFLOP/s measured). The repack is a
block marked ``meta_schedule.layout_rewrite_preproc``; the pipeline must run
``relax.transform.SplitLayoutRewritePreproc()`` and ``FoldConstant()`` after scheduling so it is
applied to the constant weights at compile time. Without those passes it still gives correct
results but repacks at every call (measured ResNet-18: 33 ms instead of 28 ms).

Padding is kept as its own block (a parallel, vectorised copy into a zero-bordered buffer) for
compute-bound convolutions, so their inner loop has no bounds checks. Depthwise convolutions are
memory bound: the pad is inlined as a select on the load (no copy; 2x faster on MobileNetV2's
stride-2 depthwise layers), and they use the same tile, but the input is a vector load (input and
output channels coincide) instead of a broadcast. Grouped convolutions vectorise within a group
(``L`` divides the group's output channels).

Anything not recognised (non NHWC/HWIO layouts, dilation patterns we do not parse, non-float
types...) returns ``None`` so the next rule (or the generic fallback) takes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target
from tvm.s_tir.dlight import ScheduleRule

from targets import TargetDescription

#: ConvertLayout request: channels-last activations, HWIO weights. Pooling, elementwise ops and
#: reductions follow their input's layout (their layout inference takes it from the producer), so
#: activations stay NHWC from the first convolution to the head.
PREFERRED_LAYOUTS = {"relax.nn.conv2d": ["NHWC", "HWIO"], "relax.nn.conv2d_transpose": ["NHWC", "IOHW"]}


def register_clip_layout_inference() -> None:
    """``relax.clip`` (ReLU6, clamp) has no layout inference in TVM 0.27, so ConvertLayout wraps
    every clip in a transpose back to NCHW and out again (MobileNetV2: twice per block). Its
    ``a_min``/``a_max`` are scalars, so it is a unary elementwise op as far as layouts go: reuse the
    unary rule (the one registered for ``relax.sigmoid``). Registered once, only if absent."""
    import tvm

    try:
        clip = tvm.ir.Op.get("relax.clip")
        if clip.get_attr("FRelaxInferLayout") is None:
            unary = tvm.ir.Op.get("relax.sigmoid").get_attr("FRelaxInferLayout")
            if unary is not None:
                tvm.ir.register_op_attr("relax.clip", "FRelaxInferLayout", unary)
    except Exception:  # pragma: no cover - registry differs: layouts still correct, just slower
        pass



# ---------------------------------------------------------------------------------------------
# helpers shared with pool.py


def lane_divisor(channels: int, lanes: int) -> int:
    """Largest vector width <= ``lanes`` that divides ``channels`` (so no tail is needed)."""
    if channels % lanes == 0:
        return lanes
    best = 1
    for d in range(min(lanes, channels), 0, -1):
        if channels % d == 0:
            best = d
            break
    # prefer a power of two that is not much smaller (cheaper vectors, same work)
    p = lanes
    while p > 1:
        if channels % p == 0 and p * 2 > best:
            return p
        p //= 2
    return best


def _load_type():
    """The class of ``tirx.BufferLoad`` nodes (a factory function in TVM 0.27, not a class)."""
    if isinstance(tirx.BufferLoad, type):
        return tirx.BufferLoad
    buf = tirx.decl_buffer((1,), "float32")
    return type(tirx.BufferLoad(buf, [tirx.const(0, "int32")]))


BufferLoadT = _load_type()


def load_buffer(load):
    """The buffer a load / region reads (``.buffer`` before TVM 0.27, ``.source`` since)."""
    buf = getattr(load, "buffer", None)
    return buf if buf is not None else load.source


def _as_int(x):
    try:
        return int(x)
    except Exception:
        return None


def _collect(expr, cls) -> list:
    import tvm_ffi

    out = []
    tvm_ffi.structural_walk(expr, (cls, out.append), order="post")
    return out


def _vars_in(expr) -> set:
    return set(_collect(expr, tirx.Var))


def _loads(expr) -> list:
    return _collect(expr, BufferLoadT)


def schedule_epilogue_vector(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Vectorise the innermost loop of an injective block placed inside a tile."""
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    ext = _as_int(sch.get(inner).extent)
    if ext is None or ext <= 1:
        return
    if ext <= lanes:
        sch.vectorize(inner)
    elif ext % lanes == 0:
        _, vi = sch.split(inner, [None, lanes])
        sch.vectorize(vi)


def schedule_injective_block(sch: s_tir.Schedule, block, lanes: int, cores: int) -> None:
    """Parallel (outer axes) + vectorised (innermost axis) schedule of a standalone injective
    block, e.g. a padding copy."""
    loops = sch.get_loops(block)
    if not loops:
        return
    exts = [_as_int(sch.get(lp).extent) for lp in loops]
    if None in exts:
        return
    inner = loops[-1]
    if len(loops) > 1:
        outer = sch.fuse(*loops[:-1])
        sch.parallel(outer)
    e = exts[-1]
    if e > 1:
        if e % lanes == 0 and e > lanes:
            _, vi = sch.split(inner, [None, lanes])
            sch.vectorize(vi)
        elif e <= lanes:
            sch.vectorize(inner)
        else:
            d = lane_divisor(e, lanes)
            if d > 1:
                _, vi = sch.split(inner, [None, d])
                sch.vectorize(vi)


# ---------------------------------------------------------------------------------------------
# pattern matching


@dataclass
class ConvPattern:
    block: object  # SBlockRV of the conv reduction
    data: tirx.Buffer  # buffer read as the (padded) input
    weight: tirx.Buffer
    out: tirx.Buffer
    n: int
    oh: int
    ow: int
    oc: int
    kh: int
    kw: int
    ic: int  # reduction channels (per group)
    depthwise: bool
    grouped: bool
    stride_w: int
    dtype_bits: int


def _coeff(index, var) -> int | None:
    """Coefficient of ``var`` in an affine ``index`` (None when not affine in ``var``)."""
    from tvm.sym.pattern import detect_linear_equation

    try:
        res = detect_linear_equation(index, [var])
        return _as_int(res[0]) if len(res) == 2 else None
    except Exception:
        return None


def match_conv2d_nhwc(sch: s_tir.Schedule, block) -> ConvPattern | None:
    """Recognise ``out[n,h,w,f] += data[n, h*s+kh*d, w*s+kw*d, g(f)+c] * weight[kh,kw,c,f]``."""
    stmt = sch.get(block)
    iters = list(stmt.iter_vars)
    if len(iters) != 7:
        return None
    kinds = [iv.iter_type for iv in iters]
    if kinds != [0, 0, 0, 0, 2, 2, 2]:  # DataPar x4, CommReduce x3
        return None
    if len(stmt.writes) != 1 or stmt.init is None:
        return None
    body = stmt.body
    if not isinstance(body, tirx.BufferStore):
        return None
    val = body.value
    if not isinstance(val, tirx.Add):
        return None
    lhs, rhs = val.a, val.b
    if not (isinstance(lhs, BufferLoadT) and load_buffer(lhs).same_as(body.buffer)):
        return None
    # strip casts
    while isinstance(rhs, tirx.Cast):
        rhs = rhs.value
    if not isinstance(rhs, tirx.Mul):
        return None
    loads = _loads(rhs)
    if len(loads) != 2:
        return None
    vn, vh, vw, vf, vkh, vkw, vc = [iv.var for iv in iters]
    weight = data = None
    for ld in loads:
        idx = list(ld.indices)
        if (
            len(idx) == 4
            and all(isinstance(i, tirx.Var) for i in idx)
            and [i.same_as(v) for i, v in zip(idx, [vkh, vkw, vc, vf])] == [True] * 4
        ):
            weight = ld
        else:
            data = ld
    if weight is None or data is None or len(data.indices) != 4:
        return None
    if not str(body.buffer.dtype).startswith("float"):
        return None
    out_idx = list(body.indices)
    if not all(isinstance(i, tirx.Var) and i.same_as(v) for i, v in zip(out_idx, [vn, vh, vw, vf])):
        return None
    di = list(data.indices)
    # data index must be n / (h,kh) / (w,kw) / (f?,c)
    if not _vars_in(di[0]) <= {vn}:
        return None
    if not _vars_in(di[1]) <= {vh, vkh} or not _vars_in(di[2]) <= {vw, vkw}:
        return None
    if not _vars_in(di[3]) <= {vf, vc} or vc not in _vars_in(di[3]):
        return None
    if _coeff(di[3], vc) != 1:
        return None
    sw = _coeff(di[2], vw)
    if sw is None or sw <= 0:
        return None
    exts = [_as_int(iv.dom.extent) for iv in iters]
    if None in exts:
        return None
    n, oh, ow, oc, kh, kw, ic = exts
    uses_f = vf in _vars_in(di[3])
    depthwise = uses_f and ic == 1
    grouped = uses_f and not depthwise
    return ConvPattern(
        block=block,
        data=load_buffer(data),
        weight=load_buffer(weight),
        out=body.buffer,
        n=n,
        oh=oh,
        ow=ow,
        oc=oc,
        kh=kh,
        kw=kw,
        ic=ic,
        depthwise=depthwise,
        grouped=grouped,
        stride_w=sw,
        dtype_bits=int(body.buffer.dtype.bits),
    )


# ---------------------------------------------------------------------------------------------
# tile selection


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_tile(ow: int, vec_blocks: int, regs: int, depthwise: bool,
                embedded_broadcast: bool = False) -> tuple[int, int]:
    """Pick (R pixels, V vectors) for the register tile.

    Cycle model per reduction step (one (kh, kw, ic)): 2 FMA ports, ~2.5 loads per cycle (broadcast
    loads fold into the FMA), and at least 4 cycles (FMA latency) of dependency per accumulator.

    Registers: the ``R*V`` accumulators plus ``V`` weight vectors plus one spare, the input pixel
    needing none when ``embedded_broadcast`` (AVX-512: ``vfmadd231ps zmm, zmm, [mem]{1to16}`` takes it
    straight from memory). With that bound AVX-512 gets 28 accumulators (R=14, V=2) where it had 16:
    tuning ResNet-18 found such tiles 1.1-1.25x faster in its 56x56, 28x28, 14x14 and stem
    convolutions, and as defaults they made them 1.03-1.2x faster (caches flushed). Filling all 32
    registers (R=7, V=4 on the 7x7x512 layers) was 0.87x. Without embedded broadcasts (AVX2, NEON) a
    few registers stay in reserve, as measured before.
    """
    # 512-bit loads: 2 per cycle; with 28 accumulators R=28, V=1 would need 29 loads per 28 FMAs
    load_rate = 2.0 if embedded_broadcast else 2.5
    best = None
    for v in range(1, 5):
        if vec_blocks % v:
            continue
        max_acc = regs - v - 1 if embedded_broadcast else (regs - 6 if regs >= 32 else regs - 4)
        for r in _divisors(ow):
            acc = r * v
            if acc > max_acc:
                continue
            fma = acc
            loads = (acc + v) if depthwise else (r + v)
            cycles = max(fma / 2.0, loads / load_rate, 4.0) + 0.75  # + loop overhead
            eff = (fma / 2.0) / cycles
            key = (round(eff, 3), acc, r)
            if best is None or key > best[0]:
                best = (key, r, v)
    if best is None:
        return 1, 1
    return best[1], best[2]


# ---------------------------------------------------------------------------------------------
# the rule


#: L2 size assumed when a description does not give one (every CPU target in targets/ does).
_DEFAULT_L2_BYTES = 1 << 20

#: Repack weights per register tile (needs SplitLayoutRewritePreproc + FoldConstant after scheduling).
PACK_WEIGHTS = True


class Conv2D(ScheduleRule):
    """Default x86 schedule for NHWC/HWIO conv2d kernels with fused pad and epilogues. Vector lanes,
    register count, embedded broadcasts, cores and the L2 size come from ``desc``."""

    def __init__(self, desc: TargetDescription):
        self.desc = desc

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):  # noqa: D102
        if not isinstance(func, tirx.PrimFunc):
            return None
        if target is None or target.kind.name != "llvm":
            return None
        try:
            return self._apply(func, tunable=tunable)
        except Exception:  # a schedule primitive refused: leave the kernel to other rules
            return None

    def design_space(self, sch: s_tir.Schedule) -> s_tir.Schedule | None:
        """The tunable template on a copy of ``sch`` (a MetaSchedule design space of the task), or None
        when the kernel is not a convolution this rule takes."""
        try:
            return self._apply(sch.mod["main"], tunable=True, sch=sch.copy())
        except Exception:  # noqa: BLE001 - not ours
            return None

    # -- implementation ---------------------------------------------------------------------
    @staticmethod
    def _sample_tile(sch: s_tir.Schedule, ow: int, vec_blocks: int, regs: int, R: int, V: int):
        """Tunable register tile: ``R`` (pixels, a divisor of the output width) and ``V`` (vectors) as
        MetaSchedule categorical decisions, half the probability on the cost model's pick (R, V).
        Returns (R, V) as schedule variables and the largest V candidate (the weights are packed for
        it, so any sampled V reads whole, contiguous blocks)."""
        v_cands = [v for v in (1, 2, 4) if vec_blocks % v == 0]
        r_cands = [r for r in _divisors(ow) if r * v_cands[0] <= regs - 4][-8:]
        if R not in r_cands:
            r_cands.append(R)

        def probs(cands, pick):
            rest = 0.5 / (len(cands) - 1) if len(cands) > 1 else 0.0
            return [0.5 + (0.5 if len(cands) == 1 else 0.0) if c == pick else rest for c in cands]

        r_rv = sch.sample_categorical(candidates=r_cands, probs=probs(r_cands, R))
        v_rv = sch.sample_categorical(candidates=v_cands, probs=probs(v_cands, V))
        return r_rv, v_rv, max(v_cands)

    def _apply(self, func: tirx.PrimFunc, tunable: bool = False, sch: s_tir.Schedule | None = None):
        sch = sch if sch is not None else s_tir.Schedule(func)
        root = sch.get_sblock("root")
        blocks = sch.get_child_blocks(root)
        conv = None
        for b in blocks:
            pat = match_conv2d_nhwc(sch, b)
            if pat is not None:
                if conv is not None:
                    return None  # two convolutions in one kernel: not ours
                conv = pat
        if conv is None:
            return None
        # no other reduction blocks allowed
        conv_idx = [i for i, b in enumerate(blocks) if sch.get(b).same_as(sch.get(conv.block))][0]
        before = blocks[:conv_idx]
        after = blocks[conv_idx + 1 :]
        for b in before + after:
            if any(iv.iter_type != 0 for iv in sch.get(b).iter_vars):
                return None

        desc = self.desc
        lanes_native = desc.vector_lanes(str(conv.out.dtype))
        regs = desc.vector_registers
        cores = desc.cores

        # lanes: output channels in one vector must share an input pixel (same group)
        group_oc = conv.oc
        if conv.grouped:
            # f -> channel index g(f) + c; group size = oc / groups
            cin = _as_int(conv.data.shape[3])
            groups = max(cin // conv.ic, 1) if cin else 1
            group_oc = conv.oc // groups if conv.oc % groups == 0 else 1
        L = lane_divisor(group_oc, lanes_native)
        vec_blocks = conv.oc // L
        # AVX-512 FMAs take a broadcast memory operand: no register for the input pixel
        embedded = desc.embedded_broadcast and not conv.depthwise
        R, V = choose_tile(conv.ow, vec_blocks, regs, conv.depthwise, embedded_broadcast=embedded)
        pack_v = V
        if tunable:
            R, V, pack_v = self._sample_tile(sch, conv.ow, vec_blocks, regs, R, V)

        # --- producers (padding) ---
        # depthwise convs are memory bound: a padded copy would double their traffic, so the pad
        # becomes a select on the (vector) input load. Compute-bound convs keep a padded copy so
        # their inner loop has no bounds checks.
        inline_pad = conv.depthwise
        for b in reversed(before):
            if inline_pad:
                try:
                    sch.compute_inline(b)
                    continue
                except Exception:
                    pass
            schedule_injective_block(sch, b, lanes_native, cores)

        # --- epilogue: inline everything into the last block ---
        epilogue = list(after)
        kept = []
        for b in epilogue[:-1]:
            try:
                sch.compute_inline(b)
            except Exception:
                kept.append(b)
        if epilogue:
            kept.append(epilogue[-1])

        # --- tile the conv ---
        n, h, w, f, kh, kw, c = sch.get_loops(conv.block)
        fo, fv, fl = sch.split(f, [None, V, L])
        wo, wi = sch.split(w, [None, R])
        weight_bytes = conv.kh * conv.kw * conv.ic * conv.oc * conv.dtype_bits // 8
        rows_outer = conv.depthwise or weight_bytes * 2 <= (desc.l2_bytes or _DEFAULT_L2_BYTES)
        if rows_outer:
            sch.reorder(n, h, fo, wo, kh, kw, c, wi, fv, fl)
            par = sch.fuse(n, h, fo)
        else:
            sch.reorder(n, fo, h, wo, kh, kw, c, wi, fv, fl)
            par = sch.fuse(n, fo, h)
        sch.parallel(par)

        if kept:
            for b in kept:
                sch.reverse_compute_at(b, wo, preserve_unit_loops=True)
            sch.set_scope(conv.block, 0, "local")
            for b in kept:
                schedule_epilogue_vector(sch, b, L)
        else:
            wb = sch.cache_write(conv.block, 0, "local")
            sch.reverse_compute_at(wb, wo, preserve_unit_loops=True)
            schedule_epilogue_vector(sch, wb, L)

        sch.unroll(wi)
        sch.unroll(fv)
        sch.vectorize(fl)
        sch.decompose_reduction(conv.block, kh)
        weight_is_param = any(p.same_as(conv.weight) for p in func.params)
        if PACK_WEIGHTS and weight_is_param and not conv.depthwise and conv.oc > pack_v * L:
            self._pack_weights(sch, conv, pack_v * L)
        return sch

    @staticmethod
    def _pack_weights(sch: s_tir.Schedule, conv: ConvPattern, block_oc: int) -> None:
        """Repack HWIO weights to [oc/B, kh, kw, ic, B] (B = output channels of the register tile)
        so the weights one tile streams through are contiguous. The repack is a separate block
        marked ``meta_schedule.layout_rewrite_preproc``: ``relax.transform.SplitLayoutRewritePreproc``
        lifts it out of the kernel and ``FoldConstant`` applies it to the constant weights at
        compile time."""
        update = sch.get_sblock(sch.get(conv.block).name_hint)
        stmt = sch.get(update)
        idx = [i for i, r in enumerate(stmt.reads) if load_buffer(r).same_as(conv.weight)][0]
        cached = sch.cache_read(update, idx, "global")
        sch.transform_layout(
            cached,
            ("write", 0),
            lambda h, w, i, o: (o // block_oc, h, w, i, o % block_oc),
        )
        sch.annotate(cached, "meta_schedule.layout_rewrite_preproc", True)
