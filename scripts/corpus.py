#!/usr/bin/env python3
"""Every zoo model through every route: compiled, checked, timed against ONNX Runtime.

For each zoo model and each route (``torch``: the ``nn.Module`` itself; ``onnx``: exported with
``torch.onnx.export(dynamo=False)``; ``onnx-dynamo``: with ``dynamo=True``), Kiln compiles for x86
(default schedules, no tuning records), runs the model on fresh inputs and compares with PyTorch
(relative L2 error of each output). Latency: the compiled ``.so`` and the ONNX file (the route's own
export; the ``dynamo=False`` export for the torch route) are each run in their own process, the two
timed in alternating rounds so that contention on a shared machine falls on both; the table gives
medians and the ratio Kiln/ORT (below 1: Kiln is faster). A failure to compile shows its error type
and message; anything but a ``KilnError`` is marked as a Kiln bug.

    python scripts/corpus.py [--models resnet18,vit] [--routes torch,onnx,onnx-dynamo] [--repeat 50]
                             [--no-timing] [--out corpus.md]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROUTES = ("torch", "onnx", "onnx-dynamo")
TOLERANCE = 1e-3  # relative L2 error of an output against PyTorch

#: A timing worker: loads one engine, then answers each "n" on stdin with the median of n runs (ms).
_WORKER = r"""
import json, statistics, sys, time
import numpy as np
engine, path, inputs, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
arrays = [np.load(p) for p in json.loads(inputs)]
if engine == "kiln":
    import compiler
    mod = compiler.load(path)
    run = lambda: mod.run(*arrays)
else:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {i.name: a for i, a in zip(sess.get_inputs(), arrays)}
    run = lambda: sess.run(None, feed)
for _ in range(3):
    run()
print("ready", flush=True)
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    print(statistics.median(times), flush=True)
"""


def _export(model, inputs, path: Path, dynamo: bool) -> str:
    import torch

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, tuple(inputs), str(path), dynamo=dynamo, opset_version=18 if dynamo else 17,
                          **({"external_data": False} if dynamo else {}))
    return str(path)


def _rel_err(got, want) -> float:
    import numpy as np

    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    errs = []
    for g, w in zip(got, want):
        w = np.asarray(w, dtype=np.float64)
        errs.append(float(np.linalg.norm(np.asarray(g, dtype=np.float64) - w) / max(np.linalg.norm(w), 1e-12)))
    return max(errs) if len(got) == len(want) else float("inf")


def interleaved_ms(so_path: str, onnx_path: str, arrays: list, repeat: int, threads: int, rounds: int = 5) -> dict:
    """Median latency (ms) of the Kiln module and the ONNX Runtime session, each in its own process,
    timed in ``rounds`` alternating rounds."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="kiln-corpus-") as tmp:
        paths = []
        for i, a in enumerate(arrays):
            paths.append(str(Path(tmp) / f"in{i}.npy"))
            np.save(paths[-1], a)
        env = dict(os.environ, TVM_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
        procs = {name: subprocess.Popen([sys.executable, "-c", _WORKER, name, path, json.dumps(paths), str(threads)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True, env=env, cwd=str(ROOT))
                 for name, path in (("kiln", so_path), ("ort", onnx_path))}
        try:
            for name, p in procs.items():
                if p.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"the {name} timing process failed to start")
            per_round = max(1, repeat // rounds)
            medians: dict = {name: [] for name in procs}
            for _ in range(rounds):
                for name, p in procs.items():
                    p.stdin.write(f"{per_round}\n")
                    p.stdin.flush()
                    medians[name].append(float(p.stdout.readline()))
            return {name: statistics.median(v) for name, v in medians.items()}
        finally:
            for p in procs.values():
                p.stdin.close()
                p.wait(timeout=60)


def run_case(name: str, route: str, workdir: Path, repeat: int, threads: int, timing: bool) -> dict:
    import numpy as np
    import torch

    import compiler
    from compiler import zoo
    from compiler.errors import KilnError

    model, inputs = zoo.load(name)
    row = {"model": name, "route": route}
    try:
        if route == "torch":
            source = model
        else:
            source = _export(model, inputs, workdir / f"{name}-{route}.onnx", dynamo=route == "onnx-dynamo")
    except Exception as err:  # noqa: BLE001 - an exporter failure is a fact about PyTorch, reported as such
        return {**row, "status": f"export failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"}
    t0 = time.perf_counter()
    try:
        mod = (compiler.compile(source, target="x86", example_inputs=inputs, tuning_logs=False) if route == "torch"
               else compiler.compile(source, target="x86", tuning_logs=False))
    except KilnError as err:
        return {**row, "status": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    except Exception as err:  # noqa: BLE001 - the point of the corpus: anything else is a Kiln bug
        return {**row, "status": f"KILN BUG {type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    row["compile_s"] = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(99)
    fresh = tuple(torch.randn(x.shape, generator=gen) if x.is_floating_point()
                  else torch.randint(0, int(x.max()) + 1, x.shape, generator=gen, dtype=x.dtype) for x in inputs)
    with torch.no_grad():
        want = model(*fresh)
    want = [want.numpy()] if isinstance(want, torch.Tensor) else [w.numpy() for w in want]
    arrays = [x.numpy() for x in fresh]
    row["rel_err"] = _rel_err(mod.run(*arrays), tuple(want))
    row["status"] = "ok" if row["rel_err"] <= TOLERANCE else "MISMATCH"
    if timing:
        so = mod.export(workdir / f"{name}-{route}.so")
        onnx_path = source if route != "torch" else _export(model, inputs, workdir / f"{name}-ref.onnx", False)
        ms = interleaved_ms(str(so), onnx_path, arrays, repeat, threads)
        row.update(kiln_ms=ms["kiln"], ort_ms=ms["ort"], ratio=ms["kiln"] / ms["ort"])
    return row


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def table(rows: list[dict], threads: int) -> str:
    lines = [f"Zoo corpus on x86, {_cpu()}, {threads} thread(s), {date.today().isoformat()}; default schedules, "
             "no tuning records; latency medians, each engine in its own process, alternating rounds",
             "",
             "| model | route | result | max rel. error | compile s | Kiln ms | ORT ms | Kiln / ORT |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
        comp = f"{r['compile_s']:.0f}" if "compile_s" in r else ""
        times = (f"{r['kiln_ms']:.2f} | {r['ort_ms']:.2f} | {r['ratio']:.2f}x" if "ratio" in r else " | | ")
        lines.append(f"| {r['model']} | {r['route']} | {r['status']} | {err} | {comp} | {times} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from compiler import zoo

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(zoo.names()))
    p.add_argument("--routes", default=",".join(ROUTES))
    p.add_argument("--repeat", type=int, default=50, help="timed runs per engine (split over 5 rounds)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--no-timing", action="store_true", help="compile and check only")
    p.add_argument("--out", help="also write the table to this Markdown file")
    args = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    routes = args.routes.split(",")
    unknown = sorted(set(routes) - set(ROUTES))
    if unknown:
        p.error(f"unknown route(s) {unknown}; routes are {list(ROUTES)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="kiln-corpus-") as tmp:
        for name in args.models.split(","):
            for route in routes:
                row = run_case(name, route, Path(tmp), args.repeat, args.threads, not args.no_timing)
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    text = table(rows, args.threads)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
