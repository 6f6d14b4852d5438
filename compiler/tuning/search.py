"""Schedule search: MetaSchedule tasks, builder, runner and one tuning batch, as Kiln uses them.

``compiler.tuning.run`` drives the search in batches (its task scheduler picks each batch's task); this
module holds the MetaSchedule-specific parts:

* :func:`extract_tasks` — one :class:`Task` per fused TIR kernel of the module that
  ``compiler.pipeline.fuse`` returns (the module compile schedules), keyed exactly as
  ``MetaScheduleApplyDatabase`` looks records up (the PrimFunc as the ``main`` of an IRModule).
* :class:`Searcher` — the builder, runner and XGBoost cost model of one tuning run, kept across
  batches: the builder's worker processes are started once (MetaSchedule's ``LocalBuilder`` starts
  fresh ones for every batch, and each spends tens of seconds importing ``tvm.s_tir.tensor_intrin``
  on this machine), and the cost model keeps learning from one batch to the next (and from one run
  to the next: :meth:`Searcher.save_cost_model` / the ``cost_model`` argument).
* :func:`default_schedule` and :meth:`Searcher.measure_defaults` — Kiln's default schedule of a
  task as a MetaSchedule trace, measured by the same runner as the candidates, so that it can be
  stored as a record of the task: the best record is then never slower than the default.

How candidates are timed (the evaluator, the argument filling, the protocol's name) is
:mod:`compiler.tuning.measurement`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import relax, s_tir
from tvm.driver import build as tvm_build
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
from tvm.support import cc
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind
from tvm.support.tar import tar

import schedules
from schedules import cuda as cuda_rules
from schedules import x86 as x86_rules

from ..cuda import enable_device_codegen
from . import cost_model as model_file
from .database import record_trace_key
from .measurement import alloc_argument, evaluator_config, run_evaluator

log = logging.getLogger(__name__)

#: Seconds a worker may spend compiling one candidate (worker start-up is not counted).
BUILD_TIMEOUT_S = 60.0
#: Seconds the runner may spend measuring one candidate.
RUN_TIMEOUT_S = 60.0
#: A builder worker is replaced after this many builds (TVM's pool workers leak memory).
BUILDER_WORKER_USES = 64

#: Evolutionary search population per batch: 32 candidates per trial (Ansor's ratio: 2048 for 64
#: measurements), at least 64, at most MetaSchedule's 512 (its default, sized for batches of 64). Every
#: batch samples and evolves a whole population, about 12 s for 512 on this 2-core machine whatever the
#: batch size: with 512 it took three quarters of a batch of 8 trials.
POPULATION, POPULATION_PER_TRIAL, MIN_POPULATION = 512, 32, 64


def population_size(trials: int) -> int:
    """The evolutionary search population for a batch of ``trials`` candidates."""
    return max(MIN_POPULATION, min(POPULATION, POPULATION_PER_TRIAL * trials))


@dataclass
class Task:
    """One kernel to tune: ``mod`` is the PrimFunc as the ``main`` of an IRModule (the key records are
    stored and looked up by), ``weight`` how often the model calls it, ``kernel`` the fused function's
    name in the module (``name`` is the task name: the same, unless two kernels share a workload)."""

    name: str
    mod: tvm.IRModule
    weight: float
    kernels: tuple[str, ...]


#: Kernels with these blocks keep Kiln's default schedule and are not searched: MetaSchedule's rules do
#: not unroll the Winograd transforms' case loops, so their candidates took minutes of TIR passes to
#: build (ResNet-18: 28 trials in 13 minutes) and run a Select chain per element.
FIXED_SCHEDULE_BLOCKS = ("winograd_tile", "winograd_input", "winograd_output")


def searchable(task: Task) -> bool:
    """False for a task whose kernel keeps Kiln's default schedule (:data:`FIXED_SCHEDULE_BLOCKS`);
    its default is still measured and recorded, so compile applies it like any record."""
    sch = s_tir.Schedule(task.mod)
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    return not any(n.startswith(FIXED_SCHEDULE_BLOCKS) for n in names)


def normalize(func: tvm.tirx.PrimFunc) -> tvm.IRModule:
    """The IRModule MetaSchedule keys a PrimFunc's records by (what ``MetaScheduleApplyDatabase`` queries)."""
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def extract_tasks(fused: tvm.IRModule, target) -> list[Task]:
    """One task per distinct fused kernel of ``fused`` (already fused: nothing is re-lowered or re-fused).

    Kernels with structurally equal PrimFuncs share a task (their weights add up). The task modules
    are built here from the PrimFuncs with :func:`normalize`, the same normalisation
    ``MetaScheduleApplyDatabase`` applies when it looks a kernel up, so every record found by
    tuning answers compile's query for that kernel.
    """
    calls: dict[str, int] = {}

    def count(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_tir":
            calls[expr.args[0].name_hint] = calls.get(expr.args[0].name_hint, 0) + 1

    for _gv, func in fused.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, count)
    tasks: list[Task] = []
    for gv, func in sorted(fused.functions_items(), key=lambda kv: kv[0].name_hint):
        if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
            continue
        mod = normalize(func)
        weight = float(calls.get(gv.name_hint, 1))
        for task in tasks:
            if tvm_ffi.structural_equal(task.mod, mod):
                task.weight += weight
                task.kernels += (gv.name_hint,)
                break
        else:
            tasks.append(Task(gv.name_hint, mod, weight, (gv.name_hint,)))
    return tasks


