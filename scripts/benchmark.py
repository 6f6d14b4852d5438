#!/usr/bin/env python3
"""Kiln against ONNX Runtime and PyTorch eager on the zoo, in one run.

For each model: compile time, then batch-1 latency (median) of Kiln with its default schedules (no
tuning records), ONNX Runtime (same thread count) and PyTorch eager, and the ratios Kiln/ORT and
Kiln/PyTorch. Prints a Markdown table (and writes it with --out). The engines are timed in
alternating rounds (``baselines.interleaved_ms``), so contention from other jobs on a shared machine
falls on all of them. Ratios are what to compare between machines; absolute times are noisy.

``--tuning-logs DIR`` adds Kiln built with the records in DIR (``tuning_logs`` for the shipped ones),
timed in the same rounds. ``--plain-tvm`` adds TVM's own build of the same Relax module
(``tvm.compile`` with its default pipeline: no Kiln schedules, no records), timed separately with
``--plain-repeat`` runs since it takes seconds per inference.

    python scripts/benchmark.py [--models resnet18,yolo,mobilenetv2,bert] [--repeat 30] [--out bench.md]
                                [--tuning-logs tuning_logs] [--plain-tvm]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines  # noqa: E402

DEFAULT_MODELS = "resnet18,yolo,mobilenetv2,bert"


def plain_tvm_ms(name: str, arrays: list, repeat: int) -> tuple[float, float]:
    """Compile time (s) and median latency (ms) of ``tvm.compile`` on the Relax module Kiln imports
    (TVM's default CPU pipeline: legalized operators as plain loops, no schedules)."""
    import tvm
    from tvm import relax

    import targets
    from compiler.frontends import import_model

    t0 = time.perf_counter()
    ex = tvm.compile(import_model(f"zoo:{name}").mod, target=targets.get("x86").to_tvm())
    compile_s = time.perf_counter() - t0
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(a) for a in arrays]
    return compile_s, baselines.median_ms(lambda: vm["main"](*args), repeat, warmup=1)


def bench_model(name: str, repeat: int, threads: int, tuning_logs: str | None = None,
                plain_repeat: int = 0) -> dict:
    import numpy as np

    import compiler
    from compiler import zoo

    model, inputs = zoo.load(name)
    t0 = time.perf_counter()
    mod = compiler.compile(model, target="x86", example_inputs=inputs, tuning_logs=False)  # defaults only
    compile_s = time.perf_counter() - t0
    arrays = [t.numpy() for t in inputs]
    out = mod.run(*arrays)
    ref = model(*inputs)
    ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).detach().numpy()
    out = out[0] if isinstance(out, tuple) else out
    rel_err = float(np.max(np.abs(out - ref)) / (np.max(np.abs(ref)) + 1e-12))
    engines = {"kiln": lambda: mod.run(*arrays), **baselines.reference_runs(model, inputs, threads)}
    row = {"model": name, "compile_s": compile_s, "err": rel_err}
    if tuning_logs:
        tuned = compiler.compile(model, target="x86", example_inputs=inputs, tuning_logs=tuning_logs)
        row["untuned_kernels"] = len(tuned.meta.get("untuned_kernels", []))
        engines["tuned"] = lambda: tuned.run(*arrays)
    row.update(baselines.interleaved_ms(engines, repeat))
    if plain_repeat:
        row["plain_compile_s"], row["plain"] = plain_tvm_ms(name, arrays, plain_repeat)
    return row


def table(rows: list[dict], threads: int) -> str:
    cols = [("compile s", lambda r: f"{r['compile_s']:.1f}"), ("Kiln ms", lambda r: f"{r['kiln']:.2f}")]
    tuned = any("tuned" in r for r in rows)
    plain = any("plain" in r for r in rows)
    if tuned:
        cols.append(("Kiln tuned ms", lambda r: f"{r['tuned']:.2f}"))
    if plain:
        cols.append(("plain TVM ms", lambda r: f"{r['plain']:.0f}"))
    cols += [("ONNX Runtime ms", lambda r: f"{r['ort']:.2f}"), ("PyTorch ms", lambda r: f"{r['torch']:.2f}"),
             ("Kiln / ORT", lambda r: f"{r['kiln'] / r['ort']:.2f}x"),
             ("Kiln / PyTorch", lambda r: f"{r['kiln'] / r['torch']:.2f}x")]
    if tuned:
        cols += [("tuned / ORT", lambda r: f"{r['tuned'] / r['ort']:.2f}x"),
                 ("untuned / tuned", lambda r: f"{r['kiln'] / r['tuned']:.2f}x")]
    if plain:
        best = "tuned" if tuned else "kiln"
        cols.append((f"plain TVM / Kiln{' tuned' if tuned else ''}", lambda r: f"{r['plain'] / r[best]:.0f}x"))
    cols.append(("max rel. err", lambda r: f"{r['err']:.1e}"))
    head = "| model | " + " | ".join(c for c, _ in cols) + " |\n|---" + "|---" * len(cols) + "|\n"
    body = "".join("| " + " | ".join([r["model"], *(f(r) for _, f in cols)]) + " |\n" for r in rows)
    cpu = platform.processor() or platform.machine()
    what = "Kiln: default schedules" + (", Kiln tuned: with the tuning logs" if tuned else ", no tuning records")
    return head + body + f"\nBatch 1, FP32, {threads} threads, median latency; {what}; {cpu}.\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated zoo names (default {DEFAULT_MODELS})")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--out", help="also write the Markdown table here")
    ap.add_argument("--tuning-logs", metavar="DIR", help="also time Kiln built with the records in DIR")
    ap.add_argument("--plain-tvm", action="store_true", help="also time TVM's own build (no Kiln schedules)")
    ap.add_argument("--plain-repeat", type=int, default=3, help="runs of the plain TVM build (default 3)")
    args = ap.parse_args(argv)
    threads = len(os.sched_getaffinity(0))
    rows = []
    for name in args.models.split(","):
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        rows.append(bench_model(name.strip(), args.repeat, threads, args.tuning_logs,
                                args.plain_repeat if args.plain_tvm else 0))
        print(table(rows[-1:], threads).splitlines()[2], file=sys.stderr, flush=True)
    md = table(rows, threads)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
