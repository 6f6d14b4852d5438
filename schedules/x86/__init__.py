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

from .conv import PREFERRED_LAYOUTS  # noqa: F401  (re-exported for schedules.preferred_layouts)


def rules() -> list:
    """The x86 rules, most specific first."""
    from . import conv, elementwise, matmul, pool, reduction, winograd

    return [
        winograd.WinogradTransform(),
        conv.Conv2D(),
        pool.Pool(),
        matmul.Matmul(),
        reduction.Reduction(),
        elementwise.Elementwise(),
        elementwise.Fallback(),
    ]


def design_space(target):
    """Kiln's tunable templates as a MetaSchedule ``ScheduleFn`` body for ``target``: the task's
    schedule -> a list of design spaces (empty when no template applies). The tuner searches them
    next to MetaSchedule's own rules (``schedules.search.Searcher``)."""
    from . import conv

    rule = conv.Conv2D()

    def space(sch):
        out = rule.design_space(sch, target)
        return [out] if out is not None else []

    return space
