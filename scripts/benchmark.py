#!/usr/bin/env python3
"""Kiln against ONNX Runtime and PyTorch eager on the zoo, in one run, with no tuning records.

For each model: compile time, then batch-1 latency (median) of Kiln, ONNX Runtime (same thread
count) and PyTorch eager, and the ratios Kiln/ORT and Kiln/PyTorch. Prints a Markdown table (and
writes it with --out). The three engines are timed in alternating rounds (``baselines.interleaved_ms``),
so contention from other jobs on a shared machine falls on all of them. Ratios are what to compare
between machines; absolute times are noisy.

    python scripts/benchmark.py [--models resnet18,yolo,mobilenetv2,bert] [--repeat 30] [--out bench.md]
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


def bench_model(name: str, repeat: int, threads: int) -> dict:
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
    import torch

    sess, feed, _ = baselines.onnx_session(model, inputs, threads)
    torch.set_num_threads(threads)

    def torch_run():
        with torch.no_grad():
            model(*inputs)

    ms = baselines.interleaved_ms({"kiln": lambda: mod.run(*arrays), "ort": lambda: sess.run(None, feed),
                                   "torch": torch_run}, repeat)
    return {"model": name, "compile_s": compile_s, **ms, "err": rel_err}


def table(rows: list[dict], threads: int) -> str:
    head = (f"| model | compile s | Kiln ms | ONNX Runtime ms | PyTorch ms | Kiln / ORT | Kiln / PyTorch | max rel. err |\n"
            f"|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['model']} | {r['compile_s']:.1f} | {r['kiln']:.2f} | {r['ort']:.2f} | {r['torch']:.2f} | "
        f"{r['kiln'] / r['ort']:.2f}x | {r['kiln'] / r['torch']:.2f}x | {r['err']:.1e} |\n" for r in rows)
    cpu = platform.processor() or platform.machine()
    return head + body + f"\nBatch 1, FP32, {threads} threads, no tuning records, median latency; {cpu}.\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated zoo names (default {DEFAULT_MODELS})")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--out", help="also write the Markdown table here")
    args = ap.parse_args(argv)
    threads = len(os.sched_getaffinity(0))
    rows = []
    for name in args.models.split(","):
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        rows.append(bench_model(name.strip(), args.repeat, threads))
        print(table(rows[-1:], threads).splitlines()[2], file=sys.stderr, flush=True)
    md = table(rows, threads)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
