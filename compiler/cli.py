"""``kiln``: the command line. It only parses arguments and calls the Python API.

    kiln compile MODEL --target x86 -o model.so [--input-shape name:1x3x224x224] [--constant-input sr=16000]
    kiln run model.so [--inputs in.npz] [--outputs out.npz] [--emulate | --rpc HOST:PORT | --rpc-tracker HOST:PORT --rpc-key KEY]
    kiln package model.so --target rpi4 [-o bundle/]
    kiln info MODEL
    kiln tune MODEL --target x86 [--trials N] [--time-budget 8h|30m|90s] [--early-stopping N] [--log-dir DIR]
              [--precision fp32|fp16|int8 [--calibration CALIB.npz]] [--rpc-tracker HOST:PORT --rpc-key KEY]
    kiln logs list|merge|export|import ...
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


def _constant_arg(text: str) -> tuple[str, object]:
    """``name=16000``, ``name=0.5``, ``name=true`` or ``name=1,2,3`` (a 1-D array) -> (name, value)."""
    name, sep, value = text.partition("=")

    def number(item: str):
        item = item.strip()
        if item.lower() in ("true", "false"):
            return item.lower() == "true"
        try:
            return int(item)
        except ValueError:
            return float(item)

    try:
        if not sep or not name or not value.strip():
            raise ValueError
        items = [number(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with a number, true/false or comma-separated numbers, "
                                         f"e.g. sr=16000, got {text!r}") from None
    return name, items[0] if len(items) == 1 and "," not in value else items


def _npz_arg(text: str) -> Path:
    """An existing ``.npz`` file (checked at parse time)."""
    path = Path(text)
    if path.suffix != ".npz" or not path.is_file():
        raise argparse.ArgumentTypeError(f"expected an existing .npz file (np.savez), got {text!r}")
    return path


def _read_npz(path, what: str) -> dict:
    """The arrays of an ``.npz`` file, by name; a :class:`PathError` for a file NumPy cannot read
    without unpickling (object arrays are refused, never unpickled)."""
    import zipfile

    import numpy as np

    from compiler.errors import PathError

    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise PathError(f"{what} {path} is a single .npy array; save the arrays with np.savez "
                                "(one per input name)")
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        reason = ("it holds object arrays, which Kiln does not unpickle" if "allow_pickle" in str(err)
                  else f"{type(err).__name__}: {err}")
        raise PathError(f"cannot read {what} {path}: {reason}; write it with np.savez(path, name=array, ...)") from err


def _check_output(output: str | Path, *, model=None, directory: bool = False) -> Path:
    """Refuse, before any work, an output path that cannot be written: a folder where a file goes (or
    a file where a folder goes), an unwritable location, or the input model itself."""
    import os

    from compiler.errors import PathError

    out = Path(output)
    if model is not None and not str(model).startswith("zoo:") and out.exists() and Path(model).exists() \
            and out.resolve() == Path(model).resolve():
        raise PathError(f"-o {out} is the input model itself; Kiln does not overwrite its input: choose another path")
    if out.is_dir() and not directory:
        raise PathError(f"output {out} is a folder; give a file path (e.g. {out / 'model.so'})")
    if out.exists() and not out.is_dir() and directory:
        raise PathError(f"output {out} is a file; this target writes a folder (a C library): give a new folder path")
    parent = next((p for p in (out.parent, *out.parent.parents) if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise PathError(f"cannot write {out}: {parent} is not a writable folder")
    return out


def _address_arg(text: str) -> str:
    """``HOST:PORT`` (checked at parse time)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, e.g. 127.0.0.1:9190, got {text!r}")
    return text


def _add_constant_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--constant-input", action="append", type=_constant_arg, default=[], metavar="NAME=VALUE",
                        help="freeze an input to a value, e.g. sr=16000 (a number, true/false, or 1,2,3 for a 1-D "
                        "array); the module no longer takes it and what depends on it folds, such as an If on it "
                        "(repeatable; tune and compile with the same ones so that the records apply)")


