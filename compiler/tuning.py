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

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import progress as progress_mod
from .errors import TargetError, TuningError

log = logging.getLogger(__name__)

#: Subfolder of ``log_dir`` for records measured on emulated devices (compiler.remote, emulator).
EMULATED_SUBDIR = "emulated"
#: Trials per task when neither ``trials`` nor ``time_budget`` is given.
DEFAULT_TRIALS_PER_TASK = 32
#: Trials of one batch (one MetaSchedule call on one task: evolutionary search, build, measure).
ROUND_TRIALS = 8
#: With a ``trials`` budget, no task gets more than this share of it (nor less than an even split).
MAX_SHARE = 0.5
#: Task scheduler (Ansor's / MetaSchedule's gradient scheduler): weight of the measured improvement
#: rate against the optimistic term, and how many batches back the improvement rate looks.
GRADIENT_ALPHA, GRADIENT_WINDOW = 0.2, 3
#: Early stopping: trials without gain (after the warm-up) that end a run, by default in runs with a
#: ``time_budget``; a batch gains when it lowers its task's best latency by more than this fraction.
EARLY_STOPPING_TRIALS, EARLY_STOPPING_MIN_GAIN = 64, 0.01
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
    run; ``elapsed_s``: wall time of the run; ``rounds``: batches run (one task's trials each);
    ``stopped_by``: ``"trials"`` (the model's tasks hold ``trials`` trials, or every task its max
    share), ``"time"`` (the next batch would not fit in ``time_budget``) or ``"early-stopping"`` (no
    batch gained for ``early_stopping`` trials after the warm-up); ``estimated_ms``: estimated
    end-to-end kernel time, the sum over tasks of weight x best record's latency (the schedule compile
    applies; tasks without a record count at their default latency; None if neither is known for some
    task); ``default_estimated_ms``: the
    same sum with default latencies, measured the same way. ``cost_model``: ``"warm"`` when the
    search started from the cost model saved with the logs, ``"cold"`` when it started from scratch,
    ``None`` when no search ran. ``progress_file``: the JSON-lines trajectory of this model's runs
    (one entry per batch: trials, estimated end-to-end ms; see :func:`progress_path`).
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
    progress_file: Path | None = None

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


@dataclass
class TaskState:
    """What the task scheduler knows of one task: ``weight`` (calls per inference), ``trials`` in the
    log, ``history`` of its best latency (ms) at the start of this run and after each of its batches
    since, ``cap`` on its trials (its max share of the budget), ``warm`` once it has had its first batch
    (in this run, or a full one in an earlier run)."""

    weight: float
    trials: int
    history: list[float]
    cap: float = math.inf
    warm: bool = False

    @property
    def best(self) -> float:
        return self.history[-1]


def gain(state: TaskState, alpha: float = GRADIENT_ALPHA, window: int = GRADIENT_WINDOW) -> float:
    """Estimated end-to-end gain (ms per batch) of one more batch on a task, as in Ansor's gradient
    task scheduler: ``weight x (alpha x backward + (1 - alpha) x forward)`` where ``backward`` is the
    improvement of the task's best per batch over its last ``window`` batches (measured) and
    ``forward = best / batches`` is the optimistic term (large for tasks with few trials, shrinking
    as a task accumulates them)."""
    hist = state.history
    k = min(window, len(hist) - 1)
    backward = (hist[-1 - k] - hist[-1]) / k if k > 0 else 0.0
    forward = hist[-1] / max(state.trials / ROUND_TRIALS, 1.0)
    return state.weight * (alpha * max(backward, 0.0) + (1.0 - alpha) * forward)


