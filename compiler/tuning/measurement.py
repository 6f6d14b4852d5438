"""How candidates and Kiln's default schedules are timed: the measurement protocol recorded with the logs.

Both the local runner (:class:`compiler.tuning.search.Searcher`) and the RPC runner
(:mod:`compiler.tuning.rpc`) time candidates with the evaluator, argument filling and settings here;
:data:`MEASUREMENT` names the protocol, and :mod:`compiler.tuning.database` stores it in each
target's ``target.json`` so logs timed differently are never mixed.
"""

from __future__ import annotations

import numpy as np

# TVM is imported in the functions that use it: the database imports MEASUREMENT from here, and
# reading logs (``kiln logs list``) needs no TVM.

#: How candidates (and Kiln's default schedules) are timed; stored with the logs (``target.json``), and
#: logs measured under another protocol are never mixed with these (``compiler.tuning.database``).
#:
#: ``cold-weights-1``: on CPUs each timed call runs once after flushing every argument but the first
#: (the input activation) from the caches: MetaSchedule's ``enable_cpu_cache_flush``. In a model the
#: weights of a kernel were last touched one inference ago and come from DRAM/L3, so a hot-cache
#: timing (MetaSchedule's default; logs that record no protocol were timed so: ``hot``) made
#: ResNet-18's 7x7x512 convolutions look 1.6x faster than they run in the model (0.77 vs 1.25 ms)
#: and steered the search to schedules that only win with hot caches. Flushed timings match the in-model profile
#: (``CompiledModule.profile``) within a few percent, kernel for kernel.
MEASUREMENT = "cold-weights-1"
#: Timed calls per candidate under :data:`MEASUREMENT` (each one call, caches flushed before it).
MEASURE_REPEAT = 10
#: A timed call slower than this many times the median of its candidate's calls is dropped as an
#: outlier (a page fault, a thread pool waking, the machine's other work): MetaSchedule ranks records by
#: the mean of their times, which one 2x outlier in ten moves by 10 %.
OUTLIER_FACTOR = 1.25


def robust_times(costs: list[float]) -> list[float]:
    """``costs`` without the outliers (see :data:`OUTLIER_FACTOR`); never empty when ``costs`` is not."""
    if len(costs) < 3:
        return list(costs)
    ordered = sorted(costs)
    median = ordered[len(ordered) // 2]
    return [c for c in costs if c <= OUTLIER_FACTOR * median]


def run_evaluator(rt_mod, device, evaluator_config, repeated_args) -> list[float]:
    """MetaSchedule's evaluator (``runner.utils.run_evaluator_common``), outliers dropped
    (:func:`robust_times`): the runners' ``f_run_evaluator``, for candidates and defaults alike."""
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

    return robust_times(run_evaluator_common(rt_mod, device, evaluator_config, repeated_args))


def rpc_run_evaluator(session, rt_mod, device, evaluator_config, repeated_args) -> list[float]:
    """:func:`run_evaluator` with the RPC runner's signature (a session first)."""
    return run_evaluator(rt_mod, device, evaluator_config, repeated_args)


def _fill_for_measure(random_fill):
    """MetaSchedule's random fill for float tensors; integer tensors are zeros, since they are
    indices (BERT's embedding gather, ``take``): random ones point out of range and every candidate
    of such a kernel, its default included, failed to run (the scheduler kept spending batches on
    it). Zeros gather one row again and again, so such a kernel is timed with warm caches."""

    def fill(arg):
        if str(arg.dtype).startswith(("int", "uint", "bool")):
            arg.copyfrom(np.zeros([int(d) for d in arg.shape], dtype=str(arg.dtype)))
        else:
            random_fill(arg)

    return fill


def alloc_argument(device, args_info, alloc_repeat):
    """The local runner's ``f_alloc_argument``: arguments filled by :func:`_fill_for_measure`."""
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common
    from tvm.s_tir.meta_schedule.utils import get_global_func_with_default_on_worker

    random_fill = get_global_func_with_default_on_worker("tvm.contrib.random.random_fill_for_measure", None)
    return alloc_argument_common(_fill_for_measure(random_fill), device, args_info, alloc_repeat)


def rpc_alloc_argument(session, device, args_info, alloc_repeat):
    """:func:`alloc_argument` with the RPC runner's signature (a session first)."""
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    random_fill = session.get_function("tvm.contrib.random.random_fill_for_measure")
    return alloc_argument_common(_fill_for_measure(random_fill), device, args_info, alloc_repeat)


def evaluator_config(target):
    """The runner's timing settings (``ms.runner.EvaluatorConfig``) for ``target`` (see
    :data:`MEASUREMENT`); GPUs keep MetaSchedule's defaults (the flush is a CPU cache instruction)."""
    from tvm.s_tir import meta_schedule as ms

    if str(target.kind.name) in ("llvm", "c"):
        return ms.runner.EvaluatorConfig(number=1, repeat=MEASURE_REPEAT, min_repeat_ms=0,
                                         enable_cpu_cache_flush=True)
    return ms.runner.EvaluatorConfig()
