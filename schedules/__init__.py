"""Default schedules: every fused kernel gets a real schedule for its target, no tuning needed.

Two entry points are used by ``compiler.pipeline``:

* :func:`preferred_layouts` — the data/kernel layouts Kiln converts convolutions to before lowering
  (passed to ``relax.transform.ConvertLayout``), or ``None`` to keep the model's layouts.
* :func:`default_schedule_pass` — a pass over the fused module that schedules every PrimFunc not
  already scheduled (functions carrying ``tirx.is_scheduled``, e.g. from tuning records, are skipped).

Per-family rules live in sub-packages (``schedules.x86``, ``schedules.cuda``); each rule is a DLight ``ScheduleRule``.
"""

from __future__ import annotations

import tvm

from targets import TargetDescription


def install_hooks() -> None:
    """Kiln's additions to TVM's process-global registries, made explicitly (never at import) by
    ``compiler.pipeline`` before it converts layouts or builds, and by the tuner's build workers so
    candidates are built exactly as compile builds them:

    * a layout-inference rule for ``relax.clip`` (ReLU6), which TVM 0.27 lacks
      (``schedules.x86.conv.register_clip_layout_inference``);
    * vectorisable polynomial lowerings of float ``exp``/``erf``/``tanh``/``sigmoid`` for the ``llvm``
      target kind (``schedules.x86.elementwise.install_vector_math``; max relative error ~3e-7).

    Both are idempotent. They stay in force for the rest of the process: other TVM builds in the same
    process after a Kiln compile also get the polynomial lowerings on LLVM targets."""
    from .x86 import conv, elementwise

    conv.register_clip_layout_inference()
    elementwise.install_vector_math()


def preferred_layouts(target: TargetDescription) -> dict[str, list[str]] | None:
    """Layouts for ``ConvertLayout`` on ``target`` (``None``: leave the model's layouts alone)."""
    if target.family in ("x86", "arm"):  # ARM reuses the x86 rules: their widths come from the target
        from . import x86

        return x86.PREFERRED_LAYOUTS
    return None


def default_schedule_pass(target: TargetDescription) -> tvm.transform.Pass:
    """The pass that gives every unscheduled kernel a default schedule for ``target``."""
    from tvm.s_tir import dlight as dl

    if target.family in ("x86", "arm"):  # the rules read widths, registers and caches from the description
        from . import x86

        return dl.ApplyDefaultSchedule(*x86.rules(target))
    if target.family == "cuda":  # DLight's GPU rules plus Kiln's (schedules/cuda); apply inside `with target:`
        from . import cuda

        return dl.ApplyDefaultSchedule(*cuda.rules(target))
    return tvm.transform.Sequential([])
