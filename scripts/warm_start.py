#!/usr/bin/env python3
"""How many trials a warm start saves: tune model B cold, and warm-started from model A's logs.

1. Tune model A (``--model-a``, default ``zoo:tiny_cnn``) for ``--trials-a`` trials in a fresh log dir.
2. Tune model B cold: a fresh log dir, ``--trials`` new trials.
3. Tune model B warm: a copy of A's log dir (its records and saved cost model, same target), the
   same number of *new* trials (records B's kernels already have there, kernels shared with A, are
   not counted against it).

Reported, for each B run (early stopping off, so both spend the same trials):

1. the estimated end-to-end latency (the tuner's figure: best record per kernel, Kiln's default
   schedule included) and the trials needed to reach the cold run's final figure X. Kiln's defaults
   are strong: a few minutes of search rarely beats them, and this figure then stays flat.
2. the search alone: after each trial, ``sum(weight x best trial so far) / sum(weight x default)``
   over B's kernels (default schedules left out, each run normalised by its own default figures so
   that load changes between runs cancel), and the trials each run needs to reach the cold run's
   final value; the saving is the difference.

    python scripts/warm_start.py [--model-a zoo:tiny_cnn] [--model-b tiny_cnn_wide] [--trials 24] [--plot out.png]

``--model-b tiny_cnn_wide`` (the default) is TinyCNN with 24/48 channels and a 40x40 input, defined
here: related to A's kernels but not identical, so the saving comes from the cost model and from the
kernels the two share (the classifier's). At scale: ``--keep DIR`` with ``DIR/a`` a copy of real
logs (say the zoo's, after an overnight run) and ``--model-b zoo:resnet18@160`` (ResNet-18 on a
160x160 input: the same layers at other shapes, so no kernel but the classifier is shared).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))


def tiny_cnn_wide():
    """TinyCNN's structure at other widths and resolution (B's default)."""
    import torch
    from torch import nn

    torch.manual_seed(1)

    def cbr(c_in, c_out, stride=1, groups=1):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(c_out),
                             nn.ReLU(inplace=True))

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.dw, self.down = cbr(3, 24), cbr(24, 24, groups=24), cbr(24, 48, stride=2)
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(48, 10)

        def forward(self, x):
            x = self.stem(x)
            x = x + self.dw(x)
            return self.fc(torch.flatten(self.pool(self.down(x)), 1))

    return Wide().eval(), (torch.randn(1, 3, 40, 40),)


def resolve(model: str):
    """(model, example_inputs, label) for compiler.tune: a zoo/ONNX name, ``tiny_cnn_wide``, or
    ``zoo:NAME@S`` (the zoo model on an SxS input: the same network with other kernel shapes)."""
    if model == "tiny_cnn_wide":
        net, inputs = tiny_cnn_wide()
        return net, inputs, "tiny_cnn_wide"
    if model.startswith("zoo:") and "@" in model:
        import torch

        from compiler import zoo

        name, size = model[4:].split("@")
        net, (x,) = zoo.load(name)
        return net, (torch.randn(*x.shape[:2], int(size), int(size)),), model
    return model, None, model


def existing_trials(model, inputs, log_dir: Path) -> int:
    """Records already in ``log_dir`` for ``model``'s kernels (not counting default schedules)."""
    import tvm_ffi

    import targets
    from compiler import pipeline
    from compiler.tuning import database, search

    desc = targets.get("x86")
    fused = pipeline.lower(model, desc, example_inputs=inputs).fused
    keys = [str(tvm_ffi.structural_hash(t.mod)) for t in search.extract_tasks(fused, desc.to_tvm())]
    counts = database.open_logs(log_dir, desc, create=False).record_counts()
    return sum(counts.get(k, 0) for k in keys)


def _record_counts(log_dir: Path) -> dict[str, int]:
    """Records per workload hash in the x86 database under ``log_dir`` (empty when none)."""
    import targets
    from compiler.tuning import database

    work = log_dir / targets.get("x86").fingerprint()
    if not (work / database.WORKLOAD_FILE).exists():
        return {}
    hashes, records = database.read_db(work)
    counts: dict[str, int] = {}
    for idx, _rec in records:
        counts[hashes[idx]] = counts.get(hashes[idx], 0) + 1
    return counts


def _new_trials(work: Path, hashes_of, before: dict[str, int]):
    """``(workload hash, ms or None for a failed candidate)`` of each trial this run added for the
    workloads in ``hashes_of``, in the order appended (records there before it and default schedules
    left out)."""
    from compiler.tuning import database

    default_traces = {e.get("trace") for e in database.read_defaults(work).values()}
    hashes, records = database.read_db(work)
    seen: dict[str, int] = {}
    for idx, rec in records:
        h = hashes[idx]
        if h not in hashes_of:
            continue
        seen[h] = seen.get(h, 0) + 1
        if seen[h] <= before.get(h, 0) or database.trace_key(rec[0]) in default_traces:
            continue  # there before this run, or a default schedule
        secs = database.record_seconds(rec)
        yield h, None if secs is None else secs * 1e3


