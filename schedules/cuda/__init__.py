"""Default GPU schedules for CUDA targets: DLight's GPU rules, with Kiln's own ahead of them where
DLight is weak.

Order matters: ``ApplyDefaultSchedule`` gives each unscheduled kernel to the first rule that returns
a schedule. DLight's ``Matmul`` (tiled, shared-memory staged GEMM), ``GEMV``, ``Reduction`` and
``GeneralReduction`` (one block per row, warp/block reductions) cover dense layers, attention and
normalisations; DLight's ``Matmul`` also takes dense convolutions as implicit GEMMs. Kiln's
``WindowedReduction`` (``schedules.cuda.conv``) takes what DLight schedules poorly: depthwise and
grouped convolutions and pooling, small sliding-window reductions. ``Fallback`` binds any remaining
loop nest one output element per thread.
"""

from __future__ import annotations

from targets import TargetDescription


def rules(desc: TargetDescription) -> list:
    """The rules, in priority order, for the CUDA target ``desc`` (the same for every NVIDIA GPU:
    DLight's rules read their limits from the ``tvm.target.Target`` they are applied under)."""
    from tvm.s_tir import dlight as dl

    from .conv import WindowedReduction

    return [
        dl.gpu.Matmul(),
        dl.gpu.GEMV(),
        dl.gpu.Reduction(),
        WindowedReduction(),
        dl.gpu.GeneralReduction(),
        dl.gpu.Fallback(),
    ]
