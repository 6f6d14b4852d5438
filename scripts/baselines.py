"""Reference engines timed in the same process as Kiln: ONNX Runtime and PyTorch eager.

Shared by scripts/demo.py and scripts/benchmark.py. Latencies are medians in milliseconds, batch 1,
with the engines limited to the same number of threads Kiln uses.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import numpy as np
import torch


def median_ms(fn, repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def interleaved_ms(fns: dict, repeat: int, rounds: int = 5, warmup: int = 3) -> dict:
    """Median latency (ms) of each function in ``fns``, timed in ``rounds`` alternating rounds of
    ``repeat / rounds`` calls each, so that a stretch of contention on a shared machine (seen here:
    ONNX Runtime's own ResNet-18 time moved 11.6 -> 15.6 ms between runs) falls on every engine
    rather than on whichever ran during it."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per_round = max(1, repeat // rounds)
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def reference_runs(model, inputs, threads: int) -> dict:
    """``{"ort": f, "torch": f}``: one batch-1 inference of ``model`` on ``inputs`` by ONNX Runtime
    (exported as :func:`onnx_session` does) and by PyTorch eager, both on ``threads`` threads; for
    :func:`interleaved_ms`."""
    sess, feed, _ = onnx_session(model, inputs, threads)
    torch.set_num_threads(threads)

    def torch_run():
        with torch.no_grad():
            model(*inputs)

    return {"ort": lambda: sess.run(None, feed), "torch": torch_run}


def torch_ms(model, inputs, repeat: int, threads: int) -> float:
    torch.set_num_threads(threads)
    with torch.no_grad():
        return median_ms(lambda: model(*inputs), repeat)


def onnx_session(model, inputs, threads: int):
    """Export ``model`` with torch.onnx (dynamo=False) and open an ONNX Runtime session on it."""
    import onnxruntime as ort

    path = os.path.join(tempfile.mkdtemp(prefix="kiln-bench-"), "model.onnx")
    torch.onnx.export(model, tuple(inputs), path, dynamo=False, opset_version=17)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {i.name: np.asarray(t) for i, t in zip(sess.get_inputs(), inputs)}
    return sess, feed, path


def ort_ms(model, inputs, repeat: int, threads: int) -> float:
    sess, feed, _ = onnx_session(model, inputs, threads)
    return median_ms(lambda: sess.run(None, feed), repeat)