# -- builder --------------------------------------------------------------------------------------
def _import_tvm() -> None:
    """Build-worker initializer: pay TVM's import before the first timed build, and install Kiln's
    lowerings (``schedules.install_hooks``) so candidates are built as ``compile`` builds them."""
    schedules.install_hooks()


def _noop() -> None:  # PersistentBuilder.warm_up's job: only the worker's start-up matters
    return None


def _build_worker(mod, target, params, link=None):
    """Compile one candidate and export it as a tar (MetaSchedule's default build, without importing
    ``tvm.s_tir.tensor_intrin``: tensorised candidates arrive with the intrinsics already inlined).

    ``link``: None exports a tar of objects (the local runner links it); a compiler name links a
    shared library here instead, what an RPC device loads as is (boards have no compiler): ``""``
    the host's, ``"aarch64-linux-gnu-g++"`` a cross compiler (``TargetDescription.cross_compiler``)."""
    if target.kind.name == "cuda":  # keep nvcc-compiled device code (compiler/cuda.py)
        enable_device_codegen(str(target.attrs.get("arch", "cuda")))
    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    with target:  # nvcc reads the architecture from the current target
        rt_mod = tvm_build(mod, target=target)
    fcompile = tar if link is None else cc.cross_compiler(link, options=[]) if link else cc.create_shared
    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod." + ("so" if link is not None else tar.output_format))
    rt_mod.export_library(path, fcompile=fcompile)
    return path


@derived_object
class PersistentBuilder(ms.builder.PyBuilder):
    """A local builder whose worker processes live for the whole tuning run (recycled every
    :data:`BUILDER_WORKER_USES` builds), instead of MetaSchedule's fresh pool per batch."""

    def __init__(self, max_workers: int, timeout_sec: float = BUILD_TIMEOUT_S, link: str | None = None):
        super().__init__()
        self.max_workers = max_workers
        self.timeout_sec = timeout_sec
        self.link = link  # see _build_worker: None = tar for the local runner, else a .so linked here
        self._pool = None
        self._warming = []  # futures of the workers warm_up started

    def _get_pool(self):
        if self._pool is None:
            self._pool = PopenPoolExecutor(max_workers=self.max_workers, timeout=self.timeout_sec,
                                           initializer=_import_tvm,
                                           maximum_process_uses=BUILDER_WORKER_USES)
        return self._pool

    def warm_up(self) -> None:
        """Start the worker processes now, without waiting for them: their start-up (importing TVM and
        Kiln's lowerings, 10-30 s on this machine) then overlaps the caller's work that is not timed
        (importing and lowering the model) instead of delaying the first build."""
        pool = self._get_pool()
        self._warming = [pool.submit(_noop) for _ in range(self.max_workers)]

    def wait_warm(self) -> None:
        """Block until the workers started by :meth:`warm_up` are up: nothing may compete for the cores
        while something is timed (their start-up made ResNet-18's default schedules measure 1.3x slow)."""
        for future in self._warming:
            try:
                future.result()
            except Exception:  # noqa: BLE001 - a worker that failed to start is replaced at the first build
                pass
        self._warming = []

    def build(self, build_inputs):
        pool = self._get_pool()
        results = []
        for res in pool.map_with_error_catching(
            lambda x: _build_worker(*x), [(b.mod, b.target, None, self.link) for b in build_inputs]
        ):
            if res.status == StatusKind.COMPLETE:
                results.append(ms.builder.BuilderResult(res.value, None))
            elif res.status == StatusKind.TIMEOUT:
                results.append(ms.builder.BuilderResult(None, f"build timed out after {self.timeout_sec} s"))
            else:
                results.append(ms.builder.BuilderResult(None, f"build failed:\n{res.value}"))
        return results

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