def search_trajectory(work: Path, model: str, before: dict[str, int]) -> list[tuple[int, float]]:
    """The search's own progress, defaults left out: after each new trial k of this run (records in
    the order they were appended), ``sum(weight x best trial so far) / sum(weight x default)`` over the
    model's kernels, from the first trial at which every kernel has one. Normalising by the run's own
    default figures keeps load changes between runs out of the comparison."""
    from compiler.tuning import database

    weight = {t["workload"]: t["weight"] for t in database.read_models(work)[model]["tasks"]}
    defaults = database.read_defaults(work)
    denom = sum(w * defaults[h]["ms"] for h, w in weight.items())
    best: dict[str, float] = {}
    out = []
    for k, (h, ms) in enumerate(_new_trials(work, weight, before), start=1):
        if ms is not None:
            best[h] = min(best.get(h, float("inf")), ms)
        if len(best) == len(weight):
            out.append((k, sum(w * best[h] for h, w in weight.items()) / denom))
    return out


def kernel_trials(work: Path, model: str, before: dict[str, int]) -> dict[str, list[float]]:
    """Per kernel of ``model``: its new trials of this run in order, each as latency / the kernel's
    default latency (inf for a candidate that failed)."""
    from compiler.tuning import database

    hashes_of = {t["workload"] for t in database.read_models(work)[model]["tasks"]}
    defaults = database.read_defaults(work)
    out: dict[str, list[float]] = {h: [] for h in hashes_of}
    for h, ms in _new_trials(work, hashes_of, before):
        out[h].append(float("inf") if ms is None else ms / defaults[h]["ms"])
    return out


def per_kernel_saving(cold: dict[str, list[float]], warm: dict[str, list[float]]) -> dict:
    """For each kernel: trials the cold run needed to reach its best, and trials the warm run needed
    to reach the same (None: not within its trials). Summed over the kernels both reached."""
    rows = {}
    for h, c in cold.items():
        w = warm.get(h, [])
        if not c or min(c) == float("inf"):
            continue
        x = min(c)
        n_cold = c.index(x) + 1
        n_warm = next((i + 1 for i, v in enumerate(w) if v <= x * (1 + 1e-9)), None)
        rows[h] = {"x": x, "cold": n_cold, "warm": n_warm, "cold_trials": len(c), "warm_trials": len(w)}
    both = [r for r in rows.values() if r["warm"] is not None]
    return {"kernels": rows, "reached": len(both), "of": len(rows),
            "cold_sum": sum(r["cold"] for r in both), "warm_sum": sum(r["warm"] for r in both)}


def tune(model, inputs, trials: int, log_dir: Path, label: str) -> dict:
    import compiler
    from compiler.tuning import read_progress

    before = _record_counts(log_dir)
    t0 = time.perf_counter()
    report = compiler.tune(model, "x86", example_inputs=inputs, trials=trials, log_dir=log_dir, early_stopping=0,
                           progress=False)
    entries = read_progress(report.progress_file)
    traj = [(e["new_trials"], e["estimated_ms"]) for e in entries if e["run"] == entries[-1]["run"]]
    print(f"  {label}: {report.new_trials} new trials in {time.perf_counter() - t0:.0f} s, est. "
          f"{report.estimated_ms:.4f} ms (default schedules {report.default_estimated_ms:.4f} ms), "
          f"cost model {report.cost_model}", file=sys.stderr, flush=True)
    search = search_trajectory(report.log_dir, report.model, before)
    kernels = kernel_trials(report.log_dir, report.model, before)
    return {"kernels": kernels, "label": label, "new_trials": report.new_trials, "estimated_ms": report.estimated_ms,
            "default_ms": report.default_estimated_ms, "cost_model": report.cost_model, "trajectory": traj,
            "search": search, "wall_s": time.perf_counter() - t0}


