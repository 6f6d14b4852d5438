"""``compiler.tune``: search schedules for a model's kernels and keep the best in target-keyed logs.

Tuning and compiling share one pipeline: tasks are the fused kernels of exactly the module
``pipeline.lower`` returns, the module ``compile`` schedules, so every record found here answers
compile's query for its kernel.

Never slower than the defaults: the first time a task is tuned, Kiln's default schedule for it is
built like a candidate, timed by the runner that times candidates, and stored as a record of the
task (``compiler.tuning.search.Searcher.measure_defaults``). A task's best record is therefore at worst
its default schedule, which compile then applies; and MetaSchedule's evolutionary search, which
seeds from the best records, starts from it.

:func:`tune` reads as its steps: check the target can be tuned here, check the budget, lower the model
to tasks, open the logs, then a :class:`TuningRun` measures the default schedules, plans the budget,
searches batch by batch (the task scheduler, :mod:`compiler.tuning.scheduler`, picks each batch's
task) and reports.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import tvm_ffi

import targets

from .. import cuda, pipeline
from ..errors import PathError, TargetError, TuningError
from ..module import use_all_cores
from ..version import __version__
from . import database, progress, rpc, scheduler, search
from .measurement import MEASUREMENT
from .report import TaskReport, TuningReport, fmt_hms, parse_duration

#: The run logs on the package's logger (``compiler.tuning``), as the progress lines do.
log = logging.getLogger(__package__)

#: Trials per task when neither ``trials`` nor ``time_budget`` is given.
DEFAULT_TRIALS_PER_TASK = 32
#: With a ``trials`` budget, no task gets more than this share of it (nor less than an even split).
MAX_SHARE = 0.5
#: Early stopping: trials without gain (after the warm-up) that end a run, by default in runs with a
#: ``time_budget``; a batch gains when it lowers its task's best latency by more than this fraction.
EARLY_STOPPING_TRIALS, EARLY_STOPPING_MIN_GAIN = 64, 0.01
#: Before any batch has been timed: seconds a batch is assumed to take on top of its trials
#: (search, worker start-up) and seconds per trial.
_GUESS_OVERHEAD_S, _GUESS_PER_TRIAL_S = 20.0, 4.0


@dataclass
class Budget:
    """When a run stops: ``trials`` in the logs for the model (None: no limit), ``seconds`` of wall
    time (None: no limit), ``early_stopping`` trials without gain (0: off); ``default_patience``: the
    caller left ``early_stopping`` to Kiln (it then grows with the number of tasks, :meth:`for_tasks`)."""

    trials: int | None
    seconds: float | None
    early_stopping: int
    default_patience: bool

    @classmethod
    def parse(cls, trials, time_budget, early_stopping) -> "Budget":
        """The budget :func:`compiler.tune`'s arguments ask for. Raises :class:`TuningError` for
        ``trials`` that is not a positive integer, a ``time_budget`` :func:`parse_duration` cannot
        read, and ``early_stopping`` that is not a number of trials >= 0."""
        if trials is not None and (not isinstance(trials, int) or isinstance(trials, bool) or trials < 1):
            raise TuningError(f"trials must be a positive integer, got {trials!r}")
        seconds = parse_duration(time_budget) if time_budget is not None else None
        default_patience = early_stopping is None or early_stopping is True
        if default_patience:
            early_stopping = EARLY_STOPPING_TRIALS if seconds is not None or early_stopping else 0
        early_stopping = 0 if early_stopping is False else early_stopping
        if not isinstance(early_stopping, int) or early_stopping < 0:
            raise TuningError(f"early_stopping must be a number of trials >= 0 (0: off), got {early_stopping!r}")
        return cls(trials, seconds, early_stopping, default_patience)

    def for_tasks(self, n_tasks: int) -> "Budget":
        """This budget for a model of ``n_tasks`` tasks: :data:`DEFAULT_TRIALS_PER_TASK` each when neither
        trials nor time bound the run, and a default patience of at least one more batch per task (64
        trials stopped ResNet-18, 23 tasks, after 6 minutes, before most of its kernels had a second batch)."""
        trials = self.trials
        if trials is None and self.seconds is None:
            trials = DEFAULT_TRIALS_PER_TASK * n_tasks
        patience = self.early_stopping
        if self.default_patience and patience:
            patience = max(patience, scheduler.ROUND_TRIALS * n_tasks)
        return Budget(trials, self.seconds, patience, self.default_patience)

    def cap(self, n_tasks: int) -> float:
        """The most trials one task may hold (:data:`MAX_SHARE` of ``trials``, at least an even split)."""
        if self.trials is None:
            return math.inf
        return max(math.ceil(MAX_SHARE * self.trials), math.ceil(self.trials / n_tasks))


def check_tunable(desc, log_dir, rpc_tracker: str | None, rpc_key: str | None):
    """The log directory to tune ``desc`` into, after checking it can be tuned from here: through the
    devices under ``rpc_key`` at ``rpc_tracker`` (records of emulated devices go to
    ``log_dir/emulated``, apart from real boards'), else on this machine. Raises :class:`TargetError`
    for a target this machine cannot measure (a cross target without a tracker, a GPU it lacks), and
    what :func:`compiler.tuning.rpc.check_tuning_devices` raises."""
    if rpc_tracker is not None:
        if rpc.check_tuning_devices(rpc_tracker, rpc_key, desc).emulated:
            # timings under QEMU say nothing of a real board: never let them answer its queries
            log_dir = Path(log_dir) / rpc.EMULATED_SUBDIR
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
    if Path(log_dir).exists() and not Path(log_dir).is_dir():
        raise PathError(f"--log-dir {log_dir} is a file; give a folder for the tuning logs (created if missing)")
    return log_dir


def lower_to_tasks(model, desc, **lower_args) -> tuple[str, list[search.Task]]:
    """The model's name in the logs and its tuning tasks: the fused kernels of ``pipeline.lower``
    (``lower_args``: example inputs, input shapes, precision and calibration, as compile passes them).
    Raises what ``pipeline.lower`` raises, and :class:`TuningError` when there is no kernel to tune."""
    lowered = pipeline.lower(model, desc, **lower_args)
    imported = lowered.imported
    name = str(model) if isinstance(model, (str, Path)) else imported.source
    tasks = search.extract_tasks(lowered.fused, desc.to_tvm())
    if not tasks:
        raise TuningError(f"{imported.source}: the model has no kernels to tune")
    return name, tasks


def open_logs(log_dir, desc, resume: bool) -> database.TuningLogs:
    """``desc``'s database under ``log_dir``, created if needed. Logs set aside first, with a warning:
    all of them when not ``resume``, and logs timed under another measurement protocol. Raises what
    :func:`compiler.tuning.database.open_logs` raises."""
    if not resume:
        moved = database.set_aside(log_dir, desc)
        if moved:
            log.warning("resume=False: previous tuning logs for %s moved to %s", desc.name, moved)
    stale = database.set_aside_stale(log_dir, desc)
    if stale:
        log.warning("tuning logs for %s were timed under protocol %r, this Kiln times %r (caches flushed, as "
                    "kernels run in a model): they were moved to %s and tuning starts afresh; "
                    "compile(tuning_logs=...) can still use them there", desc.name, stale[1],
                    MEASUREMENT, stale[0])
    return database.open_logs(log_dir, desc, create=True)


@contextlib.contextmanager
def search_logs_to_file(work: Path):
    """While open: MetaSchedule's per-task search logs (``kiln.tuning.task.*``) go to
    ``work/logs/search.log``, not to the console, and its own logger shows warnings only."""
    task_logger = logging.getLogger("kiln.tuning.task")
    task_logger.propagate = False
    (work / "logs").mkdir(exist_ok=True)
    handler = logging.FileHandler(work / "logs" / "search.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    task_logger.addHandler(handler)
    task_logger.setLevel(logging.INFO)
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    ms_level = ms_logger.level
    ms_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        task_logger.removeHandler(handler)
        handler.close()
        ms_logger.setLevel(ms_level)


class TuningRun:
    """One tuning run of a model's ``tasks`` into ``logs``, and the state its steps share.

    Steps, in order: :meth:`measure_defaults`, :meth:`plan`, :meth:`search`, then :meth:`report`;
    :meth:`close` (or leaving ``with run:``) saves the cost model when something was measured, stops
    the searcher's workers and restores the environment. State: per task ``keys`` (workload hash),
    ``defaults`` (default latency, ms), ``done`` (trials in the log; ``start_done`` at the start),
    ``best`` (best record's latency, ms), ``states`` (what the scheduler knows); per run
    ``batches``, ``per_trial`` (seconds per trial of each timed batch), ``since_gain`` and
    ``stopped_by``.
    """

    def __init__(self, name: str, desc, tasks: list[search.Task], logs: database.TuningLogs, budget: Budget, *,
                 rpc_tracker: str | None = None, rpc_key: str | None = None, t_start: float | None = None):
        self.name, self.desc, self.tasks, self.logs, self.budget = name, desc, tasks, logs, budget
        self.rpc_tracker, self.rpc_key = rpc_tracker, rpc_key
        self.t_start = time.perf_counter() if t_start is None else t_start
        self.deadline = self.t_start + budget.seconds if budget.seconds is not None else math.inf
        self.db = logs.database
        self.tvm_target = desc.to_tvm()
        self.keys = [str(tvm_ffi.structural_hash(t.mod)) for t in tasks]
        self.searcher: search.Searcher | None = None  # started when something must be measured
        self.cost_model_path = str(logs.work / database.COST_MODEL_FILE)
        # CUDA: candidates embed nvcc-compiled device code, as compile's builds do (compiler/cuda.py); the
        # build workers inherit the environment, so it is set before they start and kept until they stop.
        self.gpu_env = contextlib.ExitStack()
        self.known = logs.defaults  # defaults.json: per workload hash, the default's latency and trace
        self.defaults: list[float | None] = []
        self.done: list[int] = []
        self.start_done: list[int] = []
        self.best: list[float | None] = []
        self.states: list[scheduler.TaskState] = []
        self.default_est: float | None = None
        self.per_trial: list[float] = []  # seconds per trial of each batch but the first (which starts the workers)
        self.batches = 0
        self.since_gain = 0  # trials since a batch last lowered its task's best by more than EARLY_STOPPING_MIN_GAIN
        self.stopped_by = "trials"
        self.trajectory = progress.progress_path(logs.work, name)
        self.run_id = time.strftime("%Y%m%dT%H%M%S")

    def __enter__(self) -> "TuningRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the searcher ------------------------------------------------------------------------------
    def start_searcher(self) -> search.Searcher:
        """The run's :class:`compiler.tuning.search.Searcher`, started at the first call (a finished
        run starts no workers): local workers, or the RPC builder and runner with a tracker."""
        if self.searcher is None:
            if self.desc.family == "cuda":
                self.gpu_env.enter_context(cuda.build_environment(self.desc.name))
            parts = {} if self.rpc_tracker is None else rpc.tuning_parts(self.rpc_tracker, self.rpc_key, self.desc)
            self.searcher = search.Searcher(self.tvm_target, self.desc.cores, str(self.logs.work),
                                            cost_model=self.cost_model_path, desc=self.desc, **parts)
        return self.searcher

    def close(self) -> None:
        """Save the cost model when this run measured trials, stop the searcher, restore the environment."""
        if self.searcher is not None:
            if self.ran_any():
                self.searcher.save_cost_model(self.cost_model_path)
            self.searcher.close()
        self.gpu_env.close()

    def remember_model(self) -> None:
        """Note the model's tasks (name, workload hash, weight) in the logs' ``models.json``."""
        database.record_model(self.logs.work, self.name,
                              [(t.name, k, t.weight) for t, k in zip(self.tasks, self.keys)])

    # -- step 1: Kiln's default schedules as records -----------------------------------------------
    def default_outdated(self, i: int) -> bool:
        """Task ``i``'s default schedule must be measured (again): never measured, by an older Kiln,
        it failed last time (retried: cheap), or Kiln's default schedule for it changed."""
        entry = self.known.get(self.keys[i])
        if entry is None or entry.get("kiln_version") != __version__ or entry.get("ms") is None:
            return True
        return entry.get("trace") is not None and entry["trace"] != search.default_trace_key(self.tasks[i], self.desc)

    def measure_defaults(self) -> None:
        """Make Kiln's default schedule of every task whose default is outdated a record of it (see the
        module doc), and note every task's default latency in ``defaults``."""
        fresh = [i for i in range(len(self.tasks)) if self.default_outdated(i)]
        if fresh:
            measured = self.start_searcher().measure_defaults([self.tasks[i] for i in fresh], self.desc, self.db)
            for i, m in zip(fresh, measured):
                trace = None
                if m.record is not None:
                    self.db.commit_tuning_record(m.record)
                    trace = database.record_trace_key(m.record)
                else:
                    log.warning("task %s: %s; its tuned records are not checked against the default",
                                self.tasks[i].name, m.error)
                self.logs.set_default(self.keys[i], m.seconds * 1e3 if m.seconds is not None else None, trace)
            self.known = self.logs.defaults
        self.defaults = [self.known.get(k, {}).get("ms") for k in self.keys]

    # -- step 2: the plan --------------------------------------------------------------------------
    def plan(self) -> None:
        """Count the trials in the logs, fit the budget to the tasks and set up the scheduler's states:
        tasks that keep their default schedule (``search.searchable``) are never picked."""
        counts = self.logs.record_counts()
        self.done = [counts.get(k, 0) for k in self.keys]
        self.start_done = list(self.done)
        self.budget = self.budget.for_tasks(len(self.tasks))
        cap = self.budget.cap(len(self.tasks))
        self.best = [self.best_ms(i) for i in range(len(self.tasks))]
        trials, patience = self.budget.trials, self.budget.early_stopping
        log.info("tuning %s for %s: %d tasks, logs in %s, %s%s%s", self.name, self.desc.name, len(self.tasks),
                 self.logs.work, f"{trials} trials" if trials is not None else "no trial limit",
                 f", time budget {fmt_hms(self.budget.seconds)}" if self.budget.seconds else "",
                 f", early stopping after {patience} trials without gain" if patience else "")
        fixed = [not search.searchable(t) for t in self.tasks]  # default schedule only: never picked, "warm"
        self.states = [scheduler.TaskState(t.weight, self.done[i], [self.latency(i)], 0 if fixed[i] else cap,
                                           warm=fixed[i] or self.done[i] >= scheduler.ROUND_TRIALS)
                       for i, t in enumerate(self.tasks)]
        self.default_est = self.estimate(self.defaults)
        self.trajectory.parent.mkdir(exist_ok=True)

    # -- latencies and estimates -------------------------------------------------------------------
    def best_ms(self, i: int) -> float | None:
        """Task ``i``'s best record's mean latency in ms (None: no record, or only failed ones)."""
        task = self.tasks[i]
        if not self.db.has_workload(task.mod):
            return None
        top = self.db.get_top_k(self.db.commit_workload(task.mod), 1)
        if not top or not top[0].run_secs:
            return None
        secs = [float(s) for s in top[0].run_secs]
        mean = sum(secs) / len(secs)
        return mean * 1e3 if mean < 1e9 else None  # failed candidates are stored with 1e10 s

    def best_is_default(self, i: int) -> bool:
        """Task ``i``'s best record is Kiln's default schedule (no trial beat it yet)."""
        trace = self.known.get(self.keys[i], {}).get("trace")
        task = self.tasks[i]
        if not trace or not self.db.has_workload(task.mod):
            return False
        top = self.db.get_top_k(self.db.commit_workload(task.mod), 1)
        return bool(top) and database.record_trace_key(top[0]) == trace

    def estimate(self, values) -> float | None:
        """End-to-end kernel time (ms) with per-task latencies ``values``: sum of weight x latency
        (None when some latency is unknown)."""
        if any(v is None for v in values):
            return None
        return sum(t.weight * v for t, v in zip(self.tasks, values))

    def current_estimate(self) -> float | None:
        """:meth:`estimate` with each task's best record, or its default where it has none."""
        return self.estimate([b if b is not None else d for b, d in zip(self.best, self.defaults)])

    def latency(self, i: int) -> float:
        """Task ``i``'s latency for the scheduler: its best, else its default, else the slowest known."""
        if self.best[i] is not None:
            return self.best[i]
        if self.defaults[i] is not None:
            return self.defaults[i]
        return max([v for v in self.best + self.defaults if v is not None] or [1.0])

    def predict(self, n: int) -> float:
        """Seconds a batch of ``n`` trials should take: the median seconds per trial of the last 8
        timed batches, or a guess before any was timed."""
        if not self.per_trial:
            return (_GUESS_OVERHEAD_S if self.batches == 0 else 0.0) + n * _GUESS_PER_TRIAL_S
        recent = sorted(self.per_trial[-8:])
        return n * recent[len(recent) // 2]

    def ran_any(self) -> bool:
        """This run measured trials."""
        return sum(self.done) > sum(self.start_done)

    def warmed_up(self) -> bool:
        """Every task has had its first batch."""
        return all(s.warm for s in self.states)

    # -- progress ----------------------------------------------------------------------------------
    def snapshot(self, task: int | None, n: int) -> progress.Snapshot:
        """The run's state for the displays, after a batch of ``n`` trials on ``task`` (None: before any)."""
        now = time.perf_counter()
        trials, patience = self.budget.trials, self.budget.early_stopping
        left = (self.deadline - now) if self.deadline != math.inf else None
        if trials is not None:
            per_trial = sorted(self.per_trial)[len(self.per_trial) // 2] if self.per_trial else _GUESS_PER_TRIAL_S
            by_trials = (trials - sum(self.done)) * per_trial
            left = by_trials if left is None else min(left, by_trials)
        return progress.Snapshot(
            model=self.name, target=self.desc.name, trials=sum(self.done), trials_total=trials,
            new_trials=sum(self.done) - sum(self.start_done), elapsed_s=now - self.t_start,
            remaining_s=None if left is None else max(left, 0.0), estimated_ms=self.current_estimate(),
            default_ms=self.default_est, batches=self.batches,
            last_task=None if task is None else self.tasks[task].name, last_trials=n,
            since_gain=self.since_gain if patience and self.warmed_up() else None, patience=patience or None,
            tasks=tuple(progress.TaskRow(t.name, t.weight, self.done[i], self.best[i], self.defaults[i])
                        for i, t in enumerate(self.tasks)))

    def record(self, snap: progress.Snapshot) -> None:
        """Append ``snap`` to the model's trajectory file."""
        progress.append_progress(self.trajectory, {
            "run": self.run_id, "time": round(time.time(), 3), "elapsed_s": round(snap.elapsed_s, 3),
            "trials": snap.trials, "new_trials": snap.new_trials, "batch": self.batches, "task": snap.last_task,
            "batch_trials": snap.last_trials, "estimated_ms": snap.estimated_ms, "default_ms": self.default_est})

    # -- step 3: the search ------------------------------------------------------------------------
    def run_batch(self, i: int, n: int, started: float) -> progress.Snapshot:
        """Spend ``n`` trials on task ``i`` (the batch began at ``started``, ``perf_counter`` time) and
        update the counts, best latencies, scheduler state and patience; return the new snapshot."""
        searcher = self.start_searcher()
        before = len(self.db)
        warming = not self.warmed_up()
        state = self.states[i]
        previous = state.best
        searcher.run(self.tasks[i], n, self.db, seed=self.batches * 7919 + self.done[i])
        took = time.perf_counter() - started
        measured = len(self.db) - before
        self.done[i] += measured if measured > 0 else n  # a batch that measured nothing still used its share
        self.best[i] = self.best_ms(i)
        if self.batches:
            self.per_trial.append(took / max(n, 1))
        self.batches += 1
        state.trials, state.warm = self.done[i], True
        state.history.append(self.latency(i))
        improved = state.best < previous * (1.0 - EARLY_STOPPING_MIN_GAIN)
        # patience counts from the warm-up's end
        self.since_gain = 0 if improved or warming else self.since_gain + n
        return self.snapshot(i, n)

    def search(self, live: bool | None = None) -> None:
        """Run batches until the budget stops the run (``stopped_by``: ``"trials"``, ``"time"`` or
        ``"early-stopping"``), showing progress on the display :func:`progress.open_display` picks for
        ``live``. Ctrl-C is re-raised after a warning: every finished trial is already in the logs."""
        display = progress.open_display(live)
        trials, patience = self.budget.trials, self.budget.early_stopping
        try:
            self.record(self.snapshot(None, 0))
            while True:
                remaining = (trials - sum(self.done)) if trials is not None else math.inf
                pick = scheduler.next_batch(self.states, remaining)
                if pick is None:
                    break
                i, n = pick
                now = time.perf_counter()
                if now + self.predict(n) > self.deadline:
                    self.stopped_by = "time"
                    break
                snap = self.run_batch(i, n, now)
                self.record(snap)
                display.update(snap)
                if patience and self.warmed_up() and self.since_gain >= patience:
                    self.stopped_by = "early-stopping"
                    break
        except KeyboardInterrupt:
            log.warning("tuning interrupted after %d new trials: every finished trial is saved in %s; run the same "
                        "command again to resume", sum(self.done) - sum(self.start_done), self.logs.work)
            raise
        finally:
            display.close()

    # -- step 4: the report ------------------------------------------------------------------------
    def report(self) -> TuningReport:
        """What the run did (call after :meth:`search`; the trial counts are read from the logs)."""
        counts = self.logs.record_counts()
        reports = tuple(
            TaskReport(t.name, t.kernels, t.weight, counts.get(k, 0), counts.get(k, 0) - self.start_done[i],
                       self.best[i], self.defaults[i], self.best_is_default(i))
            for i, (t, k) in enumerate(zip(self.tasks, self.keys))
        )
        return TuningReport(
            model=self.name, target=self.desc.name, fingerprint=self.desc.fingerprint(), log_dir=self.logs.work,
            tasks=reports, total_trials=sum(r.trials for r in reports), new_trials=sum(r.new_trials for r in reports),
            elapsed_s=time.perf_counter() - self.t_start, rounds=self.batches, stopped_by=self.stopped_by,
            estimated_ms=self.current_estimate(), default_estimated_ms=self.estimate(self.defaults),
            repairs=tuple(self.logs.repairs),
            cost_model=(None if self.searcher is None or not self.ran_any()
                        else "warm" if self.searcher.warm_started else "cold"),
            progress_file=self.trajectory,
        )


def tune(model, target="x86", *, example_inputs=None, input_shapes=None, trials=None, time_budget=None,
         log_dir="tuning_logs", resume=True, early_stopping=None, progress=None, rpc_tracker=None,
         rpc_key=None, precision="fp32", calibration=None, constant_inputs=None) -> TuningReport:
    """See :func:`compiler.tune`."""
    t_start = time.perf_counter()
    desc = targets.resolve(target)
    log_dir = check_tunable(desc, log_dir, rpc_tracker, rpc_key)
    budget = Budget.parse(trials, time_budget, early_stopping)
    name, tasks = lower_to_tasks(model, desc, example_inputs=example_inputs, input_shapes=input_shapes,
                                 precision=precision, calibration=calibration, constant_inputs=constant_inputs)
    # One writer per target database: a second tuner on the same logs waits here, then resumes from
    # what the first one wrote (its trial budget counts those records).
    with database.writer_lock(database.target_dir(log_dir, desc), "kiln tune"):
        logs = open_logs(log_dir, desc, resume)
        run = TuningRun(name, desc, tasks, logs, budget, rpc_tracker=rpc_tracker, rpc_key=rpc_key, t_start=t_start)
        run.remember_model()
        # Candidates are measured in worker processes: let them use every core, as compiled modules do
        # (TVM's runtime would otherwise start one thread on this 2-core machine and tune for that).
        use_all_cores()
        with run:
            run.measure_defaults()
            run.plan()
            with search_logs_to_file(logs.work):
                run.search(progress)
        report = run.report()
    log.info("done: %d new trials (%d in the log) in %s, stopped by %s%s", report.new_trials, report.total_trials,
             fmt_hms(report.elapsed_s), run.stopped_by,
             f", est. {report.estimated_ms:.3f} ms" if report.estimated_ms is not None else "")
    return report
