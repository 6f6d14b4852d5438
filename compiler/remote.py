"""Remote devices through TVM RPC: run and time a Kiln module on a board, or measure tuning candidates there.

A device is reached either directly (a ``python -m tvm.exec.rpc_server --host ADDRESS --port 9090``
running on it: ``rpc="board:9090"``) or through a tracker that hands out free devices registered under a
key (``python -m tvm.exec.rpc_tracker --port 9190`` somewhere, ``python -m tvm.exec.rpc_server --tracker
tracker:9190 --key rpi4`` on each board: ``tracker="tracker:9190", key="rpi4"``). Everything goes through
TVM's own ``tvm.rpc`` (the server side is TVM's stock RPC server; ``compiler.emulator.serve`` starts one on
the emulated aarch64 device)::

    from compiler import remote
    with remote.load("model_arm.so", tracker="127.0.0.1:9190", key="rpi4") as mod:
        y = mod.run(x)                       # uploaded, loaded in the device's Relax VM, run there
        print(mod.benchmark(repeat=20))      # the VM's time_evaluator, timed on the device

Tuning through a tracker (``compiler.tune(..., rpc_tracker=, rpc_key=)``) reaches the devices with the
functions here; its builder and runner are ``compiler.tuning.rpc``'s.

Failures Kiln can name (a tracker or server that does not answer, a key with no device or no free one,
a module for another architecture than the device) are :class:`RemoteError` with the address and the fix.
The RPC server runs whatever it is sent: use it on trusted networks only (TVM's own warning).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import artifact
from .errors import IncompatibleModuleError, RemoteError
from .module_base import BenchmarkResult, ModuleBase

#: Seconds to wait for a TCP connection to a tracker or server before calling it unreachable.
CONNECT_TIMEOUT_S = 5.0
#: Seconds to wait for a busy device under a tracker key to become free.
WAIT_FOR_DEVICE_S = 60.0
#: Seconds a remote session may live (the server kills it after that; 0 = no limit).
SESSION_TIMEOUT_S = 600
#: Name of the function Kiln's emulated RPC server registers (``compiler.emulator.serve``): it returns
#: ``{"arch": ..., "emulated": "..."}`` as JSON, so a client can tell emulated timings from real ones.
DEVICE_INFO_FUNC = "kiln.device_info"

START_SERVER_HINT = ("start one with `python -m tvm.exec.rpc_server --tracker {tracker} --key {key}` on the "
                     "device (or `python -m compiler.emulator serve --tracker {tracker} --key {key}` for the "
                     "emulated aarch64 device)")


# ------------------------------------------------------------------------------ addresses
def parse_address(text: str, what: str = "RPC address") -> tuple[str, int]:
    """``"host:port"`` -> ``("host", port)``; a :class:`RemoteError` naming the expected form otherwise."""
    host, sep, port = str(text).strip().rpartition(":")
    try:
        if not sep or not host or not 0 < int(port) < 65536:
            raise ValueError
    except ValueError:
        raise RemoteError(f"cannot read the {what} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9190") from None
    return host.strip("[]"), int(port)


def _probe(host: str, port: int, what: str, fix: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast when nothing accepts TCP connections at ``host:port`` (``tvm.rpc`` itself retries a
    refused tracker connection for 60 s, and a silent host would hang on the OS's connect timeout)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        reason = "timed out" if isinstance(err, socket.timeout) else (err.strerror or str(err))
        raise RemoteError(f"cannot reach the {what} at {host}:{port} ({reason} within {timeout:g} s): {fix}") from None


def _arch(name: str | None) -> str | None:
    """Normalise an architecture name (``platform.machine()``, an LLVM triple's first part, an ELF machine)."""
    if not name:
        return None
    name = name.split("-")[0].lower()
    if name in ("arm64", "aarch64"):
        return "aarch64"
    if name in ("amd64", "x86_64", "x86-64"):
        return "x86_64"
    return "arm" if name.startswith(("arm", "thumb")) else name


def target_arch(desc) -> str:
    """The architecture a CPU target description builds for (``x86_64``, ``aarch64``, ``arm``)."""
    return _arch(desc.triple) or _arch(platform.machine())


# ------------------------------------------------------------------------------ trackers
@dataclass(frozen=True)
class TrackerStatus:
    """What a tracker says about one key: ``servers`` registered under it, ``free`` of them now,
    ``pending`` requests queued; ``keys`` every key the tracker knows (for error messages)."""

    address: str
    key: str
    servers: int
    free: int
    pending: int
    keys: tuple[str, ...]


def _connect_tracker(address: str):
    from tvm import rpc

    host, port = parse_address(address, "RPC tracker address")
    _probe(host, port, "RPC tracker",
           f"start it with `python -m tvm.exec.rpc_tracker --host {host} --port {port}` on {host}, or pass "
           "the right --rpc-tracker HOST:PORT")
    try:
        return rpc.connect_tracker(host, port)
    except Exception as err:  # something answers, but not a tracker
        raise RemoteError(f"{host}:{port} does not answer as a TVM RPC tracker ({_first_line(err)}): pass "
                          "the tracker's address to --rpc-tracker (a server's address goes to --rpc)") from None


def tracker_status(address: str, key: str) -> TrackerStatus:
    """The tracker's view of ``key`` (a :class:`RemoteError` when the tracker cannot be reached)."""
    tracker = _connect_tracker(address)
    try:
        summary = tracker.summary()
    finally:
        tracker.close()
    servers = [s for s in summary.get("server_info", []) if s.get("key", "").partition(":")[2] == key]
    queue = summary.get("queue_info", {}).get(key, {})
    keys = sorted({s.get("key", "").partition(":")[2] for s in summary.get("server_info", [])}
                  | set(summary.get("queue_info", {})))
    return TrackerStatus(address, key, len(servers), int(queue.get("free", 0)), int(queue.get("pending", 0)),
                         tuple(k for k in keys if k))


def check_key(address: str, key: str) -> TrackerStatus:
    """The tracker's status for ``key``; a :class:`RemoteError` when no server is registered under it."""
    if not key:
        raise RemoteError(f"an RPC tracker ({address}) needs a device key (--rpc-key KEY): the key the "
                          "device's rpc_server registered with")
    status = tracker_status(address, key)
    if status.servers == 0:
        known = f"keys registered there: {', '.join(status.keys)}" if status.keys else "no server is registered there"
        raise RemoteError(f"the RPC tracker at {address} has no device under key {key!r} ({known}): "
                          + START_SERVER_HINT.format(tracker=address, key=key))
    return status


def request_session(address: str, key: str, *, wait: float = WAIT_FOR_DEVICE_S,
                    session_timeout: float = SESSION_TIMEOUT_S):
    """A ``tvm.rpc.RPCSession`` on a free device under ``key`` at the tracker ``address``, waiting at
    most ``wait`` seconds for one to be free (TVM's tracker would queue the request forever)."""
    status = check_key(address, key)
    tracker = _connect_tracker(address)
    box: dict = {}

    def ask():
        try:
            box["session"] = tracker.request(key, priority=1, session_timeout=session_timeout, max_retry=1)
        except Exception as err:  # noqa: BLE001 - reported below
            box["error"] = err

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(wait)
    if thread.is_alive():
        tracker.close()  # unblocks the request
        thread.join(5)
        raise RemoteError(f"no free device under key {key!r} at the RPC tracker {address} within {wait:g} s "
                          f"({status.servers} registered, all busy): wait for the running jobs, or start more "
                          "servers under that key")
    tracker.close()
    if "error" in box:
        raise RemoteError(f"the RPC tracker at {address} gave a device under key {key!r}, but connecting to it "
                          f"failed ({_first_line(box['error'])}): check that the server's address as the tracker "
                          "sees it is reachable from here (rpc_server --custom-addr)") from None
    return box["session"]


def connect_server(address: str, *, session_timeout: float = SESSION_TIMEOUT_S):
    """A ``tvm.rpc.RPCSession`` on the RPC server at ``address`` (a server started without a tracker)."""
    from tvm import rpc

    host, port = parse_address(address, "RPC server address")
    _probe(host, port, "RPC server",
           f"start it on the device with `python -m tvm.exec.rpc_server --host {host} --port {port}`, or pass "
           "the right --rpc HOST:PORT")
    try:
        return rpc.connect(host, port, session_timeout=session_timeout)
    except Exception as err:
        text = str(err)
        if "matches key" in text:
            raise RemoteError(f"the RPC server at {address} is registered with a tracker (it only accepts "
                              "sessions the tracker hands out): use --rpc-tracker TRACKER:PORT --rpc-key KEY "
                              "instead of --rpc") from None
        raise RemoteError(f"{address} does not answer as a TVM RPC server ({_first_line(err)}): pass a server "
                          "started with `python -m tvm.exec.rpc_server` to --rpc (a tracker's address goes "
                          "to --rpc-tracker)") from None


def _first_line(err: BaseException) -> str:
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(err).__name__


# ------------------------------------------------------------------------------ the device
@dataclass(frozen=True)
class DeviceInfo:
    """What Kiln knows of a remote device: ``arch`` (None if it cannot tell) and ``emulated`` (a
    description such as ``"qemu-aarch64 user mode"`` when the server says it runs under emulation;
    a real board's stock server says nothing, so its timings are taken as real)."""

    arch: str | None
    emulated: str | None = None


def device_info(session) -> DeviceInfo:
    """Ask the device its architecture: Kiln's emulated server answers :data:`DEVICE_INFO_FUNC`; a stock
    TVM server with the compiler inside answers ``target.llvm_get_system_triple``; a runtime-only one
    neither (``arch`` None)."""
    try:
        data = json.loads(session.get_function(DEVICE_INFO_FUNC)())
        return DeviceInfo(_arch(data.get("arch")), data.get("emulated") or None)
    except Exception:  # noqa: BLE001 - not Kiln's server
        pass
    try:
        return DeviceInfo(_arch(str(session.get_function("target.llvm_get_system_triple")())))
    except Exception:  # noqa: BLE001 - a runtime-only server
        return DeviceInfo(None)


def check_arch(module_arch: str, info: DeviceInfo, where: str, what: str) -> None:
    """A :class:`RemoteError` when the device's architecture is known and differs from ``module_arch``."""
    if info.arch and _arch(module_arch) != info.arch:
        targets = {"aarch64": "arm (or rpi4, rpi5, jetson-orin-cpu, graviton3)", "x86_64": "x86",
                   "arm": "armv7"}.get(info.arch, f"one for {info.arch}")
        raise RemoteError(f"{what} is for {module_arch} but the device at {where} is {info.arch}: recompile "
                          f"with --target {targets}, or use a device of the right architecture")


# ------------------------------------------------------------------------------ running a module
class RemoteModule(ModuleBase):
    """A Kiln ``.so`` uploaded to a remote device and loaded in its Relax VM; used like a
    :class:`CompiledModule` (``inputs``, ``outputs``, ``run``, ``benchmark``, ``random_inputs``).
    ``device`` is the :class:`DeviceInfo`; ``emulated`` is True when its timings are for correctness only.
    Close it (or use it as a context manager) to end the session."""

    def __init__(self, path: str | os.PathLike, session, where: str):
        from tvm import relax

        self.path = Path(path)
        self.where = where
        super().__init__(artifact.read_metadata(self.path))
        if self.meta["target"].get("kind") != "llvm":
            raise IncompatibleModuleError(f"{self.path} targets {self.meta['target']['name']!r}: Kiln runs CPU "
                                          "(LLVM) modules over RPC")
        self._session = session
        self.device = device_info(session)
        check_arch(artifact.elf_machine(self.path), self.device, where, str(self.path))
        remote_name = f"kiln-{os.getpid()}-{id(self):x}.so"
        session.upload(str(self.path), remote_name)
        try:
            lib = session.load_module(remote_name)
        except Exception as err:
            raise RemoteError(f"the device at {where} cannot load {self.path} (built for "
                              f"{artifact.elf_machine(self.path)}, target {self.meta['target']['name']!r}): "
                              f"{_first_line(err)}") from None
        self._dev = session.cpu(0)
        self._vm = relax.VirtualMachine(lib, self._dev)

    @property
    def emulated(self) -> bool:
        return bool(self.device.emulated)

    def _set_values(self, values: Sequence) -> None:
        import tvm

        self._vm.set_input("main", *[tvm.runtime.tensor(v, self._dev) for v in values])

    def run(self, *arrays, check_finite: bool = False, **named):
        """Run ``main`` on the device. Returns one array, or a tuple for several outputs
        (``check_finite`` as for :meth:`compiler.CompiledModule.run`)."""
        def call(values):
            self._set_values(values)
            self._vm.invoke_stateful("main")
            outs = _flatten(self._vm.get_outputs("main"), [])
            return outs[0] if len(outs) == 1 else tuple(outs)

        return self._checked(arrays, named, check_finite, call)

    __call__ = run

    def benchmark(self, *arrays, repeat: int = 20, warmup: int = 1, **named):
        """Time ``main`` on the device with the VM's ``time_evaluator`` (one call per timed run, after
        ``warmup`` calls; the clock is the device's, so the network is not timed). Under emulation the
        figures are for correctness only."""
        if not arrays and not named:
            arrays = tuple(self.random_inputs())
        values = self._arrange(arrays, named)
        with self._lock:
            self._set_values(values)
            for _ in range(warmup):
                self._vm.invoke_stateful("main")
            timer = self._vm.time_evaluator("invoke_stateful", self._dev, number=1, repeat=max(repeat, 1))
            results = timer("main").results
        return BenchmarkResult.from_times([float(t) * 1e3 for t in results])

    def close(self) -> None:
        """End the session (the server then serves the next client; a tracker hands the device out again)."""
        import gc

        self._vm = self._dev = self._session = None  # remote devices hold the session too
        gc.collect()  # the VM's remote handles sit in reference cycles; the session ends with the last

    def __enter__(self) -> "RemoteModule":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RemoteModule {self.path} on {self.where} ({self.device.arch or '?'})>"


def _flatten(value, acc: list) -> list:
    if hasattr(value, "numpy"):
        acc.append(value.numpy())
    else:
        for item in value:
            _flatten(item, acc)
    return acc


def load(path: str | os.PathLike, *, rpc: str | None = None, tracker: str | None = None, key: str | None = None,
         wait: float = WAIT_FOR_DEVICE_S) -> RemoteModule:
    """Upload the Kiln module at ``path`` to a device and load it there: the RPC server at ``rpc``
    (``host:port``), or a free device under ``key`` at the tracker ``tracker`` (``host:port``)."""
    artifact.read_metadata(path)  # a missing or foreign file fails before any connection
    if (rpc is None) == (tracker is None):
        raise RemoteError("give either an RPC server (rpc='host:port') or a tracker and a key "
                          "(tracker='host:port', key='KEY')")
    if rpc is not None:
        session, where = connect_server(rpc), f"RPC server {rpc}"
    else:
        session, where = request_session(tracker, key or "", wait=wait), f"key {key!r} of RPC tracker {tracker}"
    return RemoteModule(path, session, where)


def wait_for_key(tracker: str, key: str, servers: int = 1, timeout: float = 60.0) -> TrackerStatus:
    """Wait until ``servers`` devices are registered under ``key`` (servers take a few seconds to
    register; emulated ones longer). A :class:`RemoteError` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = tracker_status(tracker, key)
        except RemoteError:  # the tracker itself may still be starting
            if time.monotonic() > deadline:
                raise
            status = None
        if status is not None and status.servers >= servers:
            return status
        if time.monotonic() > deadline:
            raise RemoteError(f"only {status.servers} of {servers} RPC server(s) registered under key {key!r} at "
                              f"{tracker} after {timeout:g} s")
        time.sleep(0.5)