def next_batch(states, remaining: float) -> tuple[int, int] | None:
    """The scheduler's choice: ``(task index, trials)`` for the next batch, or None when no task may
    take more (every task at its cap, or no trials ``remaining``).

    Warm-up first: every task that has not had a batch yet gets one, the heaviest (weight x latency)
    first, topped up to :data:`ROUND_TRIALS` trials (an even split of what remains when that is
    less). Then the task of largest :func:`gain`. Ties go to the lower index: deterministic."""
    open_ = [i for i, s in enumerate(states) if s.trials < s.cap]
    if not open_ or remaining < 1:
        return None
    cold = [i for i in open_ if not states[i].warm]
    if cold:
        i = max(cold, key=lambda i: (states[i].weight * states[i].best, -i))
        n = min(max(ROUND_TRIALS - states[i].trials, 1), max(remaining // len(cold), 1))
    else:
        i = max(open_, key=lambda i: (gain(states[i]), -i))
        n = ROUND_TRIALS
    return i, int(min(n, remaining, states[i].cap - states[i].trials))


def progress_path(work: Path, model: str) -> Path:
    """Where ``tune`` appends the trajectory of ``model``'s runs: ``<work>/progress/<model>.jsonl``."""
    import re

    return Path(work) / "progress" / (re.sub(r"[^A-Za-z0-9_.-]+", "_", model).strip("_") + ".jsonl")


def _append_jsonl(path: Path, entry: dict) -> None:
    """Append one JSON line with a single ``write`` on an ``O_APPEND`` descriptor (concurrent
    appends never interleave; a kill mid-write tears at most this line, which readers skip)."""
    import json
    import os

    data = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_progress(path) -> list[dict]:
    """The entries of a progress file (lines that do not parse, such as a torn last line, skipped)."""
    import json

    out = []
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def tune(model, target="x86", *, example_inputs=None, input_shapes=None, trials=None, time_budget=None,
         log_dir="tuning_logs", resume=True, early_stopping=None, progress=None, rpc_tracker=None,
         rpc_key=None, precision="fp32", calibration=None) -> TuningReport:
    """See :func:`compiler.tune`."""
    import tvm_ffi

    from schedules import database as logs_db
    from schedules import search

    import targets

    from . import pipeline
    from .module import use_all_cores
    from .version import __version__

    t_start = time.perf_counter()
    desc = targets.resolve(target)
    if rpc_tracker is not None:  # measured on the devices under rpc_key (compiler.remote): checked now
        from . import remote

        if remote.check_tuning_devices(rpc_tracker, rpc_key, desc).emulated:
            # timings under QEMU say nothing of a real board: never let them answer its queries
            log_dir = Path(log_dir) / EMULATED_SUBDIR
            log.warning("records measured on emulated devices go to %s, apart from real boards' logs "
                        "(compile with tuning_logs=%s to use them, for correctness checks)", log_dir, log_dir)
    elif desc.family == "cuda" and desc.buildable and desc.is_cross:
        raise TargetError(f"target {desc.name!r} (NVIDIA {desc.arch}) is tuned on a machine with that GPU, and this "
                          "one has none usable (no NVIDIA driver, or tvm.cuda(0) does not exist): run the same "
                          "`kiln tune` there, then compile anywhere with its logs (--tuning-logs DIR)")
    elif not desc.buildable or desc.is_cross:
        raise TargetError(f"target {desc.name!r} ({desc.family}) cannot be tuned on this machine: its kernels "
                          "must be measured on the device. The x86 targets tune here; ARM targets through an RPC "
                          "tracker with devices registered under a key (--rpc-tracker HOST:PORT --rpc-key KEY; "
                          "README, Remote devices)")
    if trials is not None and (not isinstance(trials, int) or isinstance(trials, bool) or trials < 1):
        raise TuningError(f"trials must be a positive integer, got {trials!r}")
    budget_s = parse_duration(time_budget) if time_budget is not None else None
    deadline = t_start + budget_s if budget_s is not None else math.inf
    default_patience = early_stopping is None or early_stopping is True
    if default_patience:
        early_stopping = EARLY_STOPPING_TRIALS if budget_s is not None or early_stopping else 0
    early_stopping = 0 if early_stopping is False else early_stopping
    if not isinstance(early_stopping, int) or early_stopping < 0:
        raise TuningError(f"early_stopping must be a number of trials >= 0 (0: off), got {early_stopping!r}")

    lowered = pipeline.lower(model, desc, example_inputs=example_inputs, input_shapes=input_shapes,
                             precision=precision, calibration=calibration)
    imported, fused = lowered.imported, lowered.fused
    name = str(model) if isinstance(model, (str, Path)) else imported.source
    tvm_target = desc.to_tvm()
    tasks = search.extract_tasks(fused, tvm_target)
    if not tasks:
        raise TuningError(f"{imported.source}: the model has no kernels to tune")

    if not resume:
        moved = logs_db.set_aside(log_dir, desc)
        if moved:
            log.warning("resume=False: previous tuning logs for %s moved to %s", desc.name, moved)
    stale = logs_db.set_aside_stale(log_dir, desc)
    if stale:
        log.warning("tuning logs for %s were timed under protocol %r, this Kiln times %r (caches flushed, as "
                    "kernels run in a model): they were moved to %s and tuning starts afresh; "
                    "compile(tuning_logs=...) can still use them there", desc.name, stale[1],
                    search.MEASUREMENT, stale[0])
    logs = logs_db.open_logs(log_dir, desc, create=True)
    db = logs.database
    keys = [str(tvm_ffi.structural_hash(t.mod)) for t in tasks]
    logs_db.record_model(logs.work, name, [(t.name, k, t.weight) for t, k in zip(tasks, keys)])
    # Candidates are measured in worker processes: let them use every core, as compiled modules do
    # (TVM's runtime would otherwise start one thread on this 2-core machine and tune for that).
    use_all_cores()
    searcher = None  # started when something must be measured: a finished run starts no workers
    cost_model_path = str(logs.work / logs_db.COST_MODEL_FILE)
    # CUDA: candidates embed nvcc-compiled device code, as compile's builds do (compiler/cuda.py); the
    # build workers inherit the environment, so it is set before they start and kept until they stop.
    gpu_env = contextlib.ExitStack()

    def start_searcher():
        nonlocal searcher
        if searcher is None:
            if desc.family == "cuda":
                from . import cuda

                gpu_env.enter_context(cuda.build_environment(desc.name))
            parts = {} if rpc_tracker is None else remote.tuning_parts(rpc_tracker, rpc_key, desc)
            searcher = search.Searcher(tvm_target, desc.cores, str(logs.work), cost_model=cost_model_path, desc=desc,
                                       **parts)
        return searcher

    # Kiln's default schedule of every task not seen before becomes a record of it (see module doc), and
    # so does a new default schedule of a task seen before (Kiln's rules changed) or one that failed to run.
    known = logs.defaults

    def default_outdated(i: int, key: str) -> bool:
        entry = known.get(key)
        if entry is None or entry.get("kiln_version") != __version__ or entry.get("ms") is None:
            return True  # never measured, older Kiln, or it failed last time (retried: cheap)
        return entry.get("trace") is not None and entry["trace"] != search.default_trace_key(tasks[i], desc)

    fresh = [i for i, k in enumerate(keys) if default_outdated(i, k)]
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
    if trials is None and budget_s is None:
        trials = DEFAULT_TRIALS_PER_TASK * len(tasks)
    cap = max(math.ceil(MAX_SHARE * trials), math.ceil(trials / len(tasks))) if trials is not None else math.inf

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

    if default_patience and early_stopping:
        # the default patience lets every task have one more batch: 64 trials stopped ResNet-18
        # (23 tasks) after 6 minutes, before most of its kernels had a second batch
        early_stopping = max(early_stopping, ROUND_TRIALS * len(tasks))
    log.info("tuning %s for %s: %d tasks, logs in %s, %s%s%s", name, desc.name, len(tasks), logs.work,
             f"{trials} trials" if trials is not None else "no trial limit",
             f", time budget {_hms(budget_s)}" if budget_s else "",
             f", early stopping after {early_stopping} trials without gain" if early_stopping else "")
    per_trial: list[float] = []  # seconds per trial of each batch but the first (which starts the workers)
    batches = 0

    def predict(n: int) -> float:
        if not per_trial:
            return (_GUESS_OVERHEAD_S if batches == 0 else 0.0) + n * _GUESS_PER_TRIAL_S
        recent = sorted(per_trial[-8:])
        return n * recent[len(recent) // 2]

    def latency(i: int) -> float:  # for the scheduler: best, else default, else the slowest known
        known_ms = [v for v in best + defaults if v is not None]
        return best[i] if best[i] is not None else defaults[i] if defaults[i] is not None else max(known_ms or [1.0])

    fixed = [not search.searchable(t) for t in tasks]  # default schedule only: never picked, already "warm"
    states = [TaskState(t.weight, done[i], [latency(i)], 0 if fixed[i] else cap, warm=fixed[i] or done[i] >= ROUND_TRIALS)
              for i, t in enumerate(tasks)]
    default_est = estimate(defaults)
    trajectory = progress_path(logs.work, name)
    trajectory.parent.mkdir(exist_ok=True)
    run_id = time.strftime("%Y%m%dT%H%M%S")

    def snapshot(task: int | None, n: int) -> progress_mod.Snapshot:
        now = time.perf_counter()
        left = (deadline - now) if deadline != math.inf else None
        if trials is not None:
            by_trials = (trials - sum(done)) * (sorted(per_trial)[len(per_trial) // 2] if per_trial
                                                else _GUESS_PER_TRIAL_S)
            left = by_trials if left is None else min(left, by_trials)
        return progress_mod.Snapshot(
            model=name, target=desc.name, trials=sum(done), trials_total=trials, new_trials=sum(done) - sum(start_done),
            elapsed_s=now - t_start, remaining_s=None if left is None else max(left, 0.0),
            estimated_ms=current_estimate(), default_ms=default_est, batches=batches,
            last_task=None if task is None else tasks[task].name, last_trials=n,
            since_gain=since_gain if early_stopping and all(s.warm for s in states) else None,
            patience=early_stopping or None,
            tasks=tuple(progress_mod.TaskRow(t.name, t.weight, done[i], best[i], defaults[i])
                        for i, t in enumerate(tasks)))

    def record(snap: progress_mod.Snapshot) -> None:
        _append_jsonl(trajectory, {"run": run_id, "time": round(time.time(), 3), "elapsed_s": round(snap.elapsed_s, 3),
                                   "trials": snap.trials, "new_trials": snap.new_trials, "batch": batches,
                                   "task": snap.last_task, "batch_trials": snap.last_trials,
                                   "estimated_ms": snap.estimated_ms, "default_ms": default_est})

    stopped_by = "trials"
    since_gain = 0  # trials since a batch last lowered its task's best by more than EARLY_STOPPING_MIN_GAIN
    display = progress_mod.open_display(progress)

    def ran_any() -> bool:
        return sum(done) > sum(start_done)
    try:
        record(snapshot(None, 0))
        while True:
            remaining = (trials - sum(done)) if trials is not None else math.inf
            pick = next_batch(states, remaining)
            if pick is None:
                break
            i, n = pick
            now = time.perf_counter()
            if now + predict(n) > deadline:
                stopped_by = "time"
                break
            start_searcher()
            before = len(db)
            warming = not all(s.warm for s in states)
            previous = states[i].best
            searcher.run(tasks[i], n, db, seed=batches * 7919 + done[i])
            took = time.perf_counter() - now
            measured = len(db) - before
            done[i] += measured if measured > 0 else n  # a batch that measured nothing still used its share
            best[i] = best_ms(i)
            if batches:
                per_trial.append(took / max(n, 1))
            batches += 1
            states[i].trials, states[i].warm = done[i], True
            states[i].history.append(latency(i))
            improved = states[i].best < previous * (1.0 - EARLY_STOPPING_MIN_GAIN)
            since_gain = 0 if improved or warming else since_gain + n  # patience counts from the warm-up's end
            snap = snapshot(i, n)
            record(snap)
            display.update(snap)
            if early_stopping and all(s.warm for s in states) and since_gain >= early_stopping:
                stopped_by = "early-stopping"
                break
    except KeyboardInterrupt:
        log.warning("tuning interrupted after %d new trials: every finished trial is saved in %s; run the same "
                    "command again to resume", sum(done) - sum(start_done), logs.work)
        raise
    finally:
        display.close()
        if searcher is not None:
            if ran_any():
                searcher.save_cost_model(cost_model_path)
            searcher.close()
        gpu_env.close()
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
        elapsed_s=time.perf_counter() - t_start, rounds=batches, stopped_by=stopped_by,
        estimated_ms=current_estimate(), default_estimated_ms=estimate(defaults), repairs=tuple(logs.repairs),
        cost_model=(None if searcher is None or not ran_any()
                    else "warm" if searcher.warm_started else "cold"),
        progress_file=trajectory,
    )
    log.info("done: %d new trials (%d in the log) in %s, stopped by %s%s", report.new_trials, report.total_trials,
             _hms(report.elapsed_s), stopped_by,
             f", est. {report.estimated_ms:.3f} ms" if report.estimated_ms is not None else "")
    return report

