#!/usr/bin/env python3
"""Overnight tuning: run a plan of models x targets x budgets, survive crashes, write a report.

    python scripts/overnight.py PLAN.toml [--report-dir DIR] [--log-dir DIR]

The plan (TOML; unknown keys are an error)::

    total_budget = "8h"            # optional: the whole night; jobs get what is left (minus measuring)
    log_dir = "tuning_logs"        # optional (--log-dir wins); relative paths are from the current directory
    report_dir = "overnight_report"  # optional (--report-dir wins)
    repeat = 50                    # optional: benchmark runs per latency figure

    [[job]]
    model = "zoo:resnet18"         # zoo:NAME, an ONNX file or a .pt2 program
    target = "x86"                 # optional, default x86
    time_budget = "2h"             # and/or trials = N (as `kiln tune`); early_stopping = N optional
    kill_after = "3h"              # optional: hard wall-clock limit of the job (default 1.25 x budget + 10 min)

Each job tunes in its own subprocess (``compiler.tune``, the same logs as ``kiln tune``), so a crash,
a segfault or a ``kill -9`` of one job is recorded as its failure and the night goes on; a job that
outlives ``kill_after`` is killed. After tuning, a second subprocess measures the model in this run:
the untuned build (Kiln's default schedules) and the tuned build (``--tuning-logs``), each with
``CompiledModule.benchmark``, and ONNX Runtime and PyTorch eager (``scripts/baselines.py``) where the
model is a zoo model (ONNX Runtime only for an ONNX file).

Re-running the same plan with the same report directory resumes: ``DIR/state.json`` remembers each
job; finished jobs are not tuned again (only measured again, so every figure of the report comes
from one run), unless the plan gives them a larger budget (then they are topped up by the
difference); an interrupted or failed job is tuned again for what is left of its budget, from its
logs (nothing measured is lost). Writes ``DIR/report.md``, one PNG per model (estimated end-to-end
latency against trials, from ``<log_dir>/<fingerprint>/progress/<model>.jsonl``, with the measured
latencies marked) and ``DIR/jobs/*.log`` (each job's output). Exit status 0 when every job succeeded,
1 when some failed (the report is written either way), 2 for a bad plan.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

#: Seconds kept aside per job for the measurement subprocess (compiles, benchmarks, baselines).
MEASURE_RESERVE_S = 180.0
#: A job is not started with less time than this.
MIN_JOB_S = 60.0
PLAN_KEYS = {"total_budget", "log_dir", "report_dir", "repeat", "job"}
JOB_KEYS = {"model", "target", "time_budget", "trials", "early_stopping", "kill_after"}


class PlanError(Exception):
    pass


# ------------------------------------------------------------------------------------------ plan
def _seconds(text, what: str) -> float:
    from compiler.errors import TuningError
    from compiler.tuning import parse_duration

    try:
        return parse_duration(text)
    except TuningError as err:
        raise PlanError(f"{what}: {err}") from None


def load_plan(path: Path) -> dict:
    try:
        plan = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PlanError(f"plan file {path} not found") from None
    except tomllib.TOMLDecodeError as err:
        raise PlanError(f"{path}: not valid TOML: {err}") from None
    unknown = set(plan) - PLAN_KEYS
    if unknown:
        raise PlanError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(PLAN_KEYS)}")
    jobs = plan.get("job", [])
    if not jobs:
        raise PlanError(f"{path}: no [[job]] entries")
    for n, job in enumerate(jobs, 1):
        unknown = set(job) - JOB_KEYS
        if unknown:
            raise PlanError(f"{path}: job {n}: unknown key(s) {sorted(unknown)}; known: {sorted(JOB_KEYS)}")
        if "model" not in job:
            raise PlanError(f"{path}: job {n} has no model")
        job.setdefault("target", "x86")
        if "time_budget" in job:
            job["time_budget_s"] = _seconds(job["time_budget"], f"job {n} time_budget")
        if "kill_after" in job:
            job["kill_after_s"] = _seconds(job["kill_after"], f"job {n} kill_after")
        trials = job.get("trials")
        if trials is not None and (not isinstance(trials, int) or trials < 1):
            raise PlanError(f"{path}: job {n}: trials must be a positive integer, got {trials!r}")
        if "time_budget" not in job and trials is None:
            raise PlanError(f"{path}: job {n} ({job['model']}) needs time_budget or trials")
        job["key"] = f"{job['model']}@{job['target']}"
    keys = [j["key"] for j in jobs]
    if len(set(keys)) != len(keys):
        raise PlanError(f"{path}: a model x target appears twice: {sorted(k for k in keys if keys.count(k) > 1)}")
    if "total_budget" in plan:
        plan["total_budget_s"] = _seconds(plan["total_budget"], "total_budget")
    return plan


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


# ------------------------------------------------------------------------------------------ state
def load_state(report_dir: Path) -> dict:
    path = report_dir / "state.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def save_state(report_dir: Path, state: dict) -> None:
    tmp = report_dir / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, report_dir / "state.json")


# ------------------------------------------------------------------------------------------ children
def _child(args: list[str], log_path: Path, kill_after: float) -> tuple[int | None, str]:
    """Run this script as a child in its own process group; kill the group after ``kill_after``
    seconds. Returns (exit status or -signal, None when killed by us; the last lines of its output)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=os.getcwd(), env=env)
        try:
            code = proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    with open(log_path, "rb") as f:  # this attempt's output only
        f.seek(start)
        tail = f.read().decode(errors="replace").strip().splitlines()[-6:]
    return code, "\n".join(tail)


