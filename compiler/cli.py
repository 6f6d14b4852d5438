"""``kiln``: the command line. It only parses arguments and calls the Python API.

    kiln compile MODEL --target x86 -o model.so [--input-shape name:1x3x224x224]
    kiln run model.so [--inputs in.npz] [--outputs out.npz]
    kiln info MODEL
    kiln targets

MODEL is an ONNX file, a ``torch.export`` ``.pt2`` file, or ``zoo:NAME`` (``kiln info zoo:`` lists
the zoo). Errors Kiln recognises print one line and exit with status 1 (2 for usage errors);
``-v`` shows the traceback too.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

EXIT_ERROR = 1


def _shape_arg(text: str) -> tuple[str, tuple[int, ...]]:
    """``name:1x3x224x224`` -> ("name", (1, 3, 224, 224))."""
    name, sep, dims = text.rpartition(":")
    try:
        if not sep or not name:
            raise ValueError
        shape = tuple(int(d) for d in dims.lower().split("x"))
        if any(d <= 0 for d in shape):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME:DIMxDIMx..., e.g. input:1x3x224x224, got {text!r}") from None
    return name, shape


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="Kiln: compile trained models into fast deployable modules.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging; -v also shows tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compile", help="compile a model into a deployable module",
                       description="Compile MODEL (ONNX file, .pt2 exported program, or zoo:NAME) for a target.")
    c.add_argument("model", help="ONNX file, .pt2 exported program, or zoo:NAME")
    c.add_argument("--target", "-t", default="x86", help="target name from `kiln targets` (default: x86, this machine)")
    c.add_argument("-o", "--output", required=True, help="output .so path")
    c.add_argument("--input-shape", action="append", type=_shape_arg, default=[], metavar="NAME:SHAPE",
                   help="fix an input's shape, e.g. input:1x3x224x224 (repeatable)")
    c.add_argument("--tuning-logs", help="tuning-log directory to take tuned schedules from")
    c.add_argument("--summary", action="store_true", help="print the fused kernels after compiling")

    r = sub.add_parser("run", help="run a compiled module on inputs from an .npz file (or random inputs)")
    r.add_argument("module", help=".so written by `kiln compile`")
    r.add_argument("--inputs", help=".npz with one array per input name (default: random inputs)")
    r.add_argument("--outputs", help="write the outputs to this .npz")
    r.add_argument("--benchmark", type=int, metavar="N", default=0, help="also time N runs and print latency")

    i = sub.add_parser("info", help="operators, parameters and FLOPs per layer and in total")
    i.add_argument("model", help="ONNX file, .pt2 exported program, or zoo:NAME (`zoo:` lists the zoo)")
    i.add_argument("--input-shape", action="append", type=_shape_arg, default=[], metavar="NAME:SHAPE")
    i.add_argument("--target", "-t", default="x86", help="target whose fusion to show (default: x86)")

    sub.add_parser("targets", help="list the known targets")
    return p


def _cmd_compile(args) -> int:
    import compiler
    import targets

    targets.get(args.target)  # an unknown target fails before any work
    print(f"compiling {args.model} for target {args.target} -> {args.output}", flush=True)
    t0 = time.perf_counter()
    mod = compiler.compile(args.model, target=args.target, input_shapes=dict(args.input_shape) or None,
                           tuning_logs=args.tuning_logs)
    path = mod.export(args.output)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    if args.summary:
        print(mod.summary())
    return 0


def _cmd_run(args) -> int:
    import numpy as np

    import compiler

    mod = compiler.load(args.module)
    if args.inputs:
        with np.load(args.inputs) as data:
            named = {k: data[k] for k in data.files}
        if len(named) == 1 and len(mod.inputs) == 1 and mod.inputs[0].name not in named:
            named = {mod.inputs[0].name: next(iter(named.values()))}
        outs = mod.run(**named)
    else:
        print("no --inputs given: using random inputs")
        arrays = mod.random_inputs()
        for spec, a in zip(mod.inputs, arrays):
            print(f"  input  {spec.name}: {list(a.shape)} {a.dtype}")
        outs = mod.run(*arrays)
    outs = outs if isinstance(outs, tuple) else (outs,)
    for spec, o in zip(mod.outputs, outs):
        print(f"  output {spec.name}: {list(o.shape)} {o.dtype}  mean {float(np.mean(o)):.6g} std {float(np.std(o)):.6g}")
    if args.outputs:
        np.savez(args.outputs, **{spec.name: o for spec, o in zip(mod.outputs, outs)})
        print(f"wrote {args.outputs}")
    if args.benchmark:
        print(f"latency: {mod.benchmark(repeat=args.benchmark)}")
    return 0


def _cmd_info(args) -> int:
    from compiler import info

    if args.model in ("zoo:", "zoo"):
        from compiler import zoo

        print("zoo models: " + ", ".join(zoo.names()))
        return 0
    print(info.model_info(args.model, target=args.target, input_shapes=dict(args.input_shape) or None))
    return 0


def _cmd_targets(_args) -> int:
    import targets

    from compiler.build import buildable

    rows = [("name", "family", "cpu / arch", "cores", "vector", "builds", "features", "aliases")]
    for d in targets.all_descriptions():
        rows.append((d.name, d.family, d.cpu or d.arch, str(d.cores), f"{d.vector_bits}b",
                     "yes" if buildable(d) else "not yet", ",".join(d.features) or "-", ",".join(d.aliases) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


_COMMANDS = {"compile": _cmd_compile, "run": _cmd_run, "info": _cmd_info, "targets": _cmd_targets}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (tests call it in-process)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), format="%(levelname)s %(name)s: %(message)s")
    from compiler.errors import KilnError

    try:
        return _COMMANDS[args.command](args)
    except KilnError as err:
        if args.verbose:
            raise
        print(f"kiln {args.command}: error: {err}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