def _add_precision_args(parser: argparse.ArgumentParser, what: str) -> None:
    """``--precision`` and ``--calibration``, the same for ``compile`` and ``tune`` (``what`` says what the
    precision applies to): a tuning run lowers the model exactly as the compile that uses its records."""
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8"),
                        help=f"{what}: fp16: FP16 compute with FP32 accumulation (NVIDIA GPU targets); int8: "
                        "post-training quantization (CPU and microcontroller targets; needs --calibration); "
                        "default fp32")
    parser.add_argument("--calibration", type=_npz_arg, metavar="CALIB.npz",
                        help="int8 calibration inputs: one array per input name, N examples stacked on axis 0")


def _calibration(args) -> dict | None:
    """The calibration inputs ``--calibration`` names (one array per input name), or None."""
    return _read_npz(args.calibration, "calibration file") if args.calibration else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="Kiln: compile trained models into fast deployable modules.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging; -v also shows tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compile", help="compile a model into a deployable module",
                       description="Compile MODEL (ONNX file, .pt2 exported program, or zoo:NAME) for a target.")
    c.add_argument("model", help="ONNX file, .pt2 exported program, or zoo:NAME")
    c.add_argument("--target", "-t", default="x86", help="target name from `kiln targets` (default: x86, this machine)")
    c.add_argument("-o", "--output", required=True,
                   help="output .so path (a directory for microcontroller targets: a C library)")
    c.add_argument("--input-shape", action="append", type=_shape_arg, default=[], metavar="NAME:SHAPE",
                   help="fix an input's shape, e.g. input:1x3x224x224 (repeatable)")
    _add_constant_arg(c)
    logs = c.add_mutually_exclusive_group()
    logs.add_argument("--tuning-logs", help="tuning-log directory to take tuned schedules from (default: Kiln's "
                      "shipped records for the target, when it has some)")
    logs.add_argument("--untuned", action="store_true", help="Kiln's default schedules only: ignore shipped records")
    _add_precision_args(c, "the module's precision")
    c.add_argument("--summary", action="store_true", help="print the fused kernels after compiling")

    r = sub.add_parser("run", help="run a compiled module on inputs from an .npz file (or random inputs)")
    r.add_argument("module", help=".so written by `kiln compile`")
    r.add_argument("--inputs", type=_npz_arg, help=".npz with one array per input name (default: random inputs)")
    r.add_argument("--outputs", help="write the outputs to this .npz")
    r.add_argument("--benchmark", type=int, metavar="N", default=0, help="also time N runs and print latency")
    r.add_argument("--check-finite", action="store_true",
                   help="fail (exit 1) when an input or output holds NaN or infinity")
    r.add_argument("--profile", action="store_true",
                   help="also time every fused kernel (per-kernel table; microcontroller libraries under "
                   "--emulate: instruction counts per kernel)")
    where = r.add_mutually_exclusive_group()
    where.add_argument("--emulate", action="store_true",
                       help="run an aarch64 module on the emulated ARM device (QEMU; set up by scripts/setup_arm.sh), "
                       "or a microcontroller library directory under qemu-system-arm (scripts/setup_mcu.sh)")
    where.add_argument("--rpc", type=_address_arg, metavar="HOST:PORT",
                       help="run on the device whose TVM RPC server listens at HOST:PORT (README: Remote devices)")
    where.add_argument("--rpc-tracker", type=_address_arg, metavar="HOST:PORT",
                       help="run on a free device under --rpc-key at this TVM RPC tracker")
    r.add_argument("--rpc-key", metavar="KEY", help="device key at --rpc-tracker (e.g. rpi4)")

    i = sub.add_parser("info", help="operators, parameters and FLOPs per layer and in total")
    i.add_argument("model", help="ONNX file, .pt2 exported program, or zoo:NAME (`zoo:` lists the zoo)")
    i.add_argument("--input-shape", action="append", type=_shape_arg, default=[], metavar="NAME:SHAPE")
    i.add_argument("--target", "-t", default="x86", help="target whose fusion to show (default: x86)")
    _add_constant_arg(i)

    tu = sub.add_parser("tune", help="search schedules for a model's kernels; records go to target-keyed logs",
                        description="Tune MODEL's kernels for a target. Stops at --trials (counting records "
                        "already in the logs), --time-budget or --early-stopping, whichever comes first; "
                        "a live display on a terminal, one line per batch otherwise; rerun the same "
                        "command to resume. Then: kiln compile MODEL --tuning-logs DIR.")
    tu.add_argument("model", help="ONNX file, .pt2 exported program, or zoo:NAME")
    tu.add_argument("--target", "-t", default="x86", help="target name from `kiln targets` (default: x86, this machine)")
    tu.add_argument("--trials", type=int, metavar="N", help="total measured trials for the model, records already in "
                    "the logs included (default: 32 per kernel when no --time-budget is given)")
    tu.add_argument("--time-budget", metavar="DURATION", help="wall-clock budget for this run: 8h, 30m, 90s, 1h30m")
    tu.add_argument("--log-dir", default="tuning_logs", help="tuning-log directory (default: tuning_logs)")
    tu.add_argument("--early-stopping", type=int, metavar="N", help="stop when no kernel's best improved by more "
                    "than 1%% for N trials after the warm-up (default with --time-budget: 64 or 8 per kernel, whichever is more; else off; 0: off)")
    tu.add_argument("--input-shape", action="append", type=_shape_arg, default=[], metavar="NAME:SHAPE",
                    help="fix an input's shape, e.g. input:1x3x224x224 (repeatable)")
    _add_constant_arg(tu)
    tu.add_argument("--restart", action="store_true", help="set existing logs for this target aside and start over")
    _add_precision_args(tu, "tune the kernels of the model compiled at this precision (compile with the same "
                        "--precision and --calibration to use the records)")
    tu.add_argument("--rpc-tracker", type=_address_arg, metavar="HOST:PORT",
                    help="measure candidates on the devices under --rpc-key at this TVM RPC tracker (how ARM "
                    "targets are tuned; candidates are cross-compiled here)")
    tu.add_argument("--rpc-key", metavar="KEY", help="device key at --rpc-tracker (e.g. rpi4)")

    lg = sub.add_parser("logs", help="list, merge, export and import tuning logs",
                        description="Tuning logs hold one database per target fingerprint. list: what a log "
                        "directory holds; merge: pool databases of the same target (from several machines); "
                        "export/import: ship one target's database as a .tar.gz.")
    lsub = lg.add_subparsers(dest="logs_command", required=True, metavar="ACTION")
    ll = lsub.add_parser("list", help="targets, workloads, records and best estimates in a log directory")
    ll.add_argument("--log-dir", default="tuning_logs", help="tuning-log directory (default: tuning_logs)")
    lm = lsub.add_parser("merge", help="merge tuning logs of one target into --log-dir")
    lm.add_argument("sources", nargs="+", metavar="SRC", help="tuning-log directories or per-target folders")
    lm.add_argument("--log-dir", required=True, help="destination tuning-log directory")
    lm.add_argument("--target", "-t", help="merge only this target's logs (sources holding several targets)")
    lm.add_argument("--best-only", action="store_true",
                    help="keep only each kernel's fastest record (to ship logs with a model, or in Kiln's tuning_logs/)")
    le = lsub.add_parser("export", help="write one target's logs to a .tar.gz")
    le.add_argument("--target", "-t", default="x86", help="target name (default: x86)")
    le.add_argument("--log-dir", default="tuning_logs", help="tuning-log directory (default: tuning_logs)")
    le.add_argument("-o", "--output", required=True, help="archive path (.tar.gz)")
    li = lsub.add_parser("import", help="merge an exported .tar.gz into a log directory")
    li.add_argument("archive", help=".tar.gz written by `kiln logs export`")
    li.add_argument("--log-dir", default="tuning_logs", help="tuning-log directory (default: tuning_logs)")

    k = sub.add_parser("package", help="bundle a compiled module with the runtime and a C++ runner for a board",
                       description="Write a directory with the module, the TVM runtime libraries for the board, a "
                                   "prebuilt C++ runner and a README: no Python or compiler needed on the board.")
    k.add_argument("module", help=".so written by `kiln compile`")
    k.add_argument("--target", "-t", help="the board (default: the target the module was compiled for)")
    k.add_argument("-o", "--output", help="bundle directory (default: MODULE-TARGET-bundle beside the module)")

    sub.add_parser("targets", help="list the known targets")
    return p