def _describe_exit(code: int | None, kill_after: float) -> str:
    if code is None:
        return f"killed after {kill_after:.0f} s (kill_after)"
    if code < 0:
        try:
            return f"died of signal {signal.Signals(-code).name}"
        except ValueError:
            return f"died of signal {-code}"
    return f"exited with status {code}"


def tune_job(spec: dict) -> None:
    """Child: tune one job; write its summary to spec['out']."""
    import logging

    import compiler

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("compiler.tuning").setLevel(logging.INFO)
    report = compiler.tune(spec["model"], spec["target"], trials=spec.get("trials"),
                           time_budget=spec.get("time_budget_s"), log_dir=spec["log_dir"],
                           early_stopping=spec.get("early_stopping"), progress=False)
    print(report, flush=True)
    Path(spec["out"]).write_text(json.dumps({
        "new_trials": report.new_trials, "total_trials": report.total_trials, "elapsed_s": report.elapsed_s,
        "stopped_by": report.stopped_by, "estimated_ms": report.estimated_ms,
        "default_estimated_ms": report.default_estimated_ms, "progress_file": str(report.progress_file),
        "tasks": len(report.tasks), "cost_model": report.cost_model}))


def measure_job(spec: dict) -> None:
    """Child: untuned and tuned Kiln latencies, ONNX Runtime and PyTorch, in this process."""
    import numpy as np

    import baselines
    import compiler

    threads = len(os.sched_getaffinity(0))
    repeat = spec["repeat"]
    model, target = spec["model"], spec["target"]
    result: dict = {"threads": threads}
    untuned = compiler.compile(model, target)
    arrays = untuned.random_inputs()
    modules = {"untuned_ms": untuned}
    try:
        tuned = compiler.compile(model, target, tuning_logs=spec["log_dir"])
        modules["tuned_ms"] = tuned
        result["untuned_kernels"] = len(tuned.meta.get("untuned_kernels", []))
        a, b = untuned(*arrays), tuned(*arrays)
        a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
        result["max_rel_err"] = max(float(np.max(np.abs(x - y)) / (np.max(np.abs(x)) + 1e-12)) for x, y in zip(a, b))
    except Exception as err:  # noqa: BLE001 - no records yet: report it, keep the baselines
        result["tuned_error"] = str(err).splitlines()[0] if str(err) else type(err).__name__
    # every engine is built before any is timed, then all are timed in alternating rounds
    # (baselines.interleaved_ms): timing one module right after a compile biased it by up to 25 % on
    # this machine, and a stretch of contention on a shared host must fall on all engines alike
    runs = {field: (lambda mod=mod: mod.run(*arrays)) for field, mod in modules.items()}
    if model.startswith("zoo:"):
        import torch

        from compiler import zoo

        net, _ = zoo.load(model[4:])
        inputs = tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in arrays)
        runs.update({f"{k}_ms": f for k, f in baselines.reference_runs(net, inputs, threads).items()})
    elif model.endswith(".onnx"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        feed = {i.name: x for i, x in zip(sess.get_inputs(), arrays)}
        runs["ort_ms"] = lambda: sess.run(None, feed)
    result.update(baselines.interleaved_ms(runs, repeat))
    Path(spec["out"]).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------ the night
def run_plan(plan: dict, report_dir: Path, log_dir: Path) -> int:
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "jobs").mkdir(exist_ok=True)
    state = load_state(report_dir)
    t0 = time.monotonic()
    total = plan.get("total_budget_s", math.inf)
    repeat = int(plan.get("repeat", 50))
    failed = 0
    for job in plan["job"]:
        key = job["key"]
        st = state.setdefault(key, {"status": "new", "tuned_s": 0.0, "attempts": 0})
        st["measure"] = None
        st.pop("measure_error", None)
        log_path = report_dir / "jobs" / f"{slug(key)}.log"
        budget = job.get("time_budget_s")
        # what this job may still spend: its budget minus what earlier attempts spent, within the night
        want = (budget - st["tuned_s"]) if budget is not None else math.inf
        if st["status"] == "done" and st.get("spec") == _spec(job):
            want = 0.0  # finished with this very budget: measure only
        left = total - (time.monotonic() - t0) - MEASURE_RESERVE_S
        allowed = min(want, left)
        if allowed >= MIN_JOB_S:
            child_budget = None if allowed == math.inf else allowed
            kill_after = job.get("kill_after_s") or (1.25 * (child_budget or 4 * 3600) + 600)
            out = report_dir / "jobs" / f"{slug(key)}.tune.json"
            out.unlink(missing_ok=True)
            spec = dict(model=job["model"], target=job["target"], trials=job.get("trials"),
                        time_budget_s=child_budget, early_stopping=job.get("early_stopping"),
                        log_dir=str(log_dir), out=str(out))
            print(f"[{_clock(t0)}] {key}: tuning" + (f" for up to {child_budget / 60:.1f} min" if child_budget else "")
                  + (f" / {job['trials']} trials" if job.get("trials") else ""), flush=True)
            st["attempts"] += 1
            st["status"] = "running"
            save_state(report_dir, state)
            started = time.monotonic()
            try:
                code, tail = _child(["--tune-job", json.dumps(spec)], log_path, kill_after)
            finally:  # Ctrl-C of the runner: the time spent still counts against the job's budget
                st["tuned_s"] += time.monotonic() - started
                save_state(report_dir, state)
            if code == 0 and out.exists():
                st.update(status="done", spec=_spec(job), tune=json.loads(out.read_text()), error=None)
            else:
                st.update(status="failed", error=f"tuning {_describe_exit(code, kill_after)}: {tail}")
            save_state(report_dir, state)
            print(f"[{_clock(t0)}] {key}: {st['status']}" + (f" ({st['error'].splitlines()[0]})" if st["error"] else ""),
                  flush=True)
        elif st["status"] != "done":
            st.update(status="skipped" if st["status"] == "new" else st["status"],
                      error=st.get("error") or "no time left in the total budget")
            print(f"[{_clock(t0)}] {key}: not tuned ({st['error'].splitlines()[0]})", flush=True)
        if st["status"] == "failed" and _model_missing(job["model"]):
            failed += 1
            continue
        # measure in this run (also after a crash: the records measured so far apply)
        out = report_dir / "jobs" / f"{slug(key)}.measure.json"
        out.unlink(missing_ok=True)
        spec = dict(model=job["model"], target=job["target"], log_dir=str(log_dir), repeat=repeat, out=str(out))
        print(f"[{_clock(t0)}] {key}: measuring untuned, tuned, ONNX Runtime, PyTorch", flush=True)
        code, tail = _child(["--measure-job", json.dumps(spec)], log_path, 1800.0)
        if code == 0 and out.exists():
            st["measure"] = json.loads(out.read_text())
        else:
            st["measure_error"] = f"measuring {_describe_exit(code, 1800.0)}: {tail}"
        failed += st["status"] != "done"
        save_state(report_dir, state)
    write_report(plan, state, report_dir, log_dir, time.monotonic() - t0)
    print(f"wrote {report_dir / 'report.md'}", flush=True)
    return 1 if failed else 0


