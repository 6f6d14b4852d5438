"""The emulated aarch64 device: run an ARM module built by Kiln on this x86 machine.

``scripts/setup_arm.sh`` sets the device up once (cached under ``${KILN_CACHE:-~/.cache/kiln}/arm64``):
a Debian arm64 root with Python 3.11 (``root/``) and the aarch64 wheels of TVM, TVM-FFI and NumPy
(``site/``). A module runs under QEMU user mode (``qemu-aarch64-static -L ROOT ROOT/usr/bin/python3.11``)
in a worker process that loads only the TVM *runtime* (``libtvm_runtime.so`` + ``tvm_ffi``, ~2 s to start
under emulation, against ~9 s for ``import tvm``) and is kept alive between calls, so a test or a
script pays the start-up once::

    from compiler import emulator
    y = emulator.run("model_arm.so", x)            # -> outputs, like CompiledModule.run
    mod = emulator.load("model_arm.so")            # CompiledModule-like: .inputs, .run, .benchmark
    ys = emulator.run_many("model_arm.so", [(x1,), (x2,)])

It can also act as a remote device: :func:`serve` (``python -m compiler.emulator serve --tracker HOST:PORT
--key KEY``) runs TVM's stock RPC server on it, so ``kiln run --rpc`` / ``--rpc-tracker`` and
``tune(..., rpc_tracker=)`` reach it exactly as they reach a board (``compiler.remote``). The server tells
clients it is emulated (``kiln.device_info``), and they say so next to every timing.

Timings under emulation measure QEMU, not a board: use the emulated device for correctness only.

Paths can be overridden with ``KILN_ARM_ROOT``, ``KILN_ARM_SITE`` and ``KILN_QEMU_AARCH64``.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import artifact
from .errors import IncompatibleModuleError, KilnError
from .module_base import BenchmarkResult, ModuleBase

TIMING_NOTE = ("timings under emulation (QEMU user mode) are for correctness checks only: they say nothing "
               "about the speed of a real board")
SETUP_HINT = "run scripts/setup_arm.sh (about 1-2 minutes once; cached under ${KILN_CACHE:-~/.cache/kiln})"
#: Seconds one request may take before the worker is killed (start-up included).
DEFAULT_TIMEOUT = 600


class EmulatorError(KilnError):
    """The emulated device is not set up, or a module failed on it."""


def cache_dir() -> Path:
    return Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln")


@dataclass(frozen=True)
class Device:
    """Where the emulated aarch64 device lives."""

    qemu: str
    root: Path
    site: Path

    @property
    def python(self) -> Path:
        return self.root / "usr" / "bin" / "python3.11"

    def command(self, *args: str) -> list[str]:
        """The command line that runs ``python3.11 *args`` on the emulated device."""
        return [self.qemu, "-L", str(self.root), str(self.python), *args]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
        env.update(PYTHONPATH=str(self.site), PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1",
                   PYTHONUNBUFFERED="1")
        return env

    @property
    def runtime_libs(self) -> tuple[Path, Path]:
        """``libtvm_runtime.so`` and ``libtvm_ffi.so`` for aarch64 (what a board needs at run time)."""
        return self.site / "tvm" / "lib" / "libtvm_runtime.so", self.site / "tvm_ffi" / "lib" / "libtvm_ffi.so"


def find() -> Device:
    """The emulated aarch64 device, or an :class:`EmulatorError` saying how to set it up."""
    arm = cache_dir() / "arm64"
    root = Path(os.environ.get("KILN_ARM_ROOT") or arm / "root")
    site = Path(os.environ.get("KILN_ARM_SITE") or arm / "site")
    qemu = os.environ.get("KILN_QEMU_AARCH64") or shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    missing = []
    if not qemu:
        missing.append("qemu-aarch64-static (Debian package qemu-user-static)")
    if not (root / "usr" / "bin" / "python3.11").exists():
        missing.append(f"the aarch64 Python root {root}")
    dev = Device(qemu or "qemu-aarch64-static", root, site)
    if not all(p.exists() for p in dev.runtime_libs):
        missing.append(f"the aarch64 TVM runtime in {site}")
    if missing:
        raise EmulatorError(f"the emulated aarch64 device is not set up (missing: {'; '.join(missing)}): {SETUP_HINT}")
    return dev


def unavailable_reason() -> str | None:
    """None when the emulated device is ready, else why not (for ``pytest.skip``)."""
    try:
        find()
    except EmulatorError as err:
        return str(err)
    return None


# ------------------------------------------------------------------------------ the device-side worker
_WORKER = r'''
import ctypes, hashlib, json, os, shutil, sys, time, traceback
t0 = time.perf_counter()
import numpy as np
site = os.environ["PYTHONPATH"].split(os.pathsep)[0]
import tvm_ffi  # loads libtvm_ffi.so, which libtvm_runtime.so needs
ctypes.CDLL(os.path.join(site, "tvm", "lib", "libtvm_runtime.so"), ctypes.RTLD_GLOBAL)

out = os.fdopen(os.dup(1), "w", buffering=1)   # replies; the runtime's own prints go to stderr
os.dup2(2, 1)
work = sys.argv[1]
cache = {}

def reply(obj):
    out.write("KILN-EMU:" + json.dumps(obj) + "\n")
    out.flush()

def aligned(a):
    a = np.require(a, requirements="C")  # keeps rank 0
    buf = np.empty(a.nbytes + 64, dtype=np.uint8)
    off = (-buf.ctypes.data) % 64
    b = buf[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
    b[...] = a
    return b

def flatten(v, acc):
    if hasattr(v, "__dlpack__"):
        acc.append(np.array(np.from_dlpack(v), copy=True))
    else:
        for item in v:
            flatten(item, acc)
    return acc

def vm_main(path):
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:20]
    if digest not in cache:
        # dlopen caches by path: a private copy per content, so a re-exported module is not stale
        private = os.path.join(work, digest + ".so")
        shutil.copyfile(path, private)
        lib = tvm_ffi.load_module(private)
        vm = lib["vm_load_executable"]()
        vm["vm_initialization"](1, 0, 2)  # kDLCPU, device 0, pooled allocator
        cache[digest] = (lib, vm, vm["main"])
    return cache[digest][2]

reply({"ready": True, "startup_s": time.perf_counter() - t0})
for line in sys.stdin:
    job = json.loads(line)
    try:
        main = vm_main(job["module"])
        with np.load(job["inputs"]) as data:
            args = [tvm_ffi.from_dlpack(aligned(data[f"arg{i}"])) for i in range(len(data.files))]
        t = time.perf_counter()
        result = main(*args)
        first_ms = (time.perf_counter() - t) * 1e3
        outs = flatten(result, [])
        np.savez(job["outputs"], *outs)
        for _ in range(job.get("warmup", 0)):
            main(*args)
        times = []
        for _ in range(job.get("repeat", 0)):
            t = time.perf_counter()
            main(*args)
            times.append((time.perf_counter() - t) * 1e3)
        reply({"ok": True, "outputs": len(outs), "first_ms": first_ms, "times_ms": times})
    except BaseException:
        reply({"ok": False, "error": traceback.format_exc()})
'''


class Session:
    """One emulated Python process on the device, kept alive across requests (start-up ~2 s)."""

    def __init__(self, device: Device | None = None, timeout: float = DEFAULT_TIMEOUT):
        self.device = device or find()
        self.timeout = timeout
        self._work = tempfile.TemporaryDirectory(prefix="kiln-emu-")
        script = Path(self._work.name) / "kiln_emu_worker.py"
        script.write_text(_WORKER)
        self._stderr = open(Path(self._work.name) / "stderr.txt", "w+")
        self._proc = subprocess.Popen(
            self.device.command(str(script), self._work.name), env=self.device.env(), cwd=self._work.name,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
        )
        self._lock = threading.Lock()
        self.startup_s = self._read()["startup_s"]
        self._count = 0

    def _stderr_tail(self) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read()[-2000:]

    def _read(self) -> dict:
        while True:
            ready, _, _ = select.select([self._proc.stdout], [], [], self.timeout)
            if not ready:
                self.close()
                raise EmulatorError(f"the emulated device did not answer within {self.timeout:.0f} s")
            line = self._proc.stdout.readline()
            if not line:
                code = self._proc.wait()
                raise EmulatorError(f"the emulated device exited (status {code}):\n{self._stderr_tail()}")
            if line.startswith("KILN-EMU:"):
                return json.loads(line[len("KILN-EMU:"):])

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def run(self, path: str | os.PathLike, arrays: Sequence[np.ndarray], *, warmup: int = 0,
            repeat: int = 0) -> tuple[list[np.ndarray], dict]:
        """Run ``main`` of the module at ``path`` on ``arrays`` (already in input order). Returns the
        flat list of outputs and the timing record (``first_ms``, ``times_ms``)."""
        with self._lock:
            if not self.alive:
                raise EmulatorError(f"the emulated device has exited:\n{self._stderr_tail()}")
            self._count += 1
            inp = Path(self._work.name) / f"in{self._count}.npz"
            out = Path(self._work.name) / f"out{self._count}.npz"
            np.savez(inp, **{f"arg{i}": np.asarray(a) for i, a in enumerate(arrays)})
            job = {"module": str(Path(path).resolve()), "inputs": str(inp), "outputs": str(out),
                   "warmup": warmup, "repeat": repeat}
            self._proc.stdin.write(json.dumps(job) + "\n")
            self._proc.stdin.flush()
            answer = self._read()
            inp.unlink(missing_ok=True)
            if not answer["ok"]:
                raise EmulatorError(f"running {path} on the emulated aarch64 device failed:\n{answer['error']}")
            with np.load(out) as data:
                outs = [data[f"arr_{i}"] for i in range(answer["outputs"])]
            out.unlink(missing_ok=True)
            return outs, answer

    def close(self) -> None:
        if getattr(self, "_proc", None) is not None and self._proc.poll() is None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        if getattr(self, "_stderr", None) is not None:
            self._stderr.close()
        if getattr(self, "_work", None) is not None:
            self._work.cleanup()
            self._work = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_session: Session | None = None
_session_lock = threading.Lock()


def session() -> Session:
    """The process-wide emulator session (started on first use, closed at exit)."""
    global _session
    with _session_lock:
        if _session is None or not _session.alive:
            _session = Session()
            atexit.register(_session.close)
        return _session


# ------------------------------------------------------------------------------ CompiledModule-like use
class EmulatedModule(ModuleBase):
    """An aarch64 module file run on the emulated device, used like a :class:`CompiledModule`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        super().__init__(artifact.read_metadata(self.path))
        machine = artifact.elf_machine(self.path)
        if machine != "aarch64":
            hint = ("a 32-bit ARM module needs a TVM runtime built for armv7 and qemu-arm; the emulated "
                    "device runs aarch64 modules only" if machine == "arm" else
                    "load it with compiler.load (no emulation needed)" if machine == "x86_64" else "")
            raise IncompatibleModuleError(
                f"{self.path} was built for {machine} (target {self.meta['target']['name']!r}), not aarch64: {hint}")

    @staticmethod
    def _shape_outputs(outs: list[np.ndarray]):
        return outs[0] if len(outs) == 1 else tuple(outs)

    def run(self, *arrays, check_finite: bool = False, **named):
        """Run on the emulated device. Returns one array, or a tuple for several outputs
        (``check_finite`` as for :meth:`compiler.CompiledModule.run`)."""
        # bad inputs fail before the emulator starts
        return self._checked(arrays, named, check_finite,
                             lambda args: self._shape_outputs(session().run(self.path, args)[0]))

    __call__ = run

    def run_many(self, batches: Sequence[Sequence]) -> list:
        """Run once per input tuple in ``batches`` (one emulator process for all of them)."""
        return [self.run(*b) for b in batches]

    def benchmark(self, *arrays, repeat: int = 10, warmup: int = 2, **named):
        """Time runs on the emulated device. Timings are for correctness checks only (see TIMING_NOTE)."""
        if not arrays and not named:
            arrays = tuple(self.random_inputs())
        args = self._arrange(arrays, named)
        _, rec = session().run(self.path, args, warmup=warmup, repeat=max(repeat, 1))
        return BenchmarkResult.from_times(rec["times_ms"])

    def __repr__(self) -> str:
        return f"<EmulatedModule {self.path} target={self.meta['target']['name']} (emulated aarch64)>"