# -- Kiln's default schedules as records -----------------------------------------------------------
def default_schedule(task: Task, desc):
    """Kiln's default schedule of ``task`` for the target description ``desc``, as an
    ``s_tir.Schedule`` whose trace replays it on the task's module (None when no default rule
    applies or the family has no default rules here). This is what ``schedules.default_schedule_pass``
    does to the kernel, rule for rule."""
    if desc.family in ("x86", "arm"):
        family = x86_rules
    elif desc.family == "cuda":  # DLight's GPU rules and Kiln's (schedules/cuda)
        family = cuda_rules
    else:
        return None

    func = task.mod["main"]
    with desc.to_tvm() as target:
        for rule in family.rules(desc):
            space = rule.apply(func, target, False)
            if space is None:
                continue
            if isinstance(space, s_tir.Schedule):
                return space
            return space[0] if len(space) == 1 else None
    return None


def default_trace_key(task: Task, desc) -> str | None:
    """``compiler.tuning.database.trace_key`` of the record :meth:`Searcher.measure_defaults` would store for
    ``task`` now (None: no default rule applies), computed without building anything: when Kiln's
    default schedule for a kernel changes, the tuner sees a new key and measures the new default."""
    sch = default_schedule(task, desc)
    if sch is None:
        return None
    record = ms.database.TuningRecord(sch.trace, ms.database.Workload(task.mod), [1.0], desc.to_tvm(),
                                      ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True))
    return record_trace_key(record)


def _device_type(target) -> str:
    """The runner's device name for ``target`` (what MetaSchedule's task scheduler passes it)."""
    kind = str(target.kind.name)
    return {"llvm": "cpu", "c": "cpu"}.get(kind, kind)


def space_generator(target, desc):
    """The design spaces searched for a task: MetaSchedule's rules (``post-order-apply``), plus on CPU
    targets Kiln's tunable templates (``schedules.x86.design_space``: its convolution schedule with the
    register tile as tunable decisions, sized for the description ``desc``)."""
    if str(target.kind.name) != "llvm":
        return "post-order-apply"
    return ms.space_generator.SpaceGeneratorUnion(
        [ms.space_generator.PostOrderApply(), ms.space_generator.ScheduleFn(x86_rules.design_space(desc))])


@dataclass
class DefaultMeasurement:
    """One task's default schedule, measured: ``record`` is the ``TuningRecord`` to commit (None when
    it could not be built or run), ``seconds`` its mean measured time, ``error`` why not."""

    record: object | None
    seconds: float | None
    error: str | None


# -- the search -----------------------------------------------------------------------------------
def _plain(obj):
    """An FFI trace JSON (arrays, strings, numbers) as plain Python lists and scalars."""
    if obj is None or isinstance(obj, (str, int, float)):
        return obj
    if hasattr(obj, "value") and not hasattr(obj, "__len__"):
        return obj.value
    try:
        return [_plain(x) for x in obj]
    except TypeError:
        return str(obj)