def _spec(job: dict) -> dict:
    return {k: job.get(k) for k in ("time_budget_s", "trials", "early_stopping")}


def _model_missing(model: str) -> bool:
    return not model.startswith("zoo:") and not Path(model).exists()


def _clock(t0: float) -> str:
    s = int(time.monotonic() - t0)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ------------------------------------------------------------------------------------------ report
def _trajectory(log_dir: Path, job: dict, st: dict) -> list[dict]:
    from compiler.tuning import progress_path, read_progress

    path = (st.get("tune") or {}).get("progress_file")
    if not path:
        import targets

        try:
            path = progress_path(log_dir / targets.get(job["target"]).fingerprint(), job["model"])
        except Exception:  # noqa: BLE001 - unknown target: no trajectory
            return []
    entries = [e for e in read_progress(path) if e.get("estimated_ms") is not None]
    return sorted(entries, key=lambda e: (e["trials"], e["time"]))


def plot_model(model: str, series: list[tuple[dict, dict, list[dict]]], path: Path) -> bool:
    """One PNG: estimated end-to-end latency against trials for each target the model was tuned
    for, with the latencies measured in this run marked. False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(traj for _, _, traj in series):
        return False
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    for job, st, traj in series:
        if not traj:
            continue
        xs, ys = [e["trials"] for e in traj], [e["estimated_ms"] for e in traj]
        ax.step(xs, ys, where="post", lw=2, label=f"{job['target']}: estimated (sum of kernel bests)")
        if traj[0].get("default_ms"):
            ax.axhline(traj[0]["default_ms"], color="grey", ls=":", lw=1,
                       label=f"{job['target']}: estimated, default schedules")
        m = st.get("measure") or {}
        x_end = xs[-1]
        for field, label, style in (("untuned_ms", "untuned Kiln (measured)", dict(color="tab:red", marker="s")),
                                    ("tuned_ms", "tuned Kiln (measured)", dict(color="tab:green", marker="o"))):
            if m.get(field):
                ax.plot([x_end], [m[field]], ls="none", ms=8, label=label, **style)
        for field, label, color in (("ort_ms", "ONNX Runtime (measured)", "tab:purple"),
                                    ("torch_ms", "PyTorch eager (measured)", "tab:orange")):
            if m.get(field):
                ax.axhline(m[field], color=color, ls="--", lw=1.2, label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("measured trials (all runs, this model's kernels)")
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if y and y > 0]
    if ys and max(ys) / min(ys) > 4:  # baselines far apart: a log scale keeps the tuning curve readable
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_ylabel("latency (ms, batch 1, log scale)")
    else:
        ax.set_ylim(bottom=0)
        ax.set_ylabel("latency (ms, batch 1)")
    ax.set_title(f"{model}: latency against tuning trials")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def write_report(plan: dict, state: dict, report_dir: Path, log_dir: Path, wall_s: float) -> Path:
    rows, plots, problems = [], [], []
    by_model: dict[str, list] = {}
    for job in plan["job"]:
        st = state.get(job["key"], {})
        by_model.setdefault(job["model"], []).append((job, st, _trajectory(log_dir, job, st)))
        m, t = st.get("measure") or {}, st.get("tune") or {}
        untuned, tuned, ort, pt = m.get("untuned_ms"), m.get("tuned_ms"), m.get("ort_ms"), m.get("torch_ms")
        rows.append(f"| {job['model']} | {job['target']} | {st.get('status', '-')} | "
                    f"{t.get('total_trials', '-')} ({t.get('new_trials', '-')} new) | "
                    f"{_fmt(st.get('tuned_s', 0) / 60, '.1f')} | {t.get('stopped_by', '-')} | {_fmt(untuned)} | "
                    f"{_fmt(tuned)} | {_fmt(ort)} | {_fmt(pt)} | "
                    f"{_fmt(untuned / tuned if untuned and tuned else None, '.2f')}x | "
                    f"{_fmt(tuned / ort if tuned and ort else None, '.2f')}x | "
                    f"{_fmt(tuned / pt if tuned and pt else None, '.2f')}x |")
        for what in ("error", "measure_error"):
            if st.get(what):
                problems.append(f"- **{job['key']}** ({what.replace('_', ' ')}):\n\n```\n{st[what]}\n```")
        if m.get("tuned_error"):
            problems.append(f"- **{job['key']}**: tuned build: {m['tuned_error']}")
    for model, series in by_model.items():
        png = report_dir / f"{slug(model)}.png"
        if plot_model(model, series, png):
            plots.append(f"### {model}\n\n![{model}]({png.name})\n")
    threads = next((s.get("measure", {}) or {}).get("threads") for s in state.values() if s.get("measure")) or "-"
    md = ["# Overnight tuning report\n",
          f"{time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({platform.machine()}, "
          f"{os.cpu_count()} cores); this run took {wall_s / 60:.1f} min; logs in `{log_dir}`.\n",
          f"Latencies: median of timed runs, batch 1, {threads} threads, all engines of a model measured in "
          "this run in alternating rounds (untuned Kiln, tuned Kiln, ONNX Runtime, PyTorch eager). *untuned* "
          "is Kiln with its default schedules (no records), *tuned* the build with the tuning logs. Ratios "
          "below 1 mean tuned Kiln is faster.\n",
          "| model | target | status | trials in log | tuning min | stopped by | untuned ms | tuned ms | "
          "ONNX Runtime ms | PyTorch ms | untuned / tuned | tuned / ORT | tuned / PyTorch |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, ""]
    if problems:
        md += ["## Failures\n", *problems, ""]
    if plots:
        md += ["## Latency against trials\n",
               "The line is the tuner's estimate (sum over kernels of calls x best measured kernel time) after "
               "each batch; the markers and dashed lines are end-to-end latencies measured at the end.\n", *plots]
    path = report_dir / "report.md"
    path.write_text("\n".join(md))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan", nargs="?", help="plan file (.toml)")
    ap.add_argument("--report-dir", help="report directory (default: the plan's report_dir, else overnight_report)")
    ap.add_argument("--log-dir", help="tuning-log directory (default: the plan's log_dir, else tuning_logs)")
    ap.add_argument("--tune-job", help=argparse.SUPPRESS)
    ap.add_argument("--measure-job", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tune_job:
        tune_job(json.loads(args.tune_job))
        return 0
    if args.measure_job:
        measure_job(json.loads(args.measure_job))
        return 0
    if not args.plan:
        ap.error("a plan file is required")
    try:
        plan = load_plan(Path(args.plan))
    except PlanError as err:
        print(f"overnight: error: {err}", file=sys.stderr)
        return 2
    report_dir = Path(args.report_dir or plan.get("report_dir", "overnight_report")).resolve()
    log_dir = Path(args.log_dir or plan.get("log_dir", "tuning_logs")).resolve()
    print(f"plan {args.plan}: {len(plan['job'])} jobs"
          + (f", total budget {plan['total_budget_s'] / 3600:.2f} h" if "total_budget_s" in plan else "")
          + f"; logs {log_dir}; report {report_dir}", flush=True)
    return run_plan(plan, report_dir, log_dir)


if __name__ == "__main__":
    sys.exit(main())