def _cmd_compile(args) -> int:
    import compiler
    import targets

    desc = targets.get(args.target)  # an unknown target fails before any work
    _check_output(args.output, model=args.model, directory=desc.family == "mcu")
    calibration = _calibration(args)  # an unreadable file fails before any work
    frozen = "".join(f", {name}={value}" for name, value in dict(args.constant_input).items())
    print(f"compiling {args.model} for target {args.target} -> {args.output}"
          + (f" (constant inputs{frozen[1:]})" if frozen else ""), flush=True)
    t0 = time.perf_counter()
    mod = compiler.compile(args.model, target=args.target, input_shapes=dict(args.input_shape) or None,
                           tuning_logs=False if args.untuned else args.tuning_logs, precision=args.precision,
                           calibration=calibration, constant_inputs=dict(args.constant_input) or None)
    path = mod.export(args.output)
    if path.is_dir():  # a microcontroller C library (compiler/mcu)
        files = ", ".join(sorted(p.name for p in path.iterdir()))
        print(f"wrote C library {path}/ ({files}) in {time.perf_counter() - t0:.1f} s")
        print(mod.memory_report())
    else:
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    if args.summary:
        print(mod.summary())
    return 0


def _cmd_run(args) -> int:
    import numpy as np

    import compiler

    if args.emulate and Path(args.module).is_dir():  # a microcontroller C library (compiler/mcu)
        from compiler import mcu

        mod = mcu.load(args.module)
        print(f"building {args.module} for {mod.meta['target']['name']} and running it under qemu-system-arm "
              f"({mod.meta['target'].get('machine', '?')})", flush=True)
    elif args.emulate:
        from compiler import emulator

        mod = emulator.load(args.module)
        print(f"running {args.module} (target {mod.meta['target']['name']}) on the emulated aarch64 device; "
              f"{emulator.TIMING_NOTE}", flush=True)
    elif args.rpc or args.rpc_tracker:
        from compiler import remote

        mod = remote.load(args.module, rpc=args.rpc, tracker=args.rpc_tracker, key=args.rpc_key)
        note = (f"; the device runs under emulation ({mod.device.emulated}): timings are for correctness "
                "checks only, not a board's speed" if mod.emulated else "")
        print(f"running {args.module} (target {mod.meta['target']['name']}) on the {mod.device.arch or 'remote'} "
              f"device at {mod.where}{note}", flush=True)
    else:
        mod = compiler.load(args.module)
    if args.outputs:
        _check_output(args.outputs)
    if args.inputs:
        named = _read_npz(args.inputs, "inputs file")
        if len(named) == 1 and len(mod.inputs) == 1 and mod.inputs[0].name not in named:
            named = {mod.inputs[0].name: next(iter(named.values()))}
        outs = mod.run(check_finite=args.check_finite, **named)
    else:
        print("no --inputs given: using random inputs")
        arrays = mod.random_inputs()
        for spec, a in zip(mod.inputs, arrays):
            print(f"  input  {spec.name}: {list(a.shape)} {a.dtype}")
        outs = mod.run(*arrays, check_finite=args.check_finite)
    outs = outs if isinstance(outs, tuple) else (outs,)
    for spec, o in zip(mod.outputs, outs):
        print(f"  output {spec.name}: {list(o.shape)} {o.dtype}  mean {float(np.mean(o)):.6g} std {float(np.std(o)):.6g}")
    if args.outputs:
        Path(args.outputs).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.outputs, **{spec.name: o for spec, o in zip(mod.outputs, outs)})
        print(f"wrote {args.outputs}")
    if args.benchmark:
        emulated = args.emulate or getattr(mod, "emulated", False)
        note = " under emulation (for correctness only, not a board's speed)" if emulated else ""
        print(f"latency{note}: {mod.benchmark(repeat=args.benchmark)}")
    if args.profile:
        if not hasattr(mod, "profile"):
            from compiler.errors import KilnError

            raise KilnError("--profile times the kernels of modules that run on this machine (and of "
                            "microcontroller libraries under --emulate); profile an ARM module on its board")
        print(mod.profile(**named) if args.inputs else mod.profile(*arrays))
    if hasattr(mod, "close"):  # a remote session: give the device back
        mod.close()
    return 0


