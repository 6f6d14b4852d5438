"""Tuning: ``compiler.tune`` / ``kiln tune``, target-keyed logs, resume, torn and corrupt logs, proof
that compile applies every record (the scheduled kernel is the database's best, bit for bit, and runs
at the tuner's figure), that tuning never makes a kernel slower than Kiln's default schedule, the
warm-started cost model, and ``kiln logs list|merge|export|import``.

One real tuning run (``kiln tune zoo:mlp --trials 3``, one trial per kernel, about a minute on two
cores) is shared by the fast tests; each test works on its own copy of the logs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import targets
from compiler import cli
from compiler.errors import TuningError
from conftest import REPO, assert_close, run_torch, zoo_model

TRIALS = 3  # zoo:mlp has 3 kernels: one trial each
KERNELS = 3
RECORDS = TRIALS + KERNELS  # each kernel's default schedule is a record too (not a trial)


# ``tuned_logs`` (conftest.py): ``kiln tune zoo:mlp --trials 3``, once per session, shared with
# tests/test_shipped_logs.py.


@pytest.fixture
def logs(tuned_logs, tmp_path) -> Path:
    """A private copy of the tuned logs."""
    dest = tmp_path / "logs"
    shutil.copytree(tuned_logs, dest)
    return dest


def _host():
    return targets.get("x86")


def _work(root: Path) -> Path:
    return root / _host().fingerprint()


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def _mlp_tasks():
    from compiler import pipeline

    from compiler.tuning import search

    desc = _host()
    fused = pipeline.lower("zoo:mlp", desc).fused
    return desc, fused, search.extract_tasks(fused, desc.to_tvm())


# ---------------------------------------------------------------- layout and target separation


def test_logs_are_keyed_by_target(tuned_logs):
    work = _work(tuned_logs)
    assert sorted(p.name for p in tuned_logs.iterdir() if not p.name.startswith(".")) == [_host().fingerprint()]  # not the lock
    meta = json.loads((work / "target.json").read_text())
    assert meta["fingerprint"] == _host().fingerprint() and meta["target"]["name"] == "x86"
    assert "kiln_version" in meta
    assert len(_lines(work / "database_workload.json")) == KERNELS
    assert len(_lines(work / "database_tuning_record.json")) == RECORDS


def test_other_target_gets_no_records(tuned_logs):
    import compiler
    from compiler.driver import open_tuning_logs

    haswell = targets.get("haswell")
    assert haswell.fingerprint() != _host().fingerprint()
    with pytest.raises(TuningError, match="no tuning records for target 'haswell'"):
        open_tuning_logs(tuned_logs, haswell)
    with pytest.raises(TuningError, match="haswell"):
        compiler.compile("zoo:mlp", "haswell", tuning_logs=tuned_logs)


def test_target_json_that_disagrees_is_an_error(logs):
    from compiler.driver import open_tuning_logs

    haswell = targets.get("haswell")
    shutil.copytree(_work(logs), logs / haswell.fingerprint())  # x86 records under haswell's key
    with pytest.raises(TuningError, match="made for target 'x86'.*not for 'haswell'"):
        open_tuning_logs(logs, haswell)


def test_missing_log_dir_is_an_error(tmp_path):
    import compiler

    with pytest.raises(TuningError, match="not found"):
        compiler.compile("zoo:mlp", "x86", tuning_logs=tmp_path / "nope")


# ---------------------------------------------------------------- records applied


def test_every_record_is_applied_and_outputs_match(tuned_logs):
    """Each tuned kernel in the compiled module is exactly the database's best schedule for its task,
    compile reports no untuned kernel, and the tuned module matches PyTorch."""
    import tvm_ffi

    import compiler
    from compiler import pipeline
    from compiler.driver import open_tuning_logs

    desc, fused, tasks = _mlp_tasks()
    db = open_tuning_logs(tuned_logs, desc)
    applied, tuned = pipeline.apply_records(fused, desc, db)
    assert tuned == sorted(k for t in tasks for k in t.kernels)
    for task in tasks:
        best = db.query_ir_module(task.mod, desc.to_tvm(), task.name)
        assert best is not None, task.name
        for kernel in task.kernels:
            got = applied[kernel].without_attr("tirx.is_scheduled")
            assert tvm_ffi.structural_equal(got, best["main"].without_attr("global_symbol")), kernel

    mod = compiler.compile("zoo:mlp", "x86", tuning_logs=tuned_logs)
    assert mod.meta["untuned_kernels"] == [] and sorted(mod.meta["tuned_kernels"]) == tuned
    model, inputs = zoo_model("mlp")
    assert_close(mod(*[x.numpy() for x in inputs]), run_torch(model, inputs), what="tuned mlp")


def test_kernels_without_a_record_are_reported(logs, caplog):
    import compiler

    work = _work(logs)
    records = work / "database_tuning_record.json"
    kept = [line for line in _lines(records) if json.loads(line)[0] != 0]  # drop workload 0's records
    assert len(kept) < RECORDS
    records.write_text("".join(line + "\n" for line in kept))
    with caplog.at_level(logging.WARNING, logger="compiler.driver"):
        mod = compiler.compile("zoo:mlp", "x86", tuning_logs=logs)
    assert len(mod.meta["untuned_kernels"]) == 1 and len(mod.meta["tuned_kernels"]) == 2
    assert any("without a tuning record" in r.message and mod.meta["untuned_kernels"][0] in r.message
               for r in caplog.records)


def test_cli_compile_with_tuning_logs(tuned_logs, tmp_path, capsys):
    import compiler

    out = tmp_path / "mlp.so"
    code = cli.main(["compile", "zoo:mlp", "--tuning-logs", str(tuned_logs), "-o", str(out)])
    assert code == 0 and out.exists()
    mod = compiler.load(out)
    assert mod.meta["untuned_kernels"] == [] and len(mod.meta["tuned_kernels"]) == 3
    model, inputs = zoo_model("mlp")
    assert_close(mod(*[x.numpy() for x in inputs]), run_torch(model, inputs), what="kiln compile --tuning-logs")
    code = cli.main(["compile", "zoo:mlp", "--tuning-logs", str(tmp_path / "missing"), "-o", str(out)])
    assert code == 1 and "tuning log directory not found" in capsys.readouterr().err


# ---------------------------------------------------------------- torn and corrupt logs


@pytest.mark.parametrize("which", ["database_tuning_record.json", "database_workload.json"])
def test_torn_last_line_is_skipped_with_a_warning(logs, which, caplog):
    records = [json.loads(line) for line in _lines(_work(logs) / "database_tuning_record.json")]
    # a torn record line loses that record; a torn workload line loses the last workload's records
    lost = 1 if which == "database_tuning_record.json" else sum(r[0] == KERNELS - 1 for r in records)
    import compiler
    from compiler.driver import open_tuning_logs

    work = _work(logs)
    path = work / which
    data = path.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[: last_start + (len(data) - last_start) // 2])  # as after kill -9 mid-append
    with caplog.at_level(logging.WARNING, logger="compiler.tuning.database"):
        db = open_tuning_logs(logs, _host())
    assert any("torn last line" in r.message for r in caplog.records)
    assert list(work.glob(which + ".torn-*")), "the torn original is kept"
    assert len(db) == RECORDS - lost
    assert path.read_bytes().endswith(b"\n") and all(json.loads(line) for line in _lines(path))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="compiler.tuning.database"):
        compiler.compile("zoo:mlp", "x86", tuning_logs=logs)  # repaired: opens cleanly, builds
    assert not any("torn last line" in r.message for r in caplog.records)


@pytest.mark.parametrize("garbage", [b"\x00\x01\x02 not json at all \xff\n", b"hello world\n[1, 2]\n", b"{oops"])
def test_corrupt_log_is_a_tuning_error_naming_the_file(logs, garbage):
    from compiler.driver import open_tuning_logs

    (_work(logs) / "database_workload.json").write_bytes(garbage)
    with pytest.raises(TuningError, match="database_workload.json"):
        open_tuning_logs(logs, _host())


def test_wellformed_json_with_bad_content_is_a_tuning_error(logs):
    from compiler.driver import open_tuning_logs

    (_work(logs) / "database_workload.json").write_text('["123", "not a module"]\n')
    (_work(logs) / "database_tuning_record.json").write_text("")
    with pytest.raises(TuningError, match="cannot read the tuning database"):
        open_tuning_logs(logs, _host())


# ---------------------------------------------------------------- budgets and resume


def test_parse_duration():
    from compiler.tuning import parse_duration

    assert parse_duration("8h") == 8 * 3600 and parse_duration("30m") == 1800 and parse_duration("90s") == 90
    assert parse_duration("1h30m") == 5400 and parse_duration("45") == 45 and parse_duration(2.5) == 2.5
    for bad in ("soon", "", "-5", "0s"):
        with pytest.raises(TuningError):
            parse_duration(bad)


def test_resume_with_budget_reached_measures_nothing(logs):
    import compiler

    before = (_work(logs) / "database_tuning_record.json").read_bytes()
    report = compiler.tune("zoo:mlp", "x86", trials=TRIALS, log_dir=logs)
    assert report.new_trials == 0 and report.total_trials == TRIALS and report.stopped_by == "trials"
    assert all(t.trials == 1 and t.best_ms is not None for t in report.tasks)
    assert report.estimated_ms == pytest.approx(sum(t.weight * t.best_ms for t in report.tasks))
    # the default schedule is a record of every task: the best is never slower than it
    assert all(t.default_ms is not None and t.best_ms <= t.default_ms for t in report.tasks)
    assert report.estimated_ms <= report.default_estimated_ms
    assert report.cost_model is None  # nothing searched
    assert (_work(logs) / "database_tuning_record.json").read_bytes() == before


def test_a_changed_default_schedule_is_measured_again_and_is_no_trial(logs):
    """When Kiln's default schedule of a kernel changes (its trace differs from the one recorded), the
    next tuning run measures the new default and stores it as a record; the earlier default stays a
    record of the kernel and neither counts as a trial."""
    import compiler
    from compiler.tuning import database

    work = _work(logs)
    data = json.loads((work / "defaults.json").read_text())
    h, entry = sorted(data["workloads"].items())[0]
    real = entry["trace"]
    entry["trace"] = "0" * 40  # as if an earlier Kiln's default had been measured
    (work / "defaults.json").write_text(json.dumps(data))
    records_before = len(_lines(work / "database_tuning_record.json"))
    report = compiler.tune("zoo:mlp", "x86", trials=TRIALS, log_dir=logs)
    assert report.new_trials == 0 and report.total_trials == TRIALS
    after = database.read_defaults(work)[h]
    assert after["trace"] == real and after["previous"] == ["0" * 40]
    assert len(_lines(work / "database_tuning_record.json")) == records_before + 1  # only that default
    counts = database.open_logs(logs, _host(), create=False).record_counts()
    assert sum(counts.values()) == TRIALS


def test_time_budget_too_small_for_a_batch_stops_before_measuring(tmp_path):
    import compiler

    report = compiler.tune("zoo:mlp", "x86", time_budget="1s", log_dir=tmp_path / "logs")
    assert report.stopped_by == "time" and report.new_trials == 0
    assert all(t.default_ms is not None and t.default_ms > 0 for t in report.tasks)


def _relabel_measurement(work: Path, protocol: str | None) -> None:
    """Make ``work``'s target.json say its records were timed under ``protocol`` (None: say nothing,
    as logs of older Kiln versions)."""
    meta = json.loads((work / "target.json").read_text())
    meta.pop("measurement", None)
    if protocol is not None:
        meta["measurement"] = protocol
    (work / "target.json").write_text(json.dumps(meta))


def test_logs_timed_under_another_protocol_are_set_aside_not_mixed(logs, caplog):
    """Records timed with hot caches (older Kiln) must not compete with flushed timings: tuning moves
    them aside (nothing deleted) and starts a fresh database; they still compile where they are."""
    import compiler
    from compiler.tuning.measurement import MEASUREMENT

    work = _work(logs)
    assert json.loads((work / "target.json").read_text())["measurement"] == MEASUREMENT
    _relabel_measurement(work, None)
    old_records = (work / "database_tuning_record.json").read_bytes()
    with caplog.at_level(logging.WARNING, logger="compiler"):
        report = compiler.tune("zoo:mlp", "x86", time_budget="1s", log_dir=logs)
    moved = [p for p in logs.iterdir() if p.name.startswith("old-")]
    assert len(moved) == 1 and (_work(moved[0]) / "database_tuning_record.json").read_bytes() == old_records
    assert "'hot'" in caplog.text and str(moved[0]) in caplog.text
    assert report.total_trials == 0  # the fresh database has none of the old trials
    assert json.loads((work / "target.json").read_text())["measurement"] == MEASUREMENT
    # the old records still compile from where they were moved
    mod = compiler.compile("zoo:mlp", "x86", tuning_logs=moved[0])
    assert len(mod.meta["tuned_kernels"]) == KERNELS


def test_logs_merge_refuses_mixed_measurement_protocols(logs, tmp_path):
    from compiler.tuning import database

    old = tmp_path / "old"
    shutil.copytree(logs, old)
    _relabel_measurement(_work(old), "hot")
    dest = tmp_path / "dest"
    with pytest.raises(TuningError, match=r"measured differently.*'hot'"):
        database.merge([logs, old], dest)
    assert not (dest / _host().fingerprint()).exists()
    with pytest.raises(TuningError, match="measured differently"):  # into a destination of the other protocol
        database.merge([logs], _work(old))


@pytest.mark.slow
def test_resume_continues_and_never_duplicates_workloads(logs):
    """Raising the trial count on the same logs measures only the new trials; records grow, every
    workload is stored once, and every task keeps (at least) its previous best."""
    import compiler

    work = _work(logs)
    first = compiler.tune("zoo:mlp", "x86", trials=TRIALS, log_dir=logs)
    report = compiler.tune("zoo:mlp", "x86", trials=2 * TRIALS, log_dir=logs)
    assert report.new_trials == TRIALS and report.total_trials == 2 * TRIALS
    records = _lines(work / "database_tuning_record.json")
    workloads = [json.loads(line)[0] for line in _lines(work / "database_workload.json")]
    assert len(records) == 2 * TRIALS + KERNELS
    assert len(workloads) == len(set(workloads)) == 3
    for old, new in zip(first.tasks, report.tasks):
        assert new.trials == 2 and new.best_ms <= old.best_ms + 1e-12
    assert report.cost_model == "warm"  # started from the model the first run saved
    from compiler.tuning import database

    hashes, recs = database.read_db(work)
    keys = [(hashes[i], database.trace_key(r[0])) for i, r in recs]
    assert len(keys) == len(set(keys))  # no candidate measured twice (the best seed the next batch)


def test_search_never_proposes_a_measured_candidate_again():
    """NoRepeatSearch drops what is in ``measured`` (the database's records and earlier batches'
    picks) and repeats within a batch, keeps the batch size, and generates once per batch."""
    from types import SimpleNamespace

    from compiler.tuning import search

    def cand(name, decision):
        trace = SimpleNamespace(as_json=lambda remove_postproc: [[["Sample", [], [name], ["v0"]]], [[0, decision]]])
        return SimpleNamespace(sch=SimpleNamespace(trace=trace))

    class Inner:
        def __init__(self, cands):
            self.cands, self.asked = cands, []

        def pre_tuning(self, max_trials, per_iter, *rest):
            self.asked.append(per_iter)

        def generate_measure_candidates(self):
            return self.cands

    a, b, b_again, c, d = cand("x", 1), cand("x", 2), cand("x", 2), cand("x", 3), cand("x", 4)
    measured = {search.candidate_key(a.sch.trace)}
    inner = Inner([a, b, b_again, c, d])
    strategy = search.NoRepeatSearch(inner, measured)._inst  # the Python side (MetaSchedule calls it via FFI)
    strategy.pre_tuning(2, 2, [], None, None)
    assert inner.asked == [4]  # twice the batch, so that dropped repeats leave enough
    assert strategy.generate_measure_candidates() == [b, c]
    assert strategy.generate_measure_candidates() is None  # one generation per batch
    assert measured == {search.candidate_key(x.sch.trace) for x in (a, b, c)}
    strategy.pre_tuning(2, 2, [], None, None)
    inner.cands = [a, b, c]
    assert strategy.generate_measure_candidates() is None  # nothing new: no batch rather than repeats


# ---------------------------------------------------------------- never slower than the defaults


def _build(mod, desc):
    """Build a scheduled module; keep the module to find each kernel's final signature."""
    from compiler import pipeline

    return pipeline.build(mod, desc), mod


