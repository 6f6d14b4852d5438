#!/usr/bin/env python3
"""Trials per second of wall time: plain MetaSchedule ``tune_relax`` against ``compiler.tune``.

Both tune the same model for the same target with the same number of trials, in batches of the
same size (``compiler.tuning.ROUND_TRIALS``), each in a fresh log directory and a fresh Python
process (the first tuner in a process pays one-off costs the second does not: seen here as 49 s
against 28 s for Kiln's same work), one after the other. The wall time is the whole process: imports,
model import, task extraction, worker start-up, search, building, measuring (Kiln also measures each
kernel's default schedule once, not counted as a trial). Prints trials, seconds, trials/s, the ratio.

    python scripts/trials_per_second.py [--model zoo:mlp] [--trials 24] [--order kiln-first]

``tune_relax`` gets the fused module Kiln extracts its tasks from (``pipeline.lower(...).fused``;
MetaSchedule 0.27's task extraction expects a module already legalized and fused), so both tune the same
kernels.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))


def run_tune_relax(model: str, trials: int, per_iter: int, work: str) -> dict:
    from tvm.s_tir import meta_schedule as ms

    import targets
    from compiler import pipeline
    from compiler.module import use_all_cores

    use_all_cores()  # as compiler.tune does: measurements use every core
    desc = targets.get("x86")
    t0 = time.perf_counter()
    mod = pipeline.lower(model, desc).fused
    target = desc.to_tvm()
    tasks = ms.relax_integration.extract_tasks(mod, target)
    db = ms.relax_integration.tune_relax(
        mod, {}, target, work_dir=work, max_trials_global=trials,
        max_trials_per_task=max(per_iter, -(-trials // len(tasks))), num_trials_per_iter=per_iter)
    wall = time.perf_counter() - t0
    records = db.get_all_tuning_records()
    valid = sum(1 for r in records if r.run_secs and max(float(s) for s in r.run_secs) < 1e9)
    return {"tool": "tune_relax", "tasks": len(tasks), "trials": len(records), "valid": valid, "wall_s": wall}


def run_kiln(model: str, trials: int, work: str) -> dict:
    import compiler

    t0 = time.perf_counter()
    report = compiler.tune(model, "x86", trials=trials, log_dir=work, early_stopping=0, progress=False)
    wall = time.perf_counter() - t0
    valid = _valid_trials(report)
    return {"tool": "kiln", "tasks": len(report.tasks), "trials": report.new_trials, "valid": valid, "wall_s": wall}


def _valid_trials(report) -> int:
    """Trials of ``report``'s run that built and ran (failed candidates are stored with 1e10 s;
    the default-schedule records are not trials)."""
    from compiler.tuning import database

    defaults = {e.get("trace") for e in database.read_defaults(report.log_dir).values()}
    _hashes, records = database.read_db(report.log_dir)
    return sum(1 for _idx, rec in records if database.trace_key(rec[0]) not in defaults
               and rec[1] and max(float(x) for x in rec[1]) < 1e9)


def main(argv=None) -> int:
    from compiler import tuning

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:mlp")
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--order", choices=("relax-first", "kiln-first"), default="relax-first")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--only", choices=("relax", "kiln"), help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.only:
        row = (run_tune_relax(args.model, args.trials, tuning.ROUND_TRIALS, args.work) if args.only == "relax"
               else run_kiln(args.model, args.trials, args.work))
        with open(args.json, "w") as f:
            json.dump(row, f)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="kiln-tps-") as tmp:
        order = ["relax", "kiln"] if args.order == "relax-first" else ["kiln", "relax"]
        for what in order:
            print(f"running {what} ({args.trials} trials on {args.model}) ...", file=sys.stderr, flush=True)
            out = os.path.join(tmp, f"{what}.json")
            t0 = time.perf_counter()
            subprocess.run([sys.executable, os.path.abspath(__file__), "--only", what, "--model", args.model,
                            "--trials", str(args.trials), "--work", os.path.join(tmp, what), "--json", out],
                           check=True)
            with open(out) as f:
                row = json.load(f)
            row["call_s"], row["wall_s"] = row["wall_s"], time.perf_counter() - t0  # the whole process
            rows.append(row)
    by = {r["tool"]: r for r in rows}
    for r in rows:
        r["trials_per_s"] = r["trials"] / r["wall_s"]
        print(f"{r['tool']:>10}: {r['trials']} trials ({r['valid']} built and ran) over {r['tasks']} tasks in "
              f"{r['wall_s']:.1f} s = "
              f"{r['trials_per_s']:.3f} trials/s ({r['wall_s'] / max(r['trials'], 1):.2f} s/trial)")
    ratio = by["kiln"]["trials_per_s"] / by["tune_relax"]["trials_per_s"]
    valid_ratio = (by["kiln"]["valid"] / by["kiln"]["wall_s"]) / max(by["tune_relax"]["valid"] / by["tune_relax"]["wall_s"], 1e-9)
    print(f"kiln / tune_relax: {ratio:.2f}x trials per second, {valid_ratio:.2f}x trials that built and ran per second")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "ratio": ratio, "model": args.model}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