def load(path: str | os.PathLike) -> EmulatedModule:
    """An aarch64 module at ``path``, to run on the emulated device (checks the device is set up)."""
    mod = EmulatedModule(path)
    find()
    return mod


def _as_path(module, workdir: str) -> Path:
    if isinstance(module, (str, os.PathLike)):
        return Path(module)
    if hasattr(module, "export"):  # a CompiledModule built for an aarch64 target
        digest = hashlib.sha256(json.dumps(module.meta, sort_keys=True).encode()).hexdigest()[:12]
        return module.export(Path(workdir) / f"module-{digest}.so")
    raise TypeError(f"expected a module path or a CompiledModule, got {type(module).__name__}")


def run(module, *arrays, **named):
    """Run ``module`` (an aarch64 ``.so`` path, or a ``CompiledModule`` compiled for an aarch64 target)
    on the emulated device; returns the outputs as ``CompiledModule.run`` does."""
    with tempfile.TemporaryDirectory(prefix="kiln-emu-export-") as work:
        return load(_as_path(module, work)).run(*arrays, **named)


def run_many(module, batches: Sequence[Sequence]) -> list:
    """``run`` for each input tuple in ``batches``, in one emulator process."""
    with tempfile.TemporaryDirectory(prefix="kiln-emu-export-") as work:
        return load(_as_path(module, work)).run_many(batches)