def _kernel_ms(built, name: str) -> float:
    """Median latency (ms) of kernel ``name`` inside a built module, timed like the tuner times it.

    A kernel whose weights were repacked at compile time is called ``NAME_prepacked`` and takes the
    packed weight; the tuner's builder strips the repack too, so the timings compare."""
    import numpy as np
    import tvm
    from tvm.s_tir import meta_schedule as ms

    executable, scheduled = built
    names = {gv.name_hint for gv, _ in scheduled.functions_items()}
    name = name if name in names else f"{name}_prepacked"
    func = scheduled[name]
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(rng.random([int(d) for d in info.shape]).astype(str(info.dtype)), dev)
            for info in ms.arg_info.ArgInfo.from_prim_func(func)]
    from compiler.tuning import measurement

    cfg = measurement.evaluator_config(tvm.target.Target({"kind": "llvm"}))  # the tuner's protocol
    timer = executable.mod.imports[0].time_evaluator(
        name, dev, number=cfg.number, repeat=max(cfg.repeat, 20), min_repeat_ms=cfg.min_repeat_ms,
        f_preproc="cache_flush_cpu_non_first_arg" if cfg.enable_cpu_cache_flush else "")
    return float(np.median(timer(*args).results)) * 1e3


def _near(a_ms: float, b_ms: float) -> bool:
    """``a`` is not worse than ``b`` beyond timing noise (1.3x plus 5 us)."""
    return a_ms <= 1.3 * b_ms + 0.005