def _cmd_info(args) -> int:
    from compiler import info

    if args.model in ("zoo:", "zoo"):
        from compiler import zoo

        print("zoo models: " + ", ".join(zoo.names()))
        return 0
    print(info.model_info(args.model, target=args.target, input_shapes=dict(args.input_shape) or None,
                          constant_inputs=dict(args.constant_input) or None))
    return 0


def _cmd_tune(args) -> int:
    import compiler
    import targets

    targets.get(args.target)  # an unknown target fails before any work
    logging.getLogger("compiler.tuning").setLevel(logging.INFO)  # one progress line per batch (no terminal)
    remote = f", measured on the devices under key {args.rpc_key!r} at {args.rpc_tracker}" if args.rpc_tracker else ""
    print(f"tuning {args.model} for target {args.target}, logs in {args.log_dir}{remote}", flush=True)
    report = compiler.tune(args.model, target=args.target, input_shapes=dict(args.input_shape) or None,
                           trials=args.trials, time_budget=args.time_budget, log_dir=args.log_dir,
                           resume=not args.restart, early_stopping=args.early_stopping,
                           rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key, precision=args.precision,
                           calibration=_calibration(args), constant_inputs=dict(args.constant_input) or None)
    print(report)
    logs = report.log_dir.parent  # args.log_dir, or its emulated/ subfolder for emulated devices
    precision = (f" --precision {args.precision}" + (f" --calibration {args.calibration}" if args.calibration else "")
                 if args.precision != "fp32" else "")
    frozen = "".join(f" --constant-input {name}={value}" for name, value in args.constant_input)
    print(f"then: kiln compile {args.model} --target {args.target}{precision}{frozen} --tuning-logs {logs} "
          "-o MODEL.so")
    return 0


