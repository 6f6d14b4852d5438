"""``compiler.tune``: search schedules for a model's kernels and keep the best in target-keyed logs.

Tuning and compiling share one pipeline: tasks are the fused kernels of exactly the module
``pipeline.fuse(pipeline.prepare(imported.mod, target), target)`` returns, the module ``compile``
schedules, so every record found here answers compile's query for its kernel.

Never slower than the defaults: the first time a task is tuned, Kiln's default schedule for it is
built like a candidate, timed by the runner that times candidates, and stored as a record of the
task (``schedules.search.Searcher.measure_defaults``). A task's best record is therefore at worst
its default schedule, which compile then applies; and MetaSchedule's evolutionary search, which
seeds from the best records, starts from it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TargetError, TuningError

log = logging.getLogger(__name__)

#: Trials per task when neither ``trials`` nor ``time_budget`` is given.
DEFAULT_TRIALS_PER_TASK = 32
#: Trials one task gets per round (one MetaSchedule batch: evolutionary search, build, measure).
ROUND_TRIALS = 8
#: Before any batch has been timed: seconds a batch is assumed to take on top of its trials
#: (search, worker start-up) and seconds per trial.
_GUESS_OVERHEAD_S, _GUESS_PER_TRIAL_S = 20.0, 4.0


@dataclass(frozen=True)
class TaskReport:
    """One tuning task (a fused kernel; kernels with identical TIR share one task).

    ``name``: the task (kernel) name; ``kernels``: the fused kernels it covers; ``weight``: how many
    times one inference calls it; ``trials``: measured trials in the log for it (every run so far);
    ``new_trials``: of those, measured by this run; ``best_ms``: its best record's measured
    latency, the default schedule's record included (None when nothing was measured);
    ``default_ms``: its latency with Kiln's default schedule, measured by the runner that measures
    candidates when the task was first tuned (None when that could not be built or timed);
    ``best_is_default``: the best record is the default schedule (no trial beat it yet).
    """

    name: str
    kernels: tuple[str, ...]
    weight: float
    trials: int
    new_trials: int
    best_ms: float | None
    default_ms: float | None
    best_is_default: bool = False


@dataclass(frozen=True)
class TuningReport:
    """What a tuning run did.

    ``target``/``fingerprint``: the target and the key of its logs; ``log_dir``: the folder holding
    this target's database (``<log_dir>/<fingerprint>``); ``tasks``: one :class:`TaskReport` each;
    ``total_trials``: trials in the log for this model's tasks; ``new_trials``: measured by this
    run; ``elapsed_s``: wall time of the run; ``rounds``: rounds run; ``stopped_by``: ``"trials"``
    (every task reached its share of ``trials``) or ``"time"`` (the next batch would not fit in
    ``time_budget``); ``estimated_ms``: estimated end-to-end kernel time, the sum over tasks of
    weight x best record's latency (the schedule compile applies; tasks without a record count at
    their default latency; None if neither is known for some task); ``default_estimated_ms``: the
    same sum with default latencies, measured the same way. ``cost_model``: ``"warm"`` when the
    search started from the cost model saved with the logs, ``"cold"`` when it started from scratch,
    ``None`` when no search ran.
    """

    model: str
    target: str
    fingerprint: str
    log_dir: Path
    tasks: tuple[TaskReport, ...]
    total_trials: int
    new_trials: int
    elapsed_s: float
    rounds: int
    stopped_by: str
    estimated_ms: float | None
    default_estimated_ms: float | None
    repairs: tuple[str, ...] = field(default=())
    cost_model: str | None = None

    def __str__(self) -> str:
        lines = [f"tuned {self.model} for {self.target} ({self.fingerprint}): {self.new_trials} new trials, "
                 f"{self.total_trials} in the log, {_hms(self.elapsed_s)}, stopped by {self.stopped_by}",
                 f"  logs: {self.log_dir}"]
        if self.estimated_ms is not None:
            default = (f" (default schedules {self.default_estimated_ms:.4g} ms, "
                       f"{self.default_estimated_ms / self.estimated_ms:.2f}x faster)"
                       if self.default_estimated_ms else "")
            lines.append(f"  estimated end-to-end kernel time: {self.estimated_ms:.4g} ms{default}")
        width = max((len(t.name) for t in self.tasks), default=4)
        lines.append(f"  {'task':<{width}}  weight  trials   best ms   default ms")
        for t in self.tasks:
            note = "  (default schedule)" if t.best_is_default else ""
            lines.append(f"  {t.name:<{width}}  {t.weight:>6g}  {t.trials:>6}  {_ms(t.best_ms):>8}  "
                         f"{_ms(t.default_ms):>11}{note}")
        return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}" if v >= 0.001 else f"{v:.2e}"


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def parse_duration(text) -> float:
    """``"8h"``, ``"30m"``, ``"90s"``, ``"1h30m"`` or a number of seconds -> seconds."""
    import re

    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        s = str(text).strip().lower()
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", s)
        if not s or parts is None or not any(parts.groups()):
            raise TuningError(f"cannot read the time budget {text!r}: use e.g. 8h, 30m, 90s or 1h30m")
        h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
        seconds = h * 3600 + m * 60 + sec
    if seconds <= 0:
        raise TuningError(f"the time budget must be positive, got {text!r}")
    return seconds


def _shares(total: int, tasks, priority) -> list[int]:
    """Split ``total`` trials over tasks: equal shares, the remainder to the highest ``priority``."""
    n = len(tasks)
    base, extra = divmod(total, n)
    order = sorted(range(n), key=lambda i: -priority[i])
    shares = [base] * n
    for i in order[:extra]:
        shares[i] += 1
    return shares


def tune(model, target="x86", *, example_inputs=None, input_shapes=None, trials=None, time_budget=None,
         log_dir="tuning_logs", resume=True) -> TuningReport:
    """See :func:`compiler.tune`."""
    import tvm_ffi

    from schedules import database as logs_db
    from schedules import search

    from . import __version__, pipeline
    from .build import buildable, import_model, resolve_target
    from .module import _use_all_cores

    t_start = time.perf_counter()
    desc = resolve_target(target)
    if not buildable(desc) or desc.is_cross:
        raise TargetError(f"target {desc.name!r} ({desc.family}) cannot be tuned by this Kiln yet (its kernels "
                          "must be measured on the device); the x86 targets can")
    if trials is not None and (not isinstance(trials, int) or isinstance(trials, bool) or trials < 1):
        raise TuningError(f"trials must be a positive integer, got {trials!r}")
    budget_s = parse_duration(time_budget) if time_budget is not None else None
    deadline = t_start + budget_s if budget_s is not None else math.inf

    imported = import_model(model, example_inputs=example_inputs, input_shapes=input_shapes)
    name = str(model) if isinstance(model, (str, Path)) else imported.source
    fused, _groups = pipeline.fuse(pipeline.prepare(imported.mod, desc), desc)
    tvm_target = desc.to_tvm()
    tasks = search.extract_tasks(fused, tvm_target)
    if not tasks:
        raise TuningError(f"{imported.source}: the model has no kernels to tune")

    if not resume:
        moved = logs_db.set_aside(log_dir, desc)
        if moved:
            log.warning("resume=False: previous tuning logs for %s moved to %s", desc.name, moved)
    logs = logs_db.open_logs(log_dir, desc, create=True)
    db = logs.database
    keys = [str(tvm_ffi.structural_hash(t.mod)) for t in tasks]
    logs_db.record_model(logs.work, name, [(t.name, k, t.weight) for t, k in zip(tasks, keys)])
    # Candidates are measured in worker processes: let them use every core, as compiled modules do
    # (TVM's runtime would otherwise start one thread on this 2-core machine and tune for that).
    _use_all_cores()
    searcher = None  # started when something must be measured: a finished run starts no workers
    cost_model_path = str(logs.work / logs_db.COST_MODEL_FILE)

    def start_searcher():
        nonlocal searcher
        if searcher is None:
            searcher = search.Searcher(tvm_target, desc.cores, str(logs.work), cost_model=cost_model_path)
        return searcher

    # Kiln's default schedule of every task not seen before becomes a record of it (see module doc).
    known = logs.defaults
    fresh = [i for i, k in enumerate(keys) if known.get(k, {}).get("kiln_version") != __version__]
    if fresh:
        measured = start_searcher().measure_defaults([tasks[i] for i in fresh], desc, db)
        for i, m in zip(fresh, measured):
            trace = None
            if m.record is not None:
                db.commit_tuning_record(m.record)
                trace = logs_db.record_trace_key(m.record)
            else:
                log.warning("task %s: %s; its tuned records are not checked against the default", tasks[i].name,
                            m.error)
            logs.set_default(keys[i], m.seconds * 1e3 if m.seconds is not None else None, trace)
        known = logs.defaults
    defaults = [known.get(k, {}).get("ms") for k in keys]
    counts0 = logs.record_counts()
    done = [counts0.get(k, 0) for k in keys]
    start_done = list(done)
    flops_priority = [t.weight * (d or 0.0) for t, d in zip(tasks, defaults)]
    if trials is None and budget_s is None:
        trials = DEFAULT_TRIALS_PER_TASK * len(tasks)
    caps = _shares(trials, tasks, flops_priority) if trials is not None else [math.inf] * len(tasks)

    def best_ms(i: int) -> float | None:
        if not db.has_workload(tasks[i].mod):
            return None
        top = db.get_top_k(db.commit_workload(tasks[i].mod), 1)
        if not top or not top[0].run_secs:
            return None
        secs = [float(s) for s in top[0].run_secs]
        mean = sum(secs) / len(secs)
        return mean * 1e3 if mean < 1e9 else None  # failed candidates are stored with 1e10 s

    def best_is_default(i: int) -> bool:
        trace = known.get(keys[i], {}).get("trace")
        if not trace or not db.has_workload(tasks[i].mod):
            return False
        top = db.get_top_k(db.commit_workload(tasks[i].mod), 1)
        return bool(top) and logs_db.record_trace_key(top[0]) == trace

    best = [best_ms(i) for i in range(len(tasks))]

    def estimate(values) -> float | None:
        if any(v is None for v in values):
            return None
        return sum(t.weight * v for t, v in zip(tasks, values))

    def current_estimate():
        return estimate([b if b is not None else d for b, d in zip(best, defaults)])

    # MetaSchedule's per-task search logs go to a file in the log folder, not to the console.
    task_logger = logging.getLogger("kiln.tuning.task")
    task_logger.propagate = False
    (logs.work / "logs").mkdir(exist_ok=True)
    handler = logging.FileHandler(logs.work / "logs" / "search.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    task_logger.addHandler(handler)
    task_logger.setLevel(logging.INFO)
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    ms_level = ms_logger.level
    ms_logger.setLevel(logging.WARNING)

    log.info("tuning %s for %s: %d tasks, logs in %s, %s%s", name, desc.name, len(tasks), logs.work,
             f"{trials} trials" if trials is not None else "no trial limit",
             f", time budget {_hms(budget_s)}" if budget_s else "")
    per_trial: list[float] = []  # seconds per trial of each batch but the first (which starts the workers)

    def predict(n: int) -> float:
        if not per_trial:
            return (_GUESS_OVERHEAD_S if rounds == 0 and not ran else 0.0) + n * _GUESS_PER_TRIAL_S
        recent = sorted(per_trial[-8:])
        return n * recent[len(recent) // 2]

    rounds = 0
    stopped_by = "trials"

    def ran_any() -> bool:
        return sum(done) > sum(start_done)
    try:
        while True:
            # This round: every task still under its cap gets a batch, the ones that weigh most on
            # the end-to-end latency (weight x current best) first.
            order = sorted((i for i in range(len(tasks)) if done[i] < caps[i]),
                           key=lambda i: -(tasks[i].weight * (best[i] or defaults[i] or math.inf)))
            if not order:
                break
            ran = 0
            for i in order:
                n = int(min(ROUND_TRIALS, caps[i] - done[i]))
                now = time.perf_counter()
                if now + predict(n) > deadline:
                    stopped_by = "time"
                    break
                start_searcher()
                before = len(db)
                searcher.run(tasks[i], n, db, seed=rounds * 7919 + done[i])
                took = time.perf_counter() - now
                measured = len(db) - before
                done[i] += measured if measured > 0 else n  # a batch that measured nothing still used its share
                best[i] = best_ms(i)
                if rounds or ran:
                    per_trial.append(took / max(n, 1))
                ran += 1
            if ran:
                rounds += 1
                _progress(rounds, tasks, done, start_done, caps, best, defaults, t_start, deadline, current_estimate())
            if stopped_by == "time":
                break
    except KeyboardInterrupt:
        log.warning("tuning interrupted after %d new trials: every finished trial is saved in %s; run the same "
                    "command again to resume", sum(done) - sum(start_done), logs.work)
        raise
    finally:
        if searcher is not None:
            if rounds or ran_any():
                searcher.save_cost_model(cost_model_path)
            searcher.close()
        task_logger.removeHandler(handler)
        handler.close()
        ms_logger.setLevel(ms_level)

    counts = logs.record_counts()
    reports = tuple(
        TaskReport(t.name, t.kernels, t.weight, counts.get(k, 0), counts.get(k, 0) - start_done[i], best[i], defaults[i],
                   best_is_default(i))
        for i, (t, k) in enumerate(zip(tasks, keys))
    )
    report = TuningReport(
        model=name, target=desc.name, fingerprint=desc.fingerprint(), log_dir=logs.work, tasks=reports,
        total_trials=sum(r.trials for r in reports), new_trials=sum(r.new_trials for r in reports),
        elapsed_s=time.perf_counter() - t_start, rounds=rounds, stopped_by=stopped_by,
        estimated_ms=current_estimate(), default_estimated_ms=estimate(defaults), repairs=tuple(logs.repairs),
        cost_model=(None if searcher is None or not (rounds or ran_any())
                    else "warm" if searcher.warm_started else "cold"),
    )
    log.info("done: %d new trials (%d in the log) in %s, stopped by %s%s", report.new_trials, report.total_trials,
             _hms(report.elapsed_s), stopped_by,
             f", est. {report.estimated_ms:.3f} ms" if report.estimated_ms is not None else "")
    return report


def _progress(rounds, tasks, done, start_done, caps, best, defaults, t_start, deadline, est) -> None:
    elapsed = time.perf_counter() - t_start
    total_cap = sum(caps)
    trials = f"{sum(done)}/{total_cap}" if total_cap != math.inf else f"{sum(done)}"
    remaining = f", {_hms(max(0.0, deadline - time.perf_counter()))} left" if deadline != math.inf else ""
    per_task = ", ".join(f"{t.name} {_ms(b)}" for t, b in zip(tasks, best))
    est_text = f", est. {est:.3f} ms" if est is not None else ""
    log.info("round %d: %s trials (%d new), %s elapsed%s%s | best ms: %s", rounds, trials,
             sum(done) - sum(start_done), _hms(elapsed), remaining, est_text, per_task)