# ------------------------------------------------------------------------------ an RPC server on the device
#: What Kiln's emulated RPC server reports as its emulation (``compiler.remote.DeviceInfo.emulated``).
EMULATION = "qemu-aarch64 user mode"

# Device side: TVM's stock RPC server (``tvm.rpc.Server``, what ``python -m tvm.exec.rpc_server`` runs),
# plus one function, ``kiln.device_info``, through which a client learns that the device is emulated (a
# process under QEMU user mode cannot tell). Sessions fork from the server process, so they have it too.
_RPC_SERVER = r'''
import json, sys
from tvm import rpc  # ~10 s under emulation

def _init():
    import json, os, platform
    import tvm_ffi
    info = json.dumps({"arch": platform.machine(), "emulated": os.environ.get("KILN_EMULATED", "")})

    def device_info():
        return info

    tvm_ffi.register_global_func("kiln.device_info", device_info, override=True)

host, port, port_end, tracker, key = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
tracker_addr = None
if tracker:
    tracker_host, _, tracker_port = tracker.rpartition(":")
    tracker_addr = (tracker_host, int(tracker_port))
server = rpc.Server(host, port, port_end, tracker_addr=tracker_addr, key=key, server_init_callback=_init)
print("KILN-RPC:" + json.dumps({"port": server.port}), flush=True)
server.proc.join()
'''

