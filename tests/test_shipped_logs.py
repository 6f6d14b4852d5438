"""Kiln's shipped tuning records (``tuning_logs/`` in the source tree): ``compile`` uses them for a
target with the same fingerprint unless told not to, ignores those of other targets, and
``kiln logs merge --best-only`` writes the compact form they are shipped in."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import targets
from compiler import cli, driver
from conftest import assert_close, run_torch, zoo_model
from compiler.tuning import database


def _work(root):
    return root / targets.get("x86").fingerprint()


@pytest.fixture
def shipped(tuned_logs, tmp_path, monkeypatch):
    """The mlp logs compacted with ``kiln logs merge --best-only`` into a stand-in for tuning_logs/."""
    root = tmp_path / "tuning_logs"
    assert cli.main(["logs", "merge", str(tuned_logs), "--log-dir", str(root), "--best-only"]) == 0
    monkeypatch.setattr(driver, "SHIPPED_LOGS", root)
    return root


def test_best_only_keeps_each_kernels_fastest_record(tuned_logs, shipped):
    full_hashes, full = database.read_db(_work(tuned_logs))
    hashes, best = database.read_db(_work(shipped))
    assert len(full) > len(best) == len(hashes) == len(full_hashes)  # one record per kernel
    for idx, rec in best:
        same = [database.record_seconds(r) for i, r in full if full_hashes[i] == hashes[idx]]
        assert database.record_seconds(rec) == min(s for s in same if s is not None)
    # still a database MetaSchedule and Kiln open, with the defaults and models carried over
    assert database.read_defaults(_work(shipped)) == database.read_defaults(_work(tuned_logs))
    assert "zoo:mlp" in json.loads((_work(shipped) / database.MODELS_FILE).read_text())["models"]


def test_best_only_takes_the_fastest_timing_of_a_trace_measured_twice(tuned_logs, tmp_path):
    """A trace timed twice (older logs re-measured candidates): best-only keeps its faster timing,
    as compile on the full logs would, not the first one seen."""
    src = tmp_path / "src"
    shutil.copytree(tuned_logs, src)
    records = _work(src) / database.RECORD_FILE
    idx, rec = json.loads(records.read_text().splitlines()[0])
    faster = database.record_seconds(rec) / 10
    rec[1] = [faster] * len(rec[1])
    with open(records, "a") as f:
        f.write(json.dumps([idx, rec]) + "\n")
    out = tmp_path / "out"
    assert cli.main(["logs", "merge", str(src), "--log-dir", str(out), "--best-only"]) == 0
    hashes_src, _ = database.read_db(_work(src))
    hashes, best = database.read_db(_work(out))
    kept = [database.record_seconds(r) for i, r in best if hashes[i] == hashes_src[idx]]
    assert kept == [pytest.approx(faster)]


def test_compile_uses_shipped_records_for_this_target(shipped):
    import compiler

    model, inputs = zoo_model("mlp")
    mod = compiler.compile(model, example_inputs=inputs)
    assert mod.meta["tuning_logs_shipped"] is True and mod.meta["tuning_logs"] == str(shipped)
    assert mod.meta["tuned_kernels"] and not mod.meta["untuned_kernels"]
    x = mod.random_inputs(seed=4)
    assert_close(mod(*x), run_torch(model, [torch.from_numpy(a) for a in x]))

    untuned = compiler.compile(model, example_inputs=inputs, tuning_logs=False)
    assert "tuning_logs" not in untuned.meta
    np.testing.assert_allclose(untuned(*x), mod(*x), rtol=1e-5, atol=1e-5)


def test_shipped_records_of_another_target_are_ignored(shipped):
    import compiler

    other = shipped / "0123456789ab"
    shutil.move(_work(shipped), other)  # the same records under another machine's fingerprint
    mod = compiler.compile("zoo:mlp")
    assert "tuning_logs" not in mod.meta
    assert driver.shipped_logs(targets.get("x86")) is None


def test_cli_untuned_flag(shipped, tmp_path, capsys):
    import compiler

    assert cli.main(["compile", "zoo:mlp", "-o", str(tmp_path / "t.so")]) == 0
    assert compiler.load(tmp_path / "t.so").meta["tuning_logs_shipped"] is True
    assert cli.main(["compile", "zoo:mlp", "--untuned", "-o", str(tmp_path / "u.so")]) == 0
    assert "tuning_logs" not in compiler.load(tmp_path / "u.so").meta
    with pytest.raises(SystemExit):
        cli.main(["compile", "zoo:mlp", "--untuned", "--tuning-logs", str(shipped), "-o", str(tmp_path / "x.so")])
