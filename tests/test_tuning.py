"""Tuning: ``compiler.tune`` / ``kiln tune``, target-keyed logs, resume, torn and corrupt logs, and
proof that compile applies every record (the scheduled kernel is the database's best, bit for bit).

One real tuning run (``kiln tune zoo:mlp --trials 3``, one trial per kernel, about a minute on two
cores) is shared by the fast tests; each test works on its own copy of the logs.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

import targets
from compiler import cli
from compiler.errors import TuningError
from conftest import assert_close, run_torch, zoo_model

TRIALS = 3  # zoo:mlp has 3 kernels: one trial each


@pytest.fixture(scope="module")
def tuned_logs(tmp_path_factory) -> Path:
    """``kiln tune zoo:mlp --trials 3 --log-dir DIR``, once for this file (read-only: copy it)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("tuning") / "logs"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["tune", "zoo:mlp", "--target", "x86", "--trials", str(TRIALS), "--log-dir", str(root)])
    assert code == 0, out.getvalue()
    assert "tuned zoo:mlp" in out.getvalue() and "--tuning-logs" in out.getvalue()
    return root


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
    from compiler.build import import_model
    from schedules import search

    desc = _host()
    fused, _ = pipeline.fuse(pipeline.prepare(import_model("zoo:mlp").mod, desc), desc)
    return desc, fused, search.extract_tasks(fused, desc.to_tvm())


# ---------------------------------------------------------------- layout and target separation


def test_logs_are_keyed_by_target(tuned_logs):
    work = _work(tuned_logs)
    assert sorted(p.name for p in tuned_logs.iterdir()) == [_host().fingerprint()]
    meta = json.loads((work / "target.json").read_text())
    assert meta["fingerprint"] == _host().fingerprint() and meta["target"]["name"] == "x86"
    assert "kiln_version" in meta
    assert len(_lines(work / "database_workload.json")) == 3
    assert len(_lines(work / "database_tuning_record.json")) == TRIALS


def test_other_target_gets_no_records(tuned_logs):
    import compiler
    from compiler.build import open_tuning_logs

    haswell = targets.get("haswell")
    assert haswell.fingerprint() != _host().fingerprint()
    with pytest.raises(TuningError, match="no tuning records for target 'haswell'"):
        open_tuning_logs(tuned_logs, haswell)
    with pytest.raises(TuningError, match="haswell"):
        compiler.compile("zoo:mlp", "haswell", tuning_logs=tuned_logs)


def test_target_json_that_disagrees_is_an_error(logs):
    from compiler.build import open_tuning_logs

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
    from compiler.build import open_tuning_logs

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
    assert len(kept) < TRIALS
    records.write_text("".join(line + "\n" for line in kept))
    with caplog.at_level(logging.WARNING, logger="compiler.build"):
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
    import compiler
    from compiler.build import open_tuning_logs

    work = _work(logs)
    path = work / which
    data = path.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[: last_start + (len(data) - last_start) // 2])  # as after kill -9 mid-append
    with caplog.at_level(logging.WARNING, logger="schedules.database"):
        db = open_tuning_logs(logs, _host())
    assert any("torn last line" in r.message for r in caplog.records)
    assert list(work.glob(which + ".torn-*")), "the torn original is kept"
    assert len(db) == TRIALS - 1
    assert path.read_bytes().endswith(b"\n") and all(json.loads(line) for line in _lines(path))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="schedules.database"):
        compiler.compile("zoo:mlp", "x86", tuning_logs=logs)  # repaired: opens cleanly, builds
    assert not any("torn last line" in r.message for r in caplog.records)


@pytest.mark.parametrize("garbage", [b"\x00\x01\x02 not json at all \xff\n", b"hello world\n[1, 2]\n", b"{oops"])
def test_corrupt_log_is_a_tuning_error_naming_the_file(logs, garbage):
    from compiler.build import open_tuning_logs

    (_work(logs) / "database_workload.json").write_bytes(garbage)
    with pytest.raises(TuningError, match="database_workload.json"):
        open_tuning_logs(logs, _host())


def test_wellformed_json_with_bad_content_is_a_tuning_error(logs):
    from compiler.build import open_tuning_logs

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
    assert (_work(logs) / "database_tuning_record.json").read_bytes() == before


def test_time_budget_too_small_for_a_batch_stops_before_measuring(tmp_path):
    import compiler

    report = compiler.tune("zoo:mlp", "x86", time_budget="1s", log_dir=tmp_path / "logs")
    assert report.stopped_by == "time" and report.new_trials == 0
    assert all(t.default_ms is not None and t.default_ms > 0 for t in report.tasks)


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
    assert len(records) == 2 * TRIALS
    assert len(workloads) == len(set(workloads)) == 3
    for old, new in zip(first.tasks, report.tasks):
        assert new.trials == 2 and new.best_ms <= old.best_ms + 1e-12
