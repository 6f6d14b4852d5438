"""x86 default schedules (AVX2 / AVX-512): one DLight ``ScheduleRule`` per operator class.

Rules are tried in order for each fused PrimFunc; the first that returns a schedule wins.

* ``winograd``    — the input/output transforms of Winograd convolutions (``compiler.winograd``)
* ``conv``        — conv2d (regular, strided, 1x1, grouped, depthwise) with fused epilogues
* ``pool``        — max/avg pooling, adaptive pooling
* ``matmul``      — dense / matmul / batched matmul with fused epilogues
* ``reduction``   — softmax, layer norm, mean/sum and other reductions
* ``elementwise`` — injective kernels (elementwise chains, transpose, concat, resize) and the
                    generic fallback that parallelises and vectorises anything left
"""

from __future__ import annotations

from targets import TargetDescription

from .conv import PREFERRED_LAYOUTS  # re-exported for schedules.preferred_layouts

__all__ = ["PREFERRED_LAYOUTS", "design_space", "rules"]


def rules(desc: TargetDescription) -> list:
    """The x86 rules for ``desc`` (an x86 or ARM description: lanes, registers, caches and cores come
    from it), most specific first."""
    from . import conv, elementwise, matmul, pool, reduction, winograd

    return [
        winograd.WinogradTransform(desc),
        conv.Conv2D(desc),
        pool.Pool(desc),
        matmul.Matmul(desc),
        reduction.Reduction(desc),
        elementwise.Elementwise(desc),
        elementwise.Fallback(desc),
    ]


def design_space(desc: TargetDescription):
    """Kiln's tunable templates as a MetaSchedule ``ScheduleFn`` body for ``desc``: the task's
    schedule -> a list of design spaces (empty when no template applies). The tuner searches them
    next to MetaSchedule's own rules (``schedules.search.Searcher``)."""
    from . import conv

    rule = conv.Conv2D(desc)

    def space(sch):
        out = rule.design_space(sch)
        return [out] if out is not None else []

    return space
