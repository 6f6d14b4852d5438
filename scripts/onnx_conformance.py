"""Run ONNX's operator conformance collection through Kiln (and optionally ONNX Runtime) and tabulate.

    python scripts/onnx_conformance.py                     # all 1,884 cases, Kiln only
    python scripts/onnx_conformance.py --ort               # ONNX Runtime on the same cases, for the ratio
    python scripts/onnx_conformance.py -k isinf -k mod_    # cases whose name contains any -k string
    python scripts/onnx_conformance.py --jsonl out.jsonl   # one line per case: name, status, message

Each case is compiled and run in a forked child, so a case that kills its process (a signal) is
counted as ``crash`` instead of ending the run. Statuses: ``pass``; ``mismatch`` (wrong outputs, no
error: the worst kind); ``kiln_error`` (a clear refusal); ``error`` (any other exception: a bug);
``crash`` (the child died); ``timeout``.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import warnings

from compiler.onnx_backend import compare, run_case, run_isolated


def _cases(keys: list[str]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from onnx.backend.test.case.node import collect_testcases

        cases = collect_testcases("")
    return [c for c in cases if not keys or any(k in c.name for k in keys)]


def _run_ort(case) -> tuple[str, str]:
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(case.model.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        for inputs, expected in case.data_sets:
            compare(sess.run(None, dict(zip(names, inputs))), expected, case.rtol, case.atol)
    except AssertionError as err:
        return "mismatch", " ".join(str(err).split())[:200]
    except Exception as err:  # noqa: BLE001
        return "error", f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return "pass", ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", action="append", default=[], help="only cases whose name contains this (repeatable)")
    ap.add_argument("--ort", action="store_true", help="also run ONNX Runtime on each case")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per case (default 120)")
    ap.add_argument("--jsonl", help="write one JSON line per case here")
    args = ap.parse_args(argv)
    # imported once, before forking: each child starts with TVM, the frontends and the pipeline loaded
    import compiler.driver  # noqa: F401
    import compiler.frontends.onnx  # noqa: F401
    import compiler.onnx_backend  # noqa: F401
    import onnxruntime  # noqa: F401

    cases = _cases(args.k)
    out = open(args.jsonl, "w") if args.jsonl else None
    counts: collections.Counter = collections.Counter()
    t0 = time.time()
    for i, case in enumerate(cases):
        row = {"name": case.name}
        if args.ort:
            row["ort"], row["ort_message"] = run_isolated(_run_ort, case, args.timeout)
        row["kiln"], row["message"] = run_isolated(run_case, case, args.timeout)
        counts[row["kiln"]] += 1
        if args.ort:
            counts[f"ort_{row['ort']}"] += 1
            if row["ort"] == "pass":
                counts["both_ort_pass_" + row["kiln"]] += 1
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()
        if row["kiln"] != "pass":
            print(f"[{i + 1}/{len(cases)}] {case.name}: {row['kiln']} {row['message']}", flush=True)
    print(f"{len(cases)} cases in {time.time() - t0:.0f} s: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