# TVM's server starts its worker with ``sys.executable -m tvm.exec.popen_worker``; without binfmt_misc the
# host cannot execute the aarch64 python3.11 directly. So ``sys.executable`` (set by this sitecustomize,
# found first on the server's PYTHONPATH) points at a host script that runs it under QEMU.
_SITECUSTOMIZE = '''import os, sys
if os.environ.get("KILN_EMU_PYTHON"):
    sys.executable = os.environ["KILN_EMU_PYTHON"]
'''


class RPCServer:
    """A TVM RPC server running on the emulated aarch64 device (see :func:`serve`). ``port`` is where it
    listens, ``log_path`` its log (one ``load_module`` line per module a client loaded); ``stop()`` ends
    it and every process it started (also at exit, and on leaving a ``with`` block)."""

    def __init__(self, proc: subprocess.Popen, port: int, work: tempfile.TemporaryDirectory, log_path: Path,
                 host: str, tracker: str | None, key: str):
        self.proc, self.port, self._work, self.log_path = proc, port, work, log_path
        self.host, self.tracker, self.key = host, tracker, key

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # its own process group: qemu, python, workers
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        if self._work is not None:
            self._work.cleanup()
            self._work = None

    def __enter__(self) -> "RPCServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        reg = f", key {self.key!r} at tracker {self.tracker}" if self.tracker else ""
        return f"<emulated aarch64 RPC server {self.address}{reg}>"


