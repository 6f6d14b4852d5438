#!/usr/bin/env python3
"""The fixed cost of one call on tiny models: Kiln against ONNX Runtime, in one run.

For each model (default: the zoo's tiny ones), four figures in microseconds, medians over
alternating rounds (``baselines.interleaved_ms``) so contention falls on all of them:

* ``run``: ``CompiledModule.run(x)`` as a user calls it (NumPy in, NumPy out);
* ``vm``: the compiled code alone, the VM's ``main`` called on input tensors made once;
* ``overhead``: ``run - vm``, what a call costs beyond the kernels (input checks, copies in and out);
* ``ort``: ONNX Runtime's ``session.run`` on the same model (exported with torch.onnx, same threads);

and the ratio run/ort. ``--threads`` sets both engines' threads (default: every core; TVM's pool
size is fixed per process, so it is set before Kiln starts).

    python scripts/overhead.py [--models rnet,tiny_cnn,mlp] [--threads 2] [--repeat 4000]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from datetime import date

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure(name: str, threads: int, repeat: int) -> dict:
    import numpy as np
    import tvm

    import baselines
    import compiler
    from compiler import zoo

    model, inputs = zoo.load(name)
    mod = compiler.compile(model, target="x86", example_inputs=inputs)
    arrays = [np.asarray(x) for x in inputs]
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    sess, feed, _ = baselines.onnx_session(model, inputs, threads)
    fns = {
        "run": lambda: mod.run(*arrays),
        "vm": lambda: mod._main(*tensors),
        "ort": lambda: sess.run(None, feed),
    }
    ms = baselines.interleaved_ms(fns, repeat, rounds=10, warmup=200)
    us = {k: v * 1e3 for k, v in ms.items()}
    return {"model": name, **us, "overhead": us["run"] - us["vm"], "ratio": us["run"] / us["ort"]}


def table(rows: list[dict], threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [f"Fixed cost per call, {cpu}, {threads} thread(s), {date.today().isoformat()} (microseconds, medians)",
             "",
             "| model | Kiln run() | compiled code alone | fixed overhead | ONNX Runtime | Kiln / ORT |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['run']:.1f} | {r['vm']:.1f} | {r['overhead']:.1f} | {r['ort']:.1f} | "
                     f"{r['ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="rnet,tiny_cnn,mlp")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--repeat", type=int, default=4000)
    args = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    rows = [measure(m, args.threads, args.repeat) for m in args.models.split(",")]
    print(table(rows, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
