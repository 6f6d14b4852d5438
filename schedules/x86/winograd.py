"""x86 default schedule for the Winograd transforms (``compiler.winograd``).

The transforms select one of their ``A*A`` (input) or ``m*m`` (output) cases per element with a
chain of ``Select`` on the case index. The schedule unrolls that index inside a vector of channels,
so after unrolling every case is straight-line vector code with its constant coefficients (the
Selects fold away) and LLVM shares the row transform between the cases of a tile:

* input  ``V[k, p, c]``:    ``p`` (tiles, parallel), ``c / L``, ``k`` (unrolled), ``c % L`` (vector);
  the zero-padded input tile ``[A, A, L]`` is copied into a local buffer under ``c / L`` first
* output ``y[n, h, w, k]``: ``n*th*tw`` tiles (parallel), ``k / L``, ``a``, ``b`` (unrolled),
  ``k % L`` (vector); ``h = ty*m + a``, ``w = tx*m + b``. The convolution's epilogue (bias, ReLU,
  SiLU, residual add), fused into the output kernel by FuseOps, runs on each tile as it is copied
  out of a local buffer.

Kernels without a ``winograd_input``/``winograd_output`` block are declined.
"""

from __future__ import annotations

from tvm import s_tir

from .conv import lane_divisor
from .elementwise import GuardedRule, schedule_spatial_block


def _find(sch: s_tir.Schedule, prefix: str):
    """The block whose name starts with ``prefix`` and its name (None, None when there is none)."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):  # no root: GuardedRule declines
        name = sch.get(block).name_hint
        if name.startswith(prefix):
            return block, name
    return None, None


def _extent(sch: s_tir.Schedule, loop) -> int:
    return int(sch.get(loop).extent)


class WinogradTransform(GuardedRule):
    """Schedules the input and output transform kernels of Winograd convolutions (block names
    ``winograd_input_m{m}`` and ``winograd_output_m{m}``, set by ``compiler.winograd``)."""

    def _apply(self, func, target):
        sch = s_tir.Schedule(func)
        lanes = self.desc.vector_lanes("float32")
        block, _ = _find(sch, "winograd_input")
        if block is not None:
            return self._input(sch, block, lanes)
        block, name = _find(sch, "winograd_output_m")
        if block is not None:
            return self._output(sch, block, self.desc, lanes, int(name[len("winograd_output_m"):]))
        return None

    @staticmethod
    def _input(sch, block, lanes):
        tile, _ = _find(sch, "winograd_tile")
        k, p, c = sch.get_loops(block)
        co, ci = sch.split(c, [None, lane_divisor(_extent(sch, c), lanes)])
        sch.reorder(p, co, k, ci)
        sch.parallel(p)
        sch.unroll(k)
        sch.vectorize(ci)
        if tile is not None:  # one (A, A, lanes) input tile, zero-padded, in a local buffer
            sch.compute_at(tile, co)
            sch.set_scope(tile, 0, "local")
            sch.vectorize(sch.get_loops(tile)[-1])
        return sch

    @staticmethod
    def _output(sch, block, desc, lanes, m):
        # The transform writes each m x m x L output tile into a local buffer (``cache_write``); the
        # copy out of it carries the convolution's epilogue (bias, ReLU/SiLU, residual add, fused in
        # by FuseOps: intermediates inlined into the last block, which is inlined into the copy) and
        # runs right after the tile (``reverse_compute_at``), so each output is stored once and the
        # epilogue reads plain loads. (Inlined into the transform itself, every use of its value in
        # the epilogue copied the whole transform expression: SiLU uses it twice, and TIR's CSE
        # spent a minute on YOLO.) What cannot be inlined (a transpose or concat at the end of a
        # model) stays a separate, parallel, vectorised loop nest.
        for intermediate in _blocks_after(sch, block)[:-1]:
            try:
                sch.compute_inline(intermediate)
            except Exception:  # pylint: disable=broad-except
                pass
        copy = sch.cache_write(block, 0, "local")
        leftover = []
        for consumer in _blocks_after(sch, copy):
            try:
                sch.reverse_compute_inline(consumer)
            except Exception:  # pylint: disable=broad-except
                leftover.append(consumer)
        n, h, w, k = sch.get_loops(block)
        ty, a = sch.split(h, [None, m])
        tx, b = sch.split(w, [None, m])
        ko, ki = sch.split(k, [None, lane_divisor(_extent(sch, k), lanes)])
        sch.reorder(n, ty, tx, ko, a, b, ki)
        sch.parallel(sch.fuse(n, ty, tx))
        sch.unroll(a)
        sch.unroll(b)
        sch.vectorize(ki)
        sch.reverse_compute_at(copy, ko)
        sch.vectorize(sch.get_loops(copy)[-1])
        for other in leftover:
            schedule_spatial_block(sch, other, desc)
        return sch


def _blocks_after(sch: s_tir.Schedule, block) -> list:
    """The root's blocks after ``block``, in order."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    return blocks[names.index(sch.get(block).name_hint) + 1:]