def serve(*, tracker: str | None = None, key: str = "", host: str = "127.0.0.1", port: int = 9090,
          port_end: int | None = None, device: Device | None = None, timeout: float = 180) -> RPCServer:
    """Start TVM's RPC server on the emulated aarch64 device and return once it listens (about 20 s:
    ``import tvm`` twice under emulation). With ``tracker`` (``host:port``) it registers there under
    ``key``; without, clients connect to it directly (``kiln run m.so --rpc HOST:PORT``). It binds the
    first free port in ``[port, port_end)`` (default ``port + 100``). Timings measured on it are for
    correctness only."""
    import shlex
    import signal

    device = device or find()
    port_end = port_end if port_end is not None and port_end > port else port + 100
    if tracker and not key:
        raise EmulatorError("an RPC server registering with a tracker needs a key (--key KEY)")
    work = tempfile.TemporaryDirectory(prefix="kiln-emu-rpc-")
    wdir = Path(work.name)
    (wdir / "kiln_rpc_server.py").write_text(_RPC_SERVER)
    (wdir / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    wrapper = wdir / "python3"
    wrapper.write_text("#!/bin/sh\nexec " + " ".join(shlex.quote(a) for a in device.command()) + ' "$@"\n')
    wrapper.chmod(0o755)
    env = device.env()
    env.update(PYTHONPATH=f"{wdir}{os.pathsep}{device.site}", KILN_EMU_PYTHON=str(wrapper), KILN_EMULATED=EMULATION)
    log_path = wdir / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            device.command(str(wdir / "kiln_rpc_server.py"), host, str(port), str(port_end), tracker or "", key),
            env=env, cwd=work.name, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True,
            start_new_session=True,
        )
    server = RPCServer(proc, port, work, log_path, host, tracker, key)
    atexit.register(server.stop)
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("KILN-RPC:"):
        tail = server.log()[-2000:]
        exited = proc.poll() is not None
        if not exited:
            os.killpg(proc.pid, signal.SIGKILL)
        server.stop()
        why = "exited" if exited else f"did not start within {timeout:g} s"
        raise EmulatorError(f"the RPC server on the emulated device {why}:\n{tail}")
    server.port = json.loads(line[len("KILN-RPC:"):])["port"]
    # keep draining stdout into the log so the server never blocks on a full pipe
    threading.Thread(target=_drain, args=(proc.stdout, log_path), daemon=True).start()
    return server


def _drain(stream, path: Path) -> None:
    try:
        with open(path, "a") as log:
            for line in stream:
                log.write(line)
                log.flush()
    except (OSError, ValueError):
        pass


def stop_on_sigterm() -> None:
    """Make SIGTERM and SIGHUP end this process the way Ctrl-C does (``finally`` blocks and ``atexit``
    handlers run), so the QEMU processes and temporary folders it started are cleaned up. For command-
    line entry points only: it changes the process's signal handlers."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers (an in-process caller from a worker thread)

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit)


def main(argv: list[str] | None = None) -> int:
    """``python -m compiler.emulator serve [--tracker HOST:PORT --key KEY] [--host H] [--port P]``."""
    import argparse
    import time

    p = argparse.ArgumentParser(prog="python -m compiler.emulator",
                                description="The emulated aarch64 device (set up by scripts/setup_arm.sh).")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run TVM's RPC server on the emulated device until interrupted")
    s.add_argument("--tracker", help="register with this RPC tracker (HOST:PORT)")
    s.add_argument("--key", default="", help="device key to register under (needed with --tracker)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=9090, help="first port to try (default 9090)")
    s.add_argument("--port-end", type=int, help="end of the port range to try (default: --port + 100)")
    args = p.parse_args(argv)
    stop_on_sigterm()
    try:
        server = serve(tracker=args.tracker, key=args.key, host=args.host, port=args.port, port_end=args.port_end)
    except KilnError as err:
        print(f"error: {err}")
        return 1
    where = f", registered under key {args.key!r} at {args.tracker}" if args.tracker else ""
    print(f"emulated aarch64 RPC server listening on {server.address}{where}; {TIMING_NOTE}. Ctrl-C stops it.",
          flush=True)
    try:
        while server.alive:
            time.sleep(1)
        print(f"the server exited:\n{server.log()[-2000:]}")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