def test_default_schedules_are_records_but_not_trials(tuned_logs):
    from compiler.tuning import database

    work = _work(tuned_logs)
    defaults = database.read_defaults(work)
    hashes, records = database.read_db(work)
    assert sorted(defaults) == sorted(hashes)
    for h, entry in defaults.items():
        assert entry["ms"] > 0
        traces = [database.trace_key(rec[0]) for idx, rec in records if hashes[idx] == h]
        assert traces.count(entry["trace"]) == 1, "the default schedule is one record of its workload"
    counts = database.open_logs(tuned_logs, _host(), create=False).record_counts()
    assert sum(counts.values()) == TRIALS and all(c == 1 for c in counts.values())


def test_tuned_kernels_never_slower_than_defaults_and_run_at_the_tuners_figure(tuned_logs):
    """With one trial per kernel MetaSchedule's candidates are usually far slower than Kiln's
    defaults; compile must still never pick one. For every kernel of the module compiled with the
    logs: its latency is within noise of (1) the default-schedule kernel's and (2) what the tuner
    measured for the record compile applied. End to end, the tuned module is not slower."""
    import compiler
    from compiler import pipeline
    from compiler.driver import open_tuning_logs
    from compiler.module import use_all_cores

    use_all_cores()  # as compiled modules and the tuner's runner do
    desc, fused, tasks = _mlp_tasks()
    db = open_tuning_logs(tuned_logs, desc)
    tuned_ex = _build(pipeline.schedule(fused, desc, db), desc)
    default_ex = _build(pipeline.schedule(fused, desc), desc)
    for task in tasks:
        top = db.get_top_k(db.commit_workload(task.mod), 1)[0]
        record_ms = sum(float(s) for s in top.run_secs) / len(top.run_secs) * 1e3
        for kernel in task.kernels:
            tuned = _kernel_ms(tuned_ex, kernel)
            default = _kernel_ms(default_ex, kernel)
            assert _near(tuned, default), f"{kernel}: tuned {tuned:.4f} ms, default {default:.4f} ms"
            assert _near(tuned, record_ms) and _near(record_ms, tuned), \
                f"{kernel}: {tuned:.4f} ms in the module, the tuner measured {record_ms:.4f} ms"

    with_logs = compiler.compile("zoo:mlp", "x86", tuning_logs=tuned_logs).benchmark(repeat=200)
    without = compiler.compile("zoo:mlp", "x86").benchmark(repeat=200)
    assert with_logs.median_ms <= 1.3 * without.median_ms + 0.02, (with_logs, without)


