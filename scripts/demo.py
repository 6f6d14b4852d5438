#!/usr/bin/env python3
"""Kiln's main job on a built-in model, end to end:

compile a zoo model for this machine's CPU, export a .so, load it in a fresh process that never
saw the model, check its outputs against PyTorch, and print its latency next to ONNX Runtime and
PyTorch eager measured in the same run.

    python scripts/demo.py [--model resnet18] [--repeat 30]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines  # noqa: E402

_CHILD = r"""
import sys, numpy as np, compiler
mod = compiler.load(sys.argv[1])
data = np.load(sys.argv[2])
out = mod.run(*[data[s.name] for s in mod.inputs])
np.save(sys.argv[3], out if not isinstance(out, tuple) else out[0])
bench = mod.benchmark(repeat=int(sys.argv[4]))
print(bench.median_ms)
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18", help="zoo model name (default: resnet18)")
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args(argv)

    import torch

    import compiler
    from compiler import zoo

    threads = len(os.sched_getaffinity(0))
    model, inputs = zoo.load(args.model)
    print(f"[1/4] compiling zoo:{args.model} for this CPU (target x86) ...", flush=True)
    t0 = time.perf_counter()
    mod = compiler.compile(model, target="x86", example_inputs=inputs)
    print(f"      compiled in {time.perf_counter() - t0:.1f} s", end="")
    if mod.meta.get("tuning_logs_shipped"):
        print(f", with Kiln's shipped tuning records ({len(mod.meta['tuned_kernels'])} of "
              f"{len(mod.meta['kernels'])} kernels tuned on this CPU model)")
    else:
        print(", with Kiln's default schedules (no tuning records shipped for this CPU)")
    print(mod.summary())

    work = tempfile.mkdtemp(prefix="kiln-demo-")
    so = mod.export(os.path.join(work, f"{args.model}.so"))
    print(f"[2/4] exported {so} ({so.stat().st_size / 1e6:.1f} MB, weights inside)")

    np.savez(os.path.join(work, "inputs.npz"), **{s.name: t.numpy() for s, t in zip(mod.inputs, inputs)})
    print("[3/4] loading the .so in a fresh Python process and running it ...", flush=True)
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, str(so), os.path.join(work, "inputs.npz"), os.path.join(work, "out.npy"),
         str(args.repeat)], capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stderr, file=sys.stderr)
        return 1
    kiln_ms = float(res.stdout.strip().splitlines()[-1])
    out = np.load(os.path.join(work, "out.npy"))
    with torch.no_grad():
        ref = model(*inputs)
    ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).numpy()
    err = float(np.max(np.abs(out - ref)) / (np.max(np.abs(ref)) + 1e-12))
    ok = np.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(ref))))
    print(f"      output {list(out.shape)} vs PyTorch: max relative error {err:.2e} -> {'OK' if ok else 'MISMATCH'}")

    print(f"[4/4] latency, batch 1, {threads} threads, median of {args.repeat}:", flush=True)
    ort = baselines.ort_ms(model, inputs, args.repeat, threads)
    pt = baselines.torch_ms(model, inputs, args.repeat, threads)
    print(f"      {'engine':<16}{'ms':>9}{'vs ORT':>9}")
    kiln_name = "Kiln (tuned)" if mod.meta.get("tuning_logs_shipped") else "Kiln (untuned)"
    for name, ms in ((kiln_name, kiln_ms), ("ONNX Runtime", ort), ("PyTorch eager", pt)):
        print(f"      {name:<16}{ms:>9.2f}{ms / ort:>8.2f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