def candidate_key(trace) -> str:
    """Identity of a schedule candidate: a hash of its trace (instructions and decisions), the same
    for a candidate just sampled and for one read back from the database."""
    text = json.dumps(_plain(trace.as_json(remove_postproc=False)), separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()


@derived_object
class NoRepeatSearch(ms.search_strategy.PySearchStrategy):
    """MetaSchedule's evolutionary search without re-measuring candidates measured before.

    ``EvolutionarySearch`` only remembers what it measured within one ``tune_tasks`` call (TVM's own
    TODO: "add records from the database to avoid re-measuring"), and Kiln runs every batch as a call
    of its own: the best records seed the population, the cost model ranks them first, and they were
    measured again and again (1154 of 3072 records in the logs of the four zoo models, one candidate
    12 times; each repeat also gave the noise another draw at the kernel's best). This wrapper asks the
    inner search for twice the batch, drops candidates whose trace is in ``measured`` (every record
    of the task in the database, plus what this run has proposed), and keeps the batch size. One
    generation per batch: Kiln's batches are one MetaSchedule iteration."""

    def __init__(self, inner, measured: set):
        self.inner, self.measured = inner, measured
        self.trials, self.done = 0, False

    def _initialize_with_tune_context(self, context) -> None:
        self.inner._initialize_with_tune_context(context)

    def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None) -> None:
        self.trials, self.done = num_trials_per_iter, False
        self.inner.pre_tuning(2 * max_trials, 2 * num_trials_per_iter, design_spaces, database, cost_model)

    def post_tuning(self) -> None:
        self.inner.post_tuning()

    def generate_measure_candidates(self):
        if self.done:
            return None
        self.done = True
        picked = []
        for cand in self.inner.generate_measure_candidates() or []:
            key = candidate_key(cand.sch.trace)
            if key in self.measured:
                continue
            self.measured.add(key)
            picked.append(cand)
            if len(picked) == self.trials:
                break
        return picked or None

    def notify_runner_results(self, measure_candidates, results) -> None:
        self.inner.notify_runner_results(measure_candidates, results)

    def clone(self):
        return NoRepeatSearch(self.inner.clone(), self.measured)