def _cmd_logs(args) -> int:
    import targets
    from compiler.tuning import archive, database

    if args.logs_command == "list":
        found = database.list_logs(args.log_dir)
        if not found:
            print(f"{args.log_dir}: no tuning logs")
        for summary in found:
            print(summary)
    elif args.logs_command == "merge":
        target = targets.get(args.target) if args.target else None
        print(database.merge(args.sources, args.log_dir, target=target, best_only=args.best_only))
    elif args.logs_command == "export":
        out = archive.export_logs(args.log_dir, targets.get(args.target), args.output)
        print(f"wrote {out} ({out.stat().st_size / 1e3:.1f} kB)")
    else:
        print(archive.import_logs(args.archive, args.log_dir))
    return 0


def _cmd_package(args) -> int:
    from compiler.package import package

    out = package(args.module, args.output, target=args.target)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    print(f"wrote bundle {out} ({sum(p.stat().st_size for p in files) / 1e6:.1f} MB): "
          + ", ".join(str(p.relative_to(out)) for p in files))
    print(f"see {out / 'README.md'} for how to run it on the board")
    return 0


def _cmd_targets(_args) -> int:
    import targets


    rows = [("name", "family", "cpu / arch", "cores", "vector", "builds", "features", "aliases")]
    for d in targets.all_descriptions():
        rows.append((d.name, d.family, d.cpu or d.arch, str(d.cores), f"{d.vector_bits}b",
                     "yes" if d.buildable else "not yet", ",".join(d.features) or "-", ",".join(d.aliases) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


_COMMANDS = {"compile": _cmd_compile, "run": _cmd_run, "info": _cmd_info, "tune": _cmd_tune,
             "package": _cmd_package, "targets": _cmd_targets, "logs": _cmd_logs}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (tests call it in-process)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if bool(getattr(args, "rpc_tracker", None)) != bool(getattr(args, "rpc_key", None)):
        parser.error("--rpc-tracker HOST:PORT and --rpc-key KEY go together (the key the devices registered with)")
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), format="%(levelname)s %(name)s: %(message)s")
    from compiler.emulator import stop_on_sigterm
    from compiler.errors import KilnError

    stop_on_sigterm()  # a terminated `kiln` still stops the emulators and servers it started
    try:
        return _COMMANDS[args.command](args)
    except KilnError as err:
        if args.verbose:
            raise
        print(f"kiln {args.command}: error: {err}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