def trials_to_reach(traj, target: float) -> int | None:
    for trials, value in traj:
        if value is not None and value <= target * (1 + 1e-9):
            return trials
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-a", default="zoo:tiny_cnn")
    ap.add_argument("--model-b", default="tiny_cnn_wide")
    ap.add_argument("--trials-a", type=int, default=24)
    ap.add_argument("--trials", type=int, default=24, help="new trials for each run of B")
    ap.add_argument("--keep", help="keep the three log dirs under this directory (A's is reused if already there)")
    ap.add_argument("--plot", help="write a PNG of both trajectories")
    ap.add_argument("--json", help="write the figures as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    root = Path(args.keep or tempfile.mkdtemp(prefix="kiln-warm-"))
    root.mkdir(parents=True, exist_ok=True)
    a_model, a_inputs, a_label = resolve(args.model_a)
    b_model, b_inputs, b_label = resolve(args.model_b)
    try:
        reuse = bool(args.keep) and (root / "a").exists()
        print(f"A = {a_label} ({'reused from ' + str(root / 'a') if reuse else str(args.trials_a) + ' trials'}), "
              f"B = {b_label} ({args.trials} new trials per run)", file=sys.stderr, flush=True)
        if reuse:  # A already tuned in this directory (--keep): reuse it
            a = {"new_trials": "reused"}
        else:
            a = tune(a_model, a_inputs, args.trials_a, root / "a", f"A {a_label}")
        shutil.rmtree(root / "b_cold", ignore_errors=True)
        shutil.rmtree(root / "b_warm", ignore_errors=True)
        cold = tune(b_model, b_inputs, args.trials, root / "b_cold", f"B {b_label} cold")
        shutil.copytree(root / "a", root / "b_warm")
        have = existing_trials(b_model, b_inputs, root / "b_warm")
        warm = tune(b_model, b_inputs, have + args.trials, root / "b_warm", f"B {b_label} warm")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    x = cold["estimated_ms"]
    n_cold, n_warm = trials_to_reach(cold["trajectory"], x), trials_to_reach(warm["trajectory"], x)
    print(f"\nB = {b_label}, warm-started from A = {a_label} ({a['new_trials']} trials); "
          f"B's kernels had {have} records in A's logs")
    print("1. estimated end-to-end ms (best record per kernel, Kiln's default schedule included):")
    print(f"   {'run':<6} {'start ms':>10} {'final ms':>10} {'trials to reach X':>18}   (X = cold final = {x:.4f} ms)")
    for run, n in (("cold", n_cold), ("warm", n_warm)):
        r = cold if run == "cold" else warm
        print(f"   {run:<6} {r['trajectory'][0][1]:>10.4f} {r['estimated_ms']:>10.4f} {str(n):>18}")
    # the search alone (defaults left out), relative to each run's own default figures
    sx = cold["search"][-1][1] if cold["search"] else None
    s_cold = trials_to_reach(cold["search"], sx) if sx else None
    s_warm = trials_to_reach(warm["search"], sx) if sx else None
    print("2. the search alone: sum(weight x best trial) / sum(weight x default), from the trial at which every "
          "kernel has one:")
    for run, r, n in (("cold", cold, s_cold), ("warm", warm, s_warm)):
        if r["search"]:
            print(f"   {run:<6} first {r['search'][0][1]:.3f} at trial {r['search'][0][0]}, final {r['search'][-1][1]:.3f}, "
                  f"trials to reach cold's final ({sx:.3f}): {s_warm if run == 'warm' else s_cold}")
    pk = per_kernel_saving(cold["kernels"], warm["kernels"])
    print(f"3. per kernel: trials to reach the cold run's best candidate (latency / default): warm reached it on "
          f"{pk['reached']} of {pk['of']} kernels; on those, cold needed {pk['cold_sum']} trials, warm "
          f"{pk['warm_sum']}")
    for h, r in pk["kernels"].items():
        print(f"   {h:>22}: cold best {r['x']:.3f} at trial {r['cold']} of {r['cold_trials']}; warm reached it at "
              f"{r['warm']} of {r['warm_trials']}")
    saved = None if s_cold is None or s_warm is None else s_cold - s_warm
    if saved is not None:
        print(f"warm start saved {saved} of {s_cold} trials ({saved / max(s_cold, 1):.0%}) for the search to reach "
              f"the cold run's final quality")
    elif sx:
        print("the warm run did not reach the cold run's final quality within its trials")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for r, color in ((cold, "tab:blue"), (warm, "tab:green")):
            if r["search"]:
                ax.step(*zip(*r["search"]), where="post", color=color, lw=2, label=r["label"])
        if sx:
            ax.axhline(sx, color="grey", ls=":", label=f"cold final {sx:.3f}")
        ax.set_xlabel("new trials on B")
        ax.set_ylabel("sum(w x best trial) / sum(w x default)")
        ax.set_title(f"warm start: {b_label} from {a_label}'s logs and cost model")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps({"a": a, "cold": cold, "warm": warm, "existing_records": have,
                                               "x_ms": x, "trials_to_x": {"cold": n_cold, "warm": n_warm},
                                               "search_x": sx, "search_trials_to_x": {"cold": s_cold, "warm": s_warm}, "per_kernel": pk,
                                               "saved": saved}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
