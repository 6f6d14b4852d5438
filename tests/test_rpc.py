"""Remote devices through TVM RPC (``compiler.remote``, ``kiln run --rpc``, ``tune(..., rpc_tracker=)``).

Everything runs on loopback: a ``python -m tvm.exec.rpc_tracker`` and ``python -m tvm.exec.rpc_server``
processes started on free ports by the fixtures (each in its own process group, killed in teardown).
The ``emulator`` tests add an RPC server on the emulated aarch64 device (``compiler.emulator.serve``); they
skip when ``scripts/setup_arm.sh`` has not set the device up.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, assert_close, run_torch, zoo_model

import compiler
from compiler import cli, emulator, remote
from compiler.errors import KilnError, TargetError, TuningError

X86_KEY = "kiln-test-x86"
EMU_KEY = "kiln-test-emu"
HOST = "127.0.0.1"

_NO_DEVICE = emulator.unavailable_reason()
needs_emulator = pytest.mark.skipif(_NO_DEVICE is not None, reason=f"{_NO_DEVICE}")
needs_aarch64_cc = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                                      reason="aarch64-linux-gnu-g++ not installed: run scripts/setup_arm.sh")


# ---------------------------------------------------------------- processes on loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


class _Proc:
    """A process started in its own process group, logging to a file; ``stop`` kills the group."""

    def __init__(self, args: list[str], log: Path):
        self.log_path = log
        self._log = open(log, "w")
        env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, *args], stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=str(REPO), start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        # the server's worker may outlive its parent in the group
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()


def _wait_port(proc: _Proc, port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not _accepts(port):
        assert proc.proc.poll() is None, f"process exited:\n{proc.log()[-2000:]}"
        assert time.monotonic() < deadline, f"nothing listens on {port} after {timeout} s:\n{proc.log()[-2000:]}"
        time.sleep(0.3)


def _server(tmp: Path, name: str, tracker: str | None = None, key: str = "") -> tuple[_Proc, int]:
    port = _free_port()
    args = ["-m", "tvm.exec.rpc_server", "--host", HOST, "--port", str(port), "--port-end", str(port + 1)]
    if tracker:
        args += ["--tracker", tracker, "--key", key]
    proc = _Proc(args, tmp / f"{name}.log")
    _wait_port(proc, port)
    return proc, port


@pytest.fixture(scope="module")
def rpc_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rpc")


@pytest.fixture(scope="module")
def tracker(rpc_dir):
    """A TVM RPC tracker on a free loopback port: its ``host:port``."""
    port = _free_port()
    proc = _Proc(["-m", "tvm.exec.rpc_tracker", "--host", HOST, "--port", str(port), "--port-end", str(port + 1)],
                 rpc_dir / "tracker.log")
    try:
        _wait_port(proc, port)
        yield f"{HOST}:{port}"
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def x86_servers(rpc_dir, tracker):
    """Two RPC servers registered under :data:`X86_KEY` at the tracker (the measurement devices)."""
    procs = []
    try:
        for i in range(2):
            procs.append(_server(rpc_dir, f"server{i}", tracker, X86_KEY)[0])
        remote.wait_for_key(tracker, X86_KEY, servers=2, timeout=60)
        yield procs
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="module")
def direct_server(rpc_dir):
    """An RPC server without a tracker (``kiln run --rpc HOST:PORT``): its address."""
    proc, port = _server(rpc_dir, "direct")
    try:
        yield f"{HOST}:{port}"
    finally:
        proc.stop()


def _loads(log: str) -> int:
    """Modules a server loaded (TVM's server logs one ``load_module`` line per module a client loads)."""
    return len(re.findall(r"load_module ", log))


def _cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- running a module remotely


def test_run_rpc_direct_matches_local(capsys, tmp_path, tiny_cnn_so, direct_server):
    local = compiler.load(tiny_cnn_so)
    x = local.random_inputs(seed=3)[0]
    np.savez(tmp_path / "in.npz", x=x)
    code, out, err = _cli(capsys, "run", tiny_cnn_so, "--rpc", direct_server, "--inputs", tmp_path / "in.npz",
                          "--outputs", tmp_path / "out.npz", "--benchmark", "3")
    assert code == 0, err
    assert f"at RPC server {direct_server}" in out and "x86_64" in out
    assert "latency: median" in out and "emulation" not in out  # a real (loopback) device: no emulation note
    with np.load(tmp_path / "out.npz") as data:
        got = data[data.files[0]]
    np.testing.assert_allclose(got, local.run(x), rtol=1e-6, atol=1e-6)


def test_remote_module_through_tracker(tiny_cnn_so, tracker, x86_servers):
    local = compiler.load(tiny_cnn_so)
    x = local.random_inputs(seed=5)[0]
    with remote.load(tiny_cnn_so, tracker=tracker, key=X86_KEY) as mod:
        assert mod.device.arch == "x86_64" and not mod.emulated
        np.testing.assert_allclose(mod.run(x), local.run(x), rtol=1e-6, atol=1e-6)
        bench = mod.benchmark(x, repeat=5)
        assert bench.repeat == 5 and 0 < bench.min_ms <= bench.median_ms
    # the session ended with the block: both devices are free again
    deadline = time.monotonic() + 20
    while remote.tracker_status(tracker, X86_KEY).free < 2:
        assert time.monotonic() < deadline, "the device was not given back to the tracker"
        time.sleep(0.3)


def test_busy_key_is_a_clear_error(tiny_cnn_so, tracker, x86_servers):
    held = [remote.load(tiny_cnn_so, tracker=tracker, key=X86_KEY) for _ in range(2)]
    try:
        t0 = time.monotonic()
        with pytest.raises(remote.RemoteError, match=rf"no free device under key '{X86_KEY}'.*2 registered, all busy"):
            remote.load(tiny_cnn_so, tracker=tracker, key=X86_KEY, wait=2)
        assert time.monotonic() - t0 < 15
    finally:
        for mod in held:
            mod.close()


# ---------------------------------------------------------------- errors: quick and named


def test_unreachable_tracker_and_server_fail_fast(capsys, tiny_cnn_so):
    dead = f"{HOST}:{_free_port()}"  # nothing listens there
    for argv, what, fix in [
        (["run", tiny_cnn_so, "--rpc", dead], "RPC server", "tvm.exec.rpc_server"),
        (["run", tiny_cnn_so, "--rpc-tracker", dead, "--rpc-key", "k"], "RPC tracker", "tvm.exec.rpc_tracker"),
        (["tune", "zoo:mlp", "--target", "x86", "--trials", "1", "--rpc-tracker", dead, "--rpc-key", "k"],
         "RPC tracker", "tvm.exec.rpc_tracker"),
    ]:
        t0 = time.monotonic()
        code, _out, err = _cli(capsys, *argv)
        assert code == 1, err
        assert f"cannot reach the {what} at {dead}" in err and fix in err, err
        assert time.monotonic() - t0 < 10, f"{argv[0]} took {time.monotonic() - t0:.1f} s to fail"


def test_key_without_device(capsys, tiny_cnn_so, tracker, x86_servers):
    code, _out, err = _cli(capsys, "run", tiny_cnn_so, "--rpc-tracker", tracker, "--rpc-key", "no-such-board")
    assert code == 1
    assert "no device under key 'no-such-board'" in err and X86_KEY in err  # lists the keys it has
    assert f"rpc_server --tracker {tracker} --key no-such-board" in err


def test_wrong_address_kind(tiny_cnn_so, tracker, x86_servers, direct_server):
    with pytest.raises(remote.RemoteError, match="does not answer as a TVM RPC server.*--rpc-tracker"):
        remote.load(tiny_cnn_so, rpc=tracker)
    with pytest.raises(remote.RemoteError, match="does not answer as a TVM RPC tracker"):
        remote.load(tiny_cnn_so, tracker=direct_server, key=X86_KEY)


def test_rpc_usage_errors(capsys, tiny_cnn_so):
    for argv in (["run", tiny_cnn_so, "--rpc-tracker", "127.0.0.1:9190"],      # no key
                 ["run", tiny_cnn_so, "--rpc", "nohostport"],                     # not HOST:PORT
                 ["run", tiny_cnn_so, "--rpc", "127.0.0.1:1", "--emulate"],       # two places at once
                 ["tune", "zoo:mlp", "--rpc-key", "k"]):                          # key without tracker
        with pytest.raises(SystemExit) as exc:
            cli.main([str(a) for a in argv])
        assert exc.value.code == 2
    capsys.readouterr()


def test_cross_target_tuning_needs_a_tracker():
    with pytest.raises(TargetError, match="--rpc-tracker HOST:PORT --rpc-key KEY"):
        compiler.tune("zoo:mlp", "arm", trials=1)


@needs_aarch64_cc
def test_module_for_another_arch(tmp_path, tracker, x86_servers):
    model, inputs = zoo_model("tiny_cnn")
    arm_so = compiler.compile(model, "arm", example_inputs=inputs).export(tmp_path / "tiny_arm.so")
    with pytest.raises(remote.RemoteError, match="is for aarch64 but the device .* is x86_64: recompile with "
                                                 "--target x86"):
        remote.load(arm_so, tracker=tracker, key=X86_KEY)
    with pytest.raises(remote.RemoteError, match="target 'rpi4' is for aarch64 but the device .* is x86_64"):
        compiler.tune("zoo:mlp", "arm", trials=1, log_dir=str(tmp_path / "logs"), rpc_tracker=tracker,
                      rpc_key=X86_KEY)


# ---------------------------------------------------------------- tuning through the tracker


def test_tune_through_tracker_with_two_servers(capsys, tmp_path, tracker, x86_servers):
    """kiln tune through the tracker: every candidate (and default schedule) is measured on the two
    loopback servers, not locally; the logs then compile a module that matches PyTorch."""
    before = [_loads(p.log()) for p in x86_servers]
    logs = tmp_path / "logs"
    code, out, err = _cli(capsys, "tune", "zoo:mlp", "--target", "x86", "--trials", "3", "--log-dir", logs,
                          "--rpc-tracker", tracker, "--rpc-key", X86_KEY)
    assert code == 0, err
    assert f"measured on the devices under key '{X86_KEY}'" in out and "3 new trials" in out
    loads = [_loads(p.log()) - b for p, b in zip(x86_servers, before)]
    # 3 default schedules + 3 trials, each uploaded to and loaded on a server; both servers measured
    assert sum(loads) >= 6 and all(n > 0 for n in loads), loads
    model, inputs = zoo_model("mlp")
    mod = compiler.compile(model, "x86", example_inputs=inputs, tuning_logs=str(logs))
    assert mod.meta["untuned_kernels"] == []
    assert_close(mod.run(*[x.numpy() for x in inputs]), run_torch(model, inputs), what="mlp tuned via RPC")


# ---------------------------------------------------------------- the emulated aarch64 device


@pytest.fixture(scope="module")
def emu_server(tracker):
    """TVM's RPC server on the emulated aarch64 device, registered under :data:`EMU_KEY` (~20 s to start)."""
    server = emulator.serve(tracker=tracker, key=EMU_KEY, port=_free_port())
    try:
        remote.wait_for_key(tracker, EMU_KEY, servers=1, timeout=60)
        yield server
    finally:
        server.stop()
    assert not server.alive


@pytest.fixture(scope="module")
def tiny_arm_so(rpc_dir):
    model, inputs = zoo_model("tiny_cnn")
    return compiler.compile(model, "arm", example_inputs=inputs).export(rpc_dir / "tiny_cnn_arm.so")


@pytest.mark.emulator
@needs_emulator
@needs_aarch64_cc
def test_run_on_emulated_device_through_tracker(capsys, tmp_path, tiny_arm_so, tiny_cnn_so, tracker, emu_server):
    x = compiler.load(tiny_cnn_so).random_inputs(seed=7)[0]
    np.savez(tmp_path / "in.npz", x=x)
    code, out, err = _cli(capsys, "run", tiny_arm_so, "--rpc-tracker", tracker, "--rpc-key", EMU_KEY,
                          "--inputs", tmp_path / "in.npz", "--outputs", tmp_path / "out.npz", "--benchmark", "2")
    assert code == 0, err
    assert "aarch64 device" in out and "under emulation" in out and "correctness" in out
    assert "latency under emulation (for correctness only" in out
    with np.load(tmp_path / "out.npz") as data:
        got = data[data.files[0]]
    assert_close(got, compiler.load(tiny_cnn_so).run(x), what="aarch64 via RPC vs x86")
    assert _loads(emu_server.log()) >= 1


@pytest.mark.emulator
@pytest.mark.slow
@needs_emulator
@needs_aarch64_cc
def test_tune_arm_on_emulated_device(tmp_path, tracker, emu_server, caplog):
    before = _loads(emu_server.log())
    logs = tmp_path / "logs"
    with caplog.at_level("WARNING", logger="compiler.tuning"):
        report = compiler.tune("zoo:mlp", "arm", trials=3, log_dir=str(logs), rpc_tracker=tracker,
                               rpc_key=EMU_KEY, progress=False)
    assert "run under emulation" in caplog.text
    assert report.target == "rpi4" and report.new_trials == 3
    assert all(t.best_ms is not None for t in report.tasks)
    # 3 cross-compiled default schedules + 3 trials, measured on the emulated device
    assert _loads(emu_server.log()) - before >= 6
    model, inputs = zoo_model("mlp")
    # emulated timings are kept apart from real boards' records: logs/emulated/<fingerprint>
    assert report.log_dir.parent == logs / "emulated"
    with pytest.raises(TuningError):
        compiler.compile(model, "arm", example_inputs=inputs, tuning_logs=str(logs))
    mod = compiler.compile(model, "arm", example_inputs=inputs, tuning_logs=str(logs / "emulated"))
    assert mod.meta["untuned_kernels"] == []
    got = emulator.run(mod, *[x.numpy() for x in inputs])
    assert_close(got, run_torch(model, inputs), what="mlp for arm tuned on the emulated device")


def test_remote_error_is_a_kiln_error():
    assert issubclass(remote.RemoteError, KilnError)
    with pytest.raises(remote.RemoteError, match="expected HOST:PORT"):
        remote.parse_address("localhost")


@pytest.mark.emulator
@needs_emulator
def test_sigterm_to_emulator_serve_cleans_up(tmp_path):
    """SIGTERM to ``python -m compiler.emulator serve`` stops QEMU (nothing left listening) and removes
    its temporary folder, as Ctrl-C does."""
    import tempfile

    port = _free_port()
    before = set(Path(tempfile.gettempdir()).glob("kiln-emu-rpc-*"))
    proc = subprocess.Popen([sys.executable, "-m", "compiler.emulator", "serve", "--port", str(port),
                             "--port-end", str(port + 1)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        deadline = time.time() + 180
        while "listening" not in line and time.time() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the server exited before listening"
        assert "listening" in line
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    with socket.socket() as s:
        assert s.connect_ex((HOST, port)) != 0, "the RPC server still listens after SIGTERM"
    assert set(Path(tempfile.gettempdir()).glob("kiln-emu-rpc-*")) <= before