class Searcher:
    """Builder, runner and cost model shared by every batch of one tuning run.

    ``run(task, trials, database, seed)`` spends ``trials`` measured trials on one task: MetaSchedule's
    evolutionary search, seeded from the best records of ``database`` for that task, guided by the
    XGBoost cost model, each measured candidate appended to ``database``.

    ``builder``/``runner``: MetaSchedule builder and runner to use instead of the defaults (a
    :class:`PersistentBuilder` and ``LocalRunner``); tuning through RPC passes a builder that links
    ``.so`` files (``PersistentBuilder(link=...)``) and an ``RPCRunner`` (``compiler.tuning.rpc``).
    """

    def __init__(self, target, num_threads: int, log_dir: str, cost_model: str | None = None,
                 builder=None, runner=None, *, desc):
        self.target = target
        self.desc = desc  # the TargetDescription of ``target``: Kiln's templates are sized for it
        self.num_threads = max(1, num_threads)
        self.log_dir = log_dir
        self.builder = builder if builder is not None else PersistentBuilder(max_workers=self.num_threads)
        if builder is None:
            self.builder.warm_up()
        self.runner = runner if runner is not None else ms.runner.LocalRunner(
            timeout_sec=RUN_TIMEOUT_S, evaluator_config=evaluator_config(target), f_alloc_argument=alloc_argument,
            f_run_evaluator=run_evaluator)
        self.cost_model = ms.cost_model.XGBModel(num_tuning_cores=self.num_threads, tree_method="auto")
        #: True when the cost model was warm-started from a saved one.
        self.warm_started = False
        self._measured: dict[str, set] = {}  # per task: candidates measured before (NoRepeatSearch)
        if cost_model is not None:
            self.warm_started = self.load_cost_model(cost_model)

    def load_cost_model(self, path: str) -> bool:
        """Warm-start the cost model from ``path`` (its trees and the features and costs it learnt
        from; Kiln's pickle-free format, :mod:`compiler.tuning.cost_model`); False, with a warning,
        when the file cannot be read (the run then starts cold). A pickled model beside it is never
        opened."""
        model_file.refuse_pickled(os.path.dirname(path))
        if not os.path.exists(path):
            return False
        try:
            model_file.load(self.cost_model, path)
        except Exception as err:  # a stale or damaged model must not stop tuning
            log.warning("cannot warm-start the cost model from %s (%s); starting cold", path, err)
            self.cost_model = ms.cost_model.XGBModel(num_tuning_cores=self.num_threads, tree_method="auto")
            return False
        return True

    def save_cost_model(self, path: str) -> bool:
        """Save the cost model to ``path`` atomically (False when it has not been trained yet)."""
        try:
            return model_file.save(self.cost_model, path)
        except Exception as err:  # pragma: no cover - the records are what matters
            log.warning("cannot save the cost model to %s: %s", path, err)
            return False

    def measure_defaults(self, tasks: list[Task], desc, database) -> list[DefaultMeasurement]:
        """Build each task's default schedule (:func:`default_schedule`) exactly as candidates are
        built and time it with the runner that times candidates, so the figures compare; return the
        ``TuningRecord`` of each (with its workload committed to ``database``), not yet committed."""
        schs, results = [], []
        if hasattr(self.builder, "wait_warm"):  # timings need quiet cores
            self.builder.wait_warm()
        for task in tasks:
            try:
                sch = default_schedule(task, desc)
                if sch is None:
                    schs.append(None)
                    results.append("no default rule applies")
                    continue
                artifact = _build_worker(sch.mod, self.target, None, getattr(self.builder, "link", None))
                args_info = ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)
                schs.append((sch, args_info))
                results.append(ms.runner.RunnerInput(artifact, _device_type(self.target), args_info))
            except Exception as err:  # noqa: BLE001 - a default that cannot be built is reported, not fatal
                schs.append(None)
                lines = str(err).strip().splitlines()
                results.append(f"cannot build the default schedule: {lines[-1] if lines else type(err).__name__}")
        inputs = [r for r in results if not isinstance(r, str)]
        futures = iter(self.runner.run(inputs)) if inputs else iter(())
        out = []
        for task, sch, res in zip(tasks, schs, results):
            if isinstance(res, str):
                out.append(DefaultMeasurement(None, None, res))
                continue
            run = next(futures).result()
            shutil.rmtree(os.path.dirname(res.artifact_path), ignore_errors=True)
            if run.error_msg or not run.run_secs:
                out.append(DefaultMeasurement(None, None, f"cannot run the default schedule: {run.error_msg}"))
                continue
            secs = [float(s) for s in run.run_secs]
            record = ms.database.TuningRecord(sch[0].trace, database.commit_workload(task.mod), run.run_secs,
                                              self.target, sch[1])
            out.append(DefaultMeasurement(record, sum(secs) / len(secs), None))
        return out

    def measured_keys(self, task: Task, database) -> set:
        """:func:`candidate_key` of every record of ``task`` in ``database`` (read once per task and
        run; :class:`NoRepeatSearch` adds what it proposes)."""
        key = str(tvm_ffi.structural_hash(task.mod))
        if key not in self._measured:
            workload = database.commit_workload(task.mod)
            self._measured[key] = {candidate_key(r.trace) for r in database.get_top_k(workload, 1 << 30)}
        return self._measured[key]

    def run(self, task: Task, trials: int, database, seed: int) -> None:
        ctx = ms.TuneContext(
            mod=task.mod,
            target=self.target,
            space_generator=space_generator(self.target, self.desc),
            search_strategy=NoRepeatSearch(ms.search_strategy.EvolutionarySearch(
                population_size=population_size(trials),
                init_min_unmeasured=min(50, population_size(trials) // 2)), self.measured_keys(task, database)),
            task_name=task.name,
            logger=logging.getLogger(f"kiln.tuning.task.{task.name}"),
            rand_state=zlib.crc32(f"{task.name}:{seed}".encode()) & 0x7FFFFFFF,
            num_threads=self.num_threads,
        ).clone()
        ms.tune_tasks(
            tasks=[ctx],
            task_weights=[task.weight],
            work_dir=self.log_dir,
            max_trials_global=trials,
            max_trials_per_task=trials,
            num_trials_per_iter=trials,
            builder=self.builder,
            runner=self.runner,
            database=database,
            cost_model=self.cost_model,
            task_scheduler="round-robin",
        )

    def close(self) -> None:
        self.builder.shutdown()
        try:
            self.runner.pool.shutdown()
        except Exception:  # pragma: no cover - best effort
            pass