# ---------------------------------------------------------------- cost model warm start


def test_cost_model_is_saved_and_warm_starts(tuned_logs):
    from compiler.tuning import database, search

    path = _work(tuned_logs) / database.COST_MODEL_FILE
    assert path.exists() and path.stat().st_size > 0
    s = search.Searcher.__new__(search.Searcher)  # only the cost-model half: no worker processes
    s.num_threads = 1
    from tvm.s_tir import meta_schedule as ms

    s.cost_model = ms.cost_model.XGBModel(num_tuning_cores=1, tree_method="auto")
    assert s.load_cost_model(str(path)) is True
    assert s.cost_model.booster is not None and s.cost_model.data_size >= TRIALS
    bad = path.with_name("broken.npz")
    bad.write_bytes(b"not an npz")
    assert s.load_cost_model(str(bad)) is False  # a damaged model: a warning and a cold start
    # the round trip keeps what the model learnt
    assert s.load_cost_model(str(path)) is True
    again = path.with_name("again.npz")
    assert s.save_cost_model(str(again)) is True
    before = (s.cost_model.data_size, list(s.cost_model.data))
    assert s.load_cost_model(str(again)) is True
    assert (s.cost_model.data_size, list(s.cost_model.data)) == before


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickled_cost_model_in_a_log_dir_is_never_unpickled(tuned_logs, tmp_path, caplog):
    """MetaSchedule's cost_model.tar holds a NumPy object array read with allow_pickle=True: a crafted
    one in a shared log directory ran code in `kiln tune`. Kiln neither reads it nor accepts a pickle
    under its own file name."""
    import io
    import pickle
    import tarfile

    import numpy as np

    from compiler.tuning import cost_model, database, search

    marker = tmp_path / "ran"
    work = tmp_path / "work"
    work.mkdir()
    buf = io.BytesIO()
    np.save(buf, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    with tarfile.open(work / cost_model.PICKLED_FILE, "w") as tar:
        info = tarfile.TarInfo("data.npy")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    (work / database.COST_MODEL_FILE).write_bytes(pickle.dumps(_Payload(marker)))
    s = search.Searcher.__new__(search.Searcher)
    s.num_threads = 1
    from tvm.s_tir import meta_schedule as ms

    s.cost_model = ms.cost_model.XGBModel(num_tuning_cores=1, tree_method="auto")
    with caplog.at_level("WARNING"):
        assert s.load_cost_model(str(work / database.COST_MODEL_FILE)) is False
    assert not marker.exists()
    assert any("pickle" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- kiln logs list|merge|export|import


def _retarget(src_work: Path, dest_root: Path, name: str) -> Path:
    """A copy of a per-target folder relabelled as target ``name`` (as if tuned there)."""
    desc = targets.get(name)
    dest = dest_root / desc.fingerprint()
    shutil.copytree(src_work, dest)
    meta = json.loads((dest / "target.json").read_text())
    meta.update(fingerprint=desc.fingerprint(), target=desc.to_json())
    (dest / "target.json").write_text(json.dumps(meta))
    return dest


def test_logs_list(tuned_logs, capsys):
    from compiler.tuning import database

    [summary] = database.list_logs(tuned_logs)
    assert summary.target == "x86" and summary.fingerprint == _host().fingerprint()
    assert (summary.workloads, summary.records, summary.default_records) == (KERNELS, RECORDS, KERNELS)
    assert summary.models["zoo:mlp"] is not None and summary.models["zoo:mlp"] > 0
    assert cli.main(["logs", "list", "--log-dir", str(tuned_logs)]) == 0
    out = capsys.readouterr().out
    assert _host().fingerprint() in out and "target x86" in out and f"{RECORDS} records" in out and "zoo:mlp" in out


def test_logs_merge_dedupes_and_keeps_every_record(logs, tmp_path, capsys):
    from compiler.tuning import database

    # a second machine's logs: the same target, with workload 0 missing and one record re-measured
    other = tmp_path / "other"
    shutil.copytree(logs, other)
    work = _work(other)
    records = [json.loads(line) for line in _lines(work / "database_tuning_record.json")]
    assert cli.main(["logs", "merge", str(logs), str(other), "--log-dir", str(tmp_path / "pooled")]) == 0
    assert "0 duplicate" not in capsys.readouterr().out
    [pooled] = database.list_logs(tmp_path / "pooled")
    assert (pooled.workloads, pooled.records) == (KERNELS, RECORDS)  # identical traces kept once

    extra = records[-1]
    extra[1][1] = [1.0]  # same trace, another timing: still a duplicate trace
    with open(work / "database_tuning_record.json", "a") as f:
        f.write(json.dumps(extra, separators=(",", ":")) + "\n")
    result = database.merge([other], tmp_path / "pooled")
    assert (result.workloads_added, result.records_added, result.duplicates) == (0, 0, RECORDS + 1)

    # into an empty directory: everything arrives; the merged database opens and compiles
    fresh = database.merge([_work(logs)], tmp_path / "fresh")
    assert (fresh.workloads_added, fresh.records_added) == (KERNELS, RECORDS)
    import compiler

    mod = compiler.compile("zoo:mlp", "x86", tuning_logs=tmp_path / "fresh")
    assert mod.meta["untuned_kernels"] == []


def test_logs_merge_refuses_mixed_targets(logs, tmp_path, capsys):
    from compiler.tuning import database

    other = tmp_path / "haswell_logs"
    other.mkdir()
    _retarget(_work(logs), other, "haswell")
    dest = tmp_path / "dest"
    with pytest.raises(TuningError, match=r"different targets.*'x86'.*'haswell'"):
        database.merge([logs, other], dest)
    assert not (dest / _host().fingerprint()).exists() and not (dest / targets.get("haswell").fingerprint()).exists()
    code = cli.main(["logs", "merge", str(logs), str(other), "--log-dir", str(dest)])
    err = capsys.readouterr().err
    assert code == 1 and "x86" in err and "haswell" in err and _host().fingerprint() in err
    # into a per-target folder of another target: refused too
    with pytest.raises(TuningError, match="different targets"):
        database.merge([logs], other / targets.get("haswell").fingerprint())
    # a directory holding two targets merges one of them when asked
    both = tmp_path / "both"
    shutil.copytree(logs, both)
    _retarget(_work(logs), both, "haswell")
    with pytest.raises(TuningError, match="different targets"):
        database.merge([both], dest)
    result = database.merge([both], dest, target=targets.get("haswell"))
    assert result.target == "haswell" and result.records_added == RECORDS


def test_logs_export_import_roundtrip(logs, tmp_path, capsys):
    archive = tmp_path / "mlp-x86.tar.gz"
    assert cli.main(["logs", "export", "--target", "x86", "--log-dir", str(logs), "-o", str(archive)]) == 0
    assert archive.exists() and not list(tmp_path.glob("*.tmp"))
    dest = tmp_path / "imported"
    assert cli.main(["logs", "import", str(archive), "--log-dir", str(dest)]) == 0
    assert f"{RECORDS} new records" in capsys.readouterr().out
    for name in ("database_workload.json", "database_tuning_record.json", "defaults.json", "target.json"):
        assert (_work(dest) / name).read_bytes() == (_work(logs) / name).read_bytes() or name == "target.json"
    assert not (_work(dest) / "cost_model.tar").exists(), "cost models (pickles) are never imported"
    assert cli.main(["logs", "import", str(archive), "--log-dir", str(dest)]) == 0  # again: all duplicates
    assert f"{RECORDS} duplicate" in capsys.readouterr().out
    import compiler

    assert compiler.compile("zoo:mlp", "x86", tuning_logs=dest).meta["untuned_kernels"] == []


def _tar(path: Path, entries: dict) -> Path:
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_logs_import_rejects_corrupt_archives_atomically(logs, tmp_path):
    from compiler.tuning import archive, database

    good = archive.export_logs(logs, _host(), tmp_path / "good.tar.gz")
    data = good.read_bytes()
    fp = _host().fingerprint()
    work = _work(logs)
    members = {"kiln_logs.json": json.dumps({"fingerprint": fp, "workloads": KERNELS, "records": RECORDS}).encode()}
    members.update({f"{fp}/{n}": (work / n).read_bytes() for n in database.DATA_FILES if (work / n).exists()})
    bad_records = dict(members)
    bad_records[f"{fp}/database_tuning_record.json"] = b"garbage\n"
    torn = dict(members)
    torn[f"{fp}/database_tuning_record.json"] = members[f"{fp}/database_tuning_record.json"][:-40]
    cases = {
        "truncated": tmp_path.joinpath("truncated.tar.gz").write_bytes(data[: len(data) // 2]) and "truncated.tar.gz",
        "random": tmp_path.joinpath("random.tar.gz").write_bytes(b"\x1f\x8b" + bytes(range(256))) and "random.tar.gz",
        "traversal": _tar(tmp_path / "traversal.tar.gz", {**members, "../evil.json": b"{}"}).name,
        "bad records": _tar(tmp_path / "bad_records.tar.gz", bad_records).name,
        "torn": _tar(tmp_path / "torn.tar.gz", torn).name,
        "no manifest": _tar(tmp_path / "no_manifest.tar.gz", {k: v for k, v in members.items()
                                                             if k != "kiln_logs.json"}).name,
    }
    dest = tmp_path / "dest"
    shutil.copytree(logs, dest)
    before = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    for what, name in cases.items():
        with pytest.raises(TuningError, match="not a tuning-log archive|corrupt|cannot read"):
            archive.import_logs(tmp_path / name, dest)
        assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before, what
    assert not (tmp_path.parent / "evil.json").exists()
    with pytest.raises(TuningError, match="not found"):
        archive.import_logs(tmp_path / "missing.tar.gz", dest)


def test_logs_import_refuses_path_fingerprints_and_bombs(logs, tmp_path):
    """The manifest's fingerprint was used as a path (``../../..`` merged a folder outside the archive),
    and a 6.5 MB archive holding a 1.5 GB entry used 3 GB of memory before it was refused."""
    import gzip
    import io
    import tarfile

    from compiler.tuning import archive, database

    fp = _host().fingerprint()
    work = _work(logs)
    outside = tmp_path / "outside"
    shutil.copytree(work, outside / "victim")
    data = {f"{fp}/{n}": (work / n).read_bytes() for n in database.DATA_FILES if (work / n).exists()}
    manifest = {"fingerprint": "../outside/victim", "workloads": KERNELS, "records": RECORDS}
    traversal = _tar(tmp_path / "fp.tar.gz", {"kiln_logs.json": json.dumps(manifest).encode(), **data})
    dest = tmp_path / "dest"
    with pytest.raises(TuningError, match="not a target fingerprint"):
        archive.import_logs(traversal, dest)
    assert not dest.exists()
    bomb = tmp_path / "bomb.tar.gz"  # one 400 MB entry of zeros: about 400 KB compressed
    with gzip.open(bomb, "wb", compresslevel=9) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        info = tarfile.TarInfo(f"{fp}/database_tuning_record.json")
        info.size = 400 * 2**20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert bomb.stat().st_size < 4 * 2**20
    with pytest.raises(TuningError, match="declare"):
        archive.import_logs(bomb, dest)
    assert not dest.exists()


def test_logs_list_checks_that_each_database_loads(logs, tmp_path, capsys):
    from compiler.tuning import database

    broken = tmp_path / "broken"
    shutil.copytree(logs, broken)
    rec = _work(broken) / database.RECORD_FILE
    rec.write_bytes(rec.read_bytes().replace(b"[0,", b"[99,", 1))  # a record of a workload that is not there
    with pytest.raises(TuningError):
        database.list_logs(broken)
    assert cli.main(["logs", "list", "--log-dir", str(broken)]) == 1


def test_tune_log_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "logs.txt"
    f.write_text("x")
    assert cli.main(["tune", "zoo:mlp", "--trials", "1", "--log-dir", str(f)]) == 1
    err = capsys.readouterr().err
    assert "is a file" in err and err.count("\n") == 1 and f.read_text() == "x"


@pytest.mark.slow
def test_two_tuners_on_one_log_dir_then_compile(tmp_path):
    """Two `kiln tune` runs on one --log-dir at once: both exit 0, the second waits for the first, the
    database loads, `logs list` is clean, and compile applies the records (this corrupted the
    database before)."""
    import subprocess
    import sys

    import compiler
    from compiler.tuning import database

    log_dir = tmp_path / "logs"
    cmd = [sys.executable, "-m", "compiler", "tune", "zoo:mlp", "--trials", "6", "--log-dir", str(log_dir)]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert any("waiting for it to finish" in o for o in outs), outs
    (summary,) = database.list_logs(log_dir)
    hashes, records = database.read_db(_work(log_dir))
    keys = [(hashes[i], database.trace_key(r[0])) for i, r in records]
    assert len(keys) == summary.records and summary.records >= 6
    assert compiler.compile("zoo:mlp", "x86", tuning_logs=log_dir).meta["untuned_kernels"] == []


@pytest.mark.slow
def test_tiny_cnn_tuned_convolutions_never_slower_than_defaults(tmp_path):
    """The same guarantee for convolutions (packed-weight default schedules), one trial per kernel."""
    import compiler
    from compiler import pipeline
    from compiler.module import use_all_cores
    from compiler.tuning import search

    use_all_cores()
    desc = _host()
    fused = pipeline.lower("zoo:tiny_cnn", desc).fused
    tasks = search.extract_tasks(fused, desc.to_tvm())
    report = compiler.tune("zoo:tiny_cnn", "x86", trials=len(tasks), log_dir=tmp_path / "logs")
    assert all(t.best_ms <= t.default_ms for t in report.tasks)
    # kernel for kernel inside the two models (these kernels take microseconds: timed alone, with
    # caches flushed before each call, they differ by more than they do in a model)
    tuned_mod = compiler.compile("zoo:tiny_cnn", "x86", tuning_logs=tmp_path / "logs")
    default_mod = compiler.compile("zoo:tiny_cnn", "x86", tuning_logs=False)
    tuned = {k.name: k.ms for k in tuned_mod.profile(repeat=200).kernels}
    default = {k.name: k.ms for k in default_mod.profile(repeat=200).kernels}
    for task in tasks:
        for kernel in task.kernels:
            if kernel not in tuned and kernel not in default:
                continue  # not a call in the VM (a reshape that became a view)
            assert _near(tuned[kernel], default[kernel]), \
                f"{kernel}: tuned {tuned[kernel]:.4f} ms, default {default[kernel]:.4f} ms"
    with_logs, without = tuned_mod.benchmark(repeat=200), default_mod.benchmark(repeat=200)
    assert with_logs.median_ms <= 1.3 * without.median_ms + 0.02, (with_logs, without)


def test_kiln_conv_template_is_searched_and_every_sample_is_correct():
    """The search space of a convolution task holds Kiln's own template (its register tile as tunable
    decisions) next to MetaSchedule's rules; candidates sampled from it, with the tile sizes the sampler
    drew, build and compute what the default schedule computes."""
    import numpy as np
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from compiler import pipeline

    from compiler.tuning import search

    desc = _host()
    target = desc.to_tvm()
    fused = pipeline.lower("zoo:tiny_cnn", desc).fused
    task = next(t for t in search.extract_tasks(fused, target) if t.name.startswith("fused_conv2d2"))
    ctx = ms.TuneContext(mod=task.mod, target=target, space_generator=search.space_generator(target, desc),
                         search_strategy=ms.search_strategy.ReplayTrace(), task_name=task.name, rand_state=7,
                         num_threads=1).clone()
    spaces = ctx.space_generator.generate_design_space(ctx.mod)
    kinds = [[inst.kind.name for inst in sp.trace.insts] for sp in spaces]
    kiln = [sp for sp, k in zip(spaces, kinds) if "SamplePerfectTile" not in k and k.count("SampleCategorical") == 2]
    assert len(kiln) == 1 and len(spaces) > 1, f"Kiln's template and MetaSchedule's spaces: {kinds}"
    ctx.pre_tuning(max_trials=24, num_trials_per_iter=24, design_spaces=kiln)
    candidates = ctx.generate_measure_candidates()
    tiles = {tuple(int(v) for v in c.sch.trace.decisions.values()) for c in candidates}
    assert len(tiles) >= 3, f"the sampler should draw several register tiles, drew {tiles}"

    def run(mod):  # the weights' repack (if any) stays in the kernel: every variant takes HWIO weights
        info = ms.arg_info.ArgInfo.from_entry_func(mod, remove_preproc=False)
        lib = tvm.compile(mod, target=target).mod
        rng = np.random.default_rng(0)
        args = [tvm.runtime.tensor(rng.standard_normal([int(d) for d in a.shape]).astype(str(a.dtype)))
                for a in info]
        lib["main"](*args)
        return args[-1].numpy()

    want = run(task.mod)  # unscheduled
    assert np.allclose(run(search.default_schedule(task, desc).mod), want, rtol=1e-4, atol=1e-4)
    for cand in candidates[:4]:
        got = run(cand.sch.mod)
        assert np.allclose(got, want, rtol=1e-4, atol=1e-4), cand.sch.trace.decisions


# ---------------------------------------------------------------- task scheduler, early stopping, progress


def test_scheduler_warms_up_every_task_then_follows_the_gain():
    """Pure scheduling on synthetic histories: warm-up heaviest first (an even split when the budget is
    short), then the task of largest estimated gain, within caps and the trials left."""
    import math

    from compiler import tuning
    from compiler.tuning import TaskState, gain, next_batch

    r = tuning.ROUND_TRIALS
    cold = [TaskState(1, 0, [1.0]), TaskState(4, 0, [1.0]), TaskState(1, 0, [3.0])]
    assert next_batch(cold, math.inf) == (1, r)  # weight x latency 4 > 3 > 1
    assert next_batch(cold, 3) == (1, 1)  # 3 trials left for 3 cold tasks: one each
    part = [TaskState(1, 3, [1.0]), TaskState(1, r, [1.0], warm=True)]
    assert next_batch(part, math.inf) == (0, r - 3)  # topped up to one full batch

    # warm tasks: same latency and weight; the one whose best keeps falling gains more
    flat = TaskState(1, 4 * r, [2.0, 2.0, 2.0, 2.0], warm=True)
    falling = TaskState(1, 4 * r, [2.6, 2.4, 2.2, 2.0], warm=True)
    assert gain(falling) > gain(flat)
    assert next_batch([flat, falling], math.inf) == (1, r)
    # weight counts: a flat task called 3x per inference outweighs the falling one
    assert next_batch([TaskState(3, 4 * r, [2.0] * 4, warm=True), falling], math.inf)[0] == 0
    # optimistic term: with equal latencies, the task with fewer trials goes first
    few, many = TaskState(1, r, [2.0], warm=True), TaskState(1, 10 * r, [2.0], warm=True)
    assert next_batch([many, few], math.inf) == (1, r)
    # caps (max share) and the trials left bound the batch; nothing open: None
    assert next_batch([TaskState(1, 10, [1.0], cap=12, warm=True)], math.inf) == (0, 2)
    assert next_batch([TaskState(1, 10, [1.0], cap=12, warm=True)], 1) == (0, 1)
    assert next_batch([TaskState(1, 12, [1.0], cap=12, warm=True)], math.inf) is None
    assert next_batch(cold, 0) is None
    # deterministic: ties go to the lower index
    assert next_batch([TaskState(1, r, [1.0], warm=True), TaskState(1, r, [1.0], warm=True)], math.inf) == (0, r)


def test_plain_progress_has_no_escape_codes(caplog):
    import io

    from compiler.tuning import progress

    stream = io.StringIO()  # not a terminal
    display = progress.open_display(None, stream)
    assert isinstance(display, progress.PlainDisplay)
    rows = (progress.TaskRow("conv", 2, 16, 0.5, 0.8), progress.TaskRow("dense", 1, 8, None, 0.1))
    snap = progress.Snapshot("zoo:x", "x86", 24, 100, 20, 65.0, 200.0, 1.1, 1.7, 3, "conv", 8, 8, 64, rows)
    with caplog.at_level(logging.INFO, logger="compiler.tuning"):
        display.update(snap)
        display.close()
    [line] = [r.getMessage() for r in caplog.records]
    assert "24/100 trials" in line and "est. 1.1 ms" in line and "1.55x" in line and "conv" in line
    assert "\x1b" not in line and stream.getvalue() == ""
    # the live display renders the same state (forced, into a buffer)
    live = progress.open_display(True, stream)
    assert isinstance(live, progress.LiveDisplay)
    live.update(snap)
    live.close()
    assert "zoo:x" in stream.getvalue() and "conv" in stream.getvalue()


def test_early_stopping_argument_is_checked(tmp_path, capsys):
    import compiler

    with pytest.raises(TuningError, match="early_stopping"):
        compiler.tune("zoo:mlp", "x86", trials=3, early_stopping=-1, log_dir=tmp_path)
    code = cli.main(["tune", "zoo:mlp", "--early-stopping", "-2", "--log-dir", str(tmp_path)])
    assert code == 1 and "early_stopping must be a number of trials >= 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any work


def test_early_stopping_stops_a_real_run(logs, monkeypatch, caplog, capfd):
    """zoo:mlp on the shared logs (one trial per kernel): with batches of 2 trials the warm-up tops each
    kernel up to 2 trials, then one more batch without gain (a gain threshold of 100 % cannot be met)
    reaches a patience of 2 trials. Progress goes to the log as plain lines and to the trajectory file."""
    import compiler
    from compiler import tuning
    from compiler.tuning import run, scheduler

    monkeypatch.setattr(scheduler, "ROUND_TRIALS", 2)
    monkeypatch.setattr(run, "EARLY_STOPPING_MIN_GAIN", 1.0)
    with caplog.at_level(logging.INFO, logger="compiler.tuning"):
        report = compiler.tune("zoo:mlp", "x86", trials=30, log_dir=logs, early_stopping=2)
    assert report.stopped_by == "early-stopping"
    assert report.new_trials == KERNELS + 2 and report.rounds == KERNELS + 1
    assert sorted(t.trials for t in report.tasks) == [2, 2, 4]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("batch ")]
    assert len(lines) == report.rounds and "2/2 trials without gain" in lines[-1]
    out, err = capfd.readouterr()
    assert not any("\x1b" in text for text in (*lines, out, err))
    entries = tuning.read_progress(report.progress_file)
    assert report.progress_file == _work(logs) / "progress" / "zoo_mlp.jsonl"
    assert [e["trials"] for e in entries[-report.rounds - 1:]] == [TRIALS, 4, 5, 6, 8]
    assert entries[-1]["estimated_ms"] == pytest.approx(report.estimated_ms)


# ---------------------------------------------------------------- overnight runner


def test_overnight_survives_crashing_jobs_and_reports(tmp_path):
    """The tiny plan plus a job whose model does not exist and one killed by its kill_after: the night
    goes on, the report lists both failures and the good job's latencies, and its plot is a PNG."""
    import subprocess
    import sys


    plan = tmp_path / "plan.toml"
    plan.write_text((REPO / "scripts" / "plans" / "tiny.toml").read_text()
                    + '\n[[job]]\nmodel = "/nonexistent/model.onnx"\ntime_budget = "1m"\n'
                    + '\n[[job]]\nmodel = "zoo:mlp"\ntrials = 200\nkill_after = "4s"\n')
    report_dir, log_dir = tmp_path / "report", tmp_path / "logs"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "overnight.py"), str(plan), "--report-dir",
                           str(report_dir), "--log-dir", str(log_dir)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # some jobs failed; the runner did not
    state = json.loads((report_dir / "state.json").read_text())
    assert state["zoo:tiny_cnn@x86"]["status"] == "done"
    assert state["/nonexistent/model.onnx@x86"]["status"] == "failed"
    assert "killed after 4 s" in state["zoo:mlp@x86"]["error"]
    good = state["zoo:tiny_cnn@x86"]["measure"]
    assert all(good[k] > 0 for k in ("untuned_ms", "tuned_ms", "ort_ms", "torch_ms"))
    md = (report_dir / "report.md").read_text()
    assert "| zoo:tiny_cnn | x86 | done |" in md and "## Failures" in md
    assert "/nonexistent/model.onnx" in md and "killed after 4 s" in md
    png = report_dir / "zoo_tiny_cnn.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "(zoo_tiny_cnn.png)" in md


def test_gather_kernels_are_measured_with_indices_in_range(tmp_path):
    """An embedding lookup (``take``) gets integer index arguments in the runner: random ones point
    out of range and every candidate failed (BERT's embedding was left untuned and kept being picked).
    Integer arguments are zeros now, so its default and its trial run and are recorded."""
    import torch

    import compiler

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = torch.nn.Embedding(1000, 64), torch.nn.Linear(64, 8)

        def forward(self, ids):
            return self.fc(self.emb(ids))

    torch.manual_seed(0)
    model, ids = Embed().eval(), torch.randint(0, 1000, (1, 16))
    report = compiler.tune(model, "x86", example_inputs=(ids,), trials=5, log_dir=tmp_path, progress=False)
    take = [t for t in report.tasks if t.name.startswith("take")]
    assert take and all(t.default_ms is not None and t.best_ms is not None for t in take), report
    mod = compiler.compile(model, "x86", example_inputs=(ids,), tuning_logs=tmp_path)
    assert mod.meta["untuned_kernels"] == []
    with torch.no_grad():
        expected = model(ids).numpy()
    assert abs(mod(ids.numpy()) - expected).max() < 1e-5


# ---------------------------------------------------------------- precision


@pytest.mark.slow
def test_int8_tuning_records_are_applied_by_an_int8_compile(tmp_path):
    """``tune(..., precision="int8", calibration=...)`` lowers the model as the int8 compile does, so that
    compile finds a record for every kernel (its default schedule at least) and applies them."""
    import numpy as np
    import torch

    import compiler

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    example = (torch.randn(1, 16),)
    calibration = [np.random.default_rng(i).standard_normal((1, 16)).astype("float32") for i in range(8)]
    logs = tmp_path / "logs"
    report = compiler.tune(model, "x86", example_inputs=example, trials=4, log_dir=logs, progress=False,
                           precision="int8", calibration=calibration)
    assert report.new_trials >= 1 and report.tasks
    mod = compiler.compile(model, "x86", example_inputs=example, tuning_logs=logs, precision="int8",
                           calibration=calibration)
    assert mod.meta["untuned_kernels"] == [] and len(mod.meta["tuned_kernels"]) >= len(report.tasks)
    x = calibration[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.linalg.norm(mod(x) - ref) <= 0.1 * np.linalg.norm(ref)  # int8's stated tolerance, loosely


@pytest.mark.slow
def test_kill_9_during_tuning_then_resume_loses_and_duplicates_nothing(tmp_path):
    """`kill -9` a tuner after its first records are on disk, then run it again: the database loads,
    every record written before the kill is still there, no (workload, trace) pair appears twice, and
    the resumed run reaches its trial budget."""
    import signal
    import subprocess
    import sys
    import time

    from compiler.tuning import database

    log_dir = tmp_path / "logs"
    cmd = [sys.executable, "-m", "compiler", "tune", "zoo:mlp", "--trials", "12", "--log-dir", str(log_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    records = _work(log_dir) / database.RECORD_FILE
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if records.exists() and records.read_bytes().count(b"\n") >= KERNELS + 2:  # defaults and some trials
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the tuner and its build and measurement workers
    proc.wait()
    before = set(records.read_bytes().splitlines()) if records.exists() else set()
    before = {line for line in before if line.endswith(b"]")}  # complete lines only
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    hashes, recs = database.read_db(_work(log_dir))
    keys = [(hashes[i], database.trace_key(rec[0])) for i, rec in recs]
    assert len(keys) == len(set(keys)), "a candidate was recorded twice"
    after = set(records.read_bytes().splitlines())
    assert before <= after, "records written before the kill were lost"
    (summary,) = database.list_logs(log_dir)
    assert summary.records >= 12


def _scaled_dense_onnx(path: Path) -> Path:
    """``y = relu(x @ W) * scale`` with ``scale`` a scalar graph input."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Mul", ["r", "scale"], ["y"])],
        "scaled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64]),
                   helper.make_tensor_value_info("scale", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])], [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.slow
def test_tuning_with_constant_inputs_gives_records_a_compile_with_them_applies(tmp_path, capsys):
    """tune and compile run one pipeline, constant inputs included: the kernels of a model with an input
    frozen are the ones tuned with it frozen (and not the ones of the model without)."""
    import compiler
    from compiler.cli import main

    model = _scaled_dense_onnx(tmp_path / "scaled.onnx")
    logs = tmp_path / "logs"
    assert main(["tune", str(model), "--constant-input", "scale=0.5", "--trials", "2", "--log-dir", str(logs)]) == 0
    assert "--constant-input scale=0.5" in capsys.readouterr().out  # the compile command it suggests
    mod = compiler.compile(str(model), "x86", tuning_logs=logs, constant_inputs={"scale": 0.5})
    assert mod.meta["untuned_kernels"] == [] and mod.meta["tuned_kernels"]
    x = np.random.default_rng(1).normal(size=(4, 64)).astype(np.float32)
    w = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
    assert_close(mod(x), np.maximum(x @ w, 0) * 0.5)
    # without the frozen input the fused kernel is another one (it reads scale): no record for it
    free = compiler.compile(str(model), "x86", tuning_logs=logs)
    assert free.meta["untuned_kernels"]
