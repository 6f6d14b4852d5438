#!/usr/bin/env python3
"""Print the TIR Kiln's default schedules give each fused kernel of a zoo model, or one kernel of a
given shape, for a target: what to diff when a schedule rule is changed.

    python scripts/schedule_dump.py --target x86 --model resnet18 [--out resnet18.tir]
    python scripts/schedule_dump.py --target haswell --shape matmul:64,768,768 --shape bmm:12,128,64,128
    python scripts/schedule_dump.py --shape dense:1,512,1000 --dtype int8 --epilogue

Shapes (``--shape``, repeatable): ``matmul:M,K,N`` (``A[M, K] @ B[K, N]``, the layout ``nn.Linear``
weights reach TIR in), ``dense:M,K,N`` (``A[M, K] @ B[N, K]^T``), ``bmm:B,M,K,N`` (``A[B, M, K] @
B[B, K, N]``), ``conv:N,H,W,C,K,R,S,stride,pad`` (NHWC input, HWIO weights), ``dwconv:N,H,W,C,R,S,stride,pad``.
``--dtype`` is the input dtype (``float32``, ``float16``, ``int8``: int8 accumulates in int32),
``--epilogue`` adds a bias add and a ReLU after the kernel.

Each kernel is printed as ``# <name> <structural hash>`` and its TVM script, in name order. Only
``schedules.default_schedule_pass`` is run (not the pipeline's repack folding), so the repack
blocks a rule adds are visible. The script only uses entry points whose signatures are stable
(``pipeline.lower``, ``schedules.default_schedule_pass``), so it runs on older checkouts too.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _shape_func(spec: str, dtype: str, epilogue: bool):
    """The PrimFunc of a ``kind:dims`` shape spec (see the module doc)."""
    from tvm import te, topi

    kind, _, dims = spec.partition(":")
    d = [int(x) for x in dims.split(",")]
    acc = "int32" if dtype.startswith(("int", "uint")) else dtype

    def mac(x, y):
        return x.astype(acc) * y.astype(acc) if acc != dtype else x * y

    if kind in ("matmul", "dense"):
        m, k, n = d
        a = te.placeholder((m, k), dtype, name="A")
        b = te.placeholder((k, n) if kind == "matmul" else (n, k), dtype, name="B")
        r = te.reduce_axis((0, k), name="k")
        if kind == "matmul":
            out = te.compute((m, n), lambda i, j: te.sum(mac(a[i, r], b[r, j]), axis=r), name="C")
        else:
            out = te.compute((m, n), lambda i, j: te.sum(mac(a[i, r], b[j, r]), axis=r), name="C")
        ins = [a, b]
    elif kind == "bmm":
        bs, m, k, n = d
        a = te.placeholder((bs, m, k), dtype, name="A")
        b = te.placeholder((bs, k, n), dtype, name="B")
        r = te.reduce_axis((0, k), name="k")
        out = te.compute((bs, m, n), lambda s, i, j: te.sum(mac(a[s, i, r], b[s, r, j]), axis=r), name="C")
        ins = [a, b]
    elif kind == "conv":
        n, h, w, c, oc, kh, kw, stride, pad = d
        a = te.placeholder((n, h, w, c), dtype, name="data")
        b = te.placeholder((kh, kw, c, oc), dtype, name="weight")
        out = topi.nn.conv2d_nhwc(a, b, stride, pad, 1, out_dtype=acc)
        ins = [a, b]
    elif kind == "dwconv":
        n, h, w, c, kh, kw, stride, pad = d
        a = te.placeholder((n, h, w, c), dtype, name="data")
        b = te.placeholder((kh, kw, c, 1), dtype, name="weight")
        out = topi.nn.depthwise_conv2d_nhwc(a, b, stride, pad, 1, out_dtype=acc)
        ins = [a, b]
    else:
        raise SystemExit(f"unknown shape kind {kind!r} in {spec!r}")
    if epilogue:
        bias = te.placeholder((out.shape[-1],), acc, name="bias")
        zero = te.const(0, acc)
        out = te.compute(out.shape, lambda *i: te.max(out(*i) + bias[i[-1]], zero), name="T_relu")
        ins.append(bias)
    return te.create_prim_func(ins + [out])


def scheduled_kernels(mod, desc) -> dict:
    """``{kernel name: scheduled PrimFunc}`` after ``schedules.default_schedule_pass(desc)``."""
    import tvm

    import schedules

    with desc.to_tvm():
        out = schedules.default_schedule_pass(desc)(mod)
    return {gv.name_hint: f for gv, f in out.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="x86", help="target name (kiln targets)")
    ap.add_argument("--model", action="append", default=[], help="zoo model name (repeatable)")
    ap.add_argument("--shape", action="append", default=[], help="kernel shape spec (repeatable)")
    ap.add_argument("--dtype", default="float32", help="input dtype of --shape kernels")
    ap.add_argument("--epilogue", action="store_true", help="bias add + ReLU after --shape kernels")
    ap.add_argument("--out", help="write here instead of stdout")
    args = ap.parse_args(argv)

    import tvm
    import tvm_ffi

    import schedules
    import targets

    desc = targets.get(args.target)
    schedules.install_hooks()
    kernels: dict = {}
    for name in args.model:
        from compiler import pipeline

        fused = pipeline.lower(f"zoo:{name}", desc).fused
        for k, f in scheduled_kernels(fused, desc).items():
            kernels[f"{name}/{k}"] = f
    for spec in args.shape:
        func = _shape_func(spec, args.dtype, args.epilogue).with_attr("global_symbol", "main")
        for k, f in scheduled_kernels(tvm.IRModule({"main": func}), desc).items():
            kernels[f"{spec}/{args.dtype}{'+epilogue' if args.epilogue else ''}/{k}"] = f
    lines = []
    for name in sorted(kernels):
        f = kernels[name]
        lines.append(f"# {name} {tvm_ffi.structural_hash(f)}")
        lines.append(f.script())
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
