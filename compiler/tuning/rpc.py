"""Tuning through a TVM RPC tracker: candidates built here, measured on the devices under a key.

``compiler.tune(..., rpc_tracker=, rpc_key=)`` first checks the devices (:func:`check_tuning_devices`:
a CPU target, a device under the key, of the target's architecture; records of emulated devices go to
:data:`EMULATED_SUBDIR`), then measures with :func:`tuning_parts`: a builder that links ``.so`` files
with the target's (cross) compiler and MetaSchedule's ``RPCRunner``, one measurement worker per free
device. Reaching the tracker and the devices is ``compiler.remote``'s job.
"""

from __future__ import annotations

import gc
import logging
import os

from tvm.s_tir import meta_schedule as ms

from ..errors import TargetError
from ..remote import (DeviceInfo, check_arch, check_key, device_info, parse_address, request_session,
                      target_arch)
from ..toolchain import check_cross_compiler
from .measurement import evaluator_config, rpc_alloc_argument, rpc_run_evaluator
from .search import PersistentBuilder

log = logging.getLogger(__name__)

#: Subfolder of ``log_dir`` for records measured on emulated devices (``compiler.emulator``): their
#: timings say nothing of a real board, so they never answer its queries.
EMULATED_SUBDIR = "emulated"


def check_tuning_devices(tracker: str, key: str, desc) -> DeviceInfo:
    """Before a tuning run measures on the devices under ``key`` at ``tracker``: the target must be a CPU
    target, the key must have a device, and the device's architecture must be the target's (one session
    is opened to ask). Returns what the device reported; logs a warning when it is emulated.

    Raises :class:`TargetError` for a target that cannot be tuned through RPC and
    :class:`compiler.errors.RemoteError` when the tracker, the key or the device does not fit."""
    if desc.kind != "llvm" or desc.family not in ("x86", "arm"):
        raise TargetError(f"target {desc.name!r} ({desc.family}) cannot be tuned through RPC by this Kiln: the "
                          "x86 and ARM Linux targets can")
    check_key(tracker, key)
    session = request_session(tracker, key, session_timeout=60)
    try:
        info = device_info(session)
    finally:
        del session
        gc.collect()  # end the session now: the device goes back to the tracker
    check_arch(target_arch(desc), info, f"key {key!r} of RPC tracker {tracker}", f"target {desc.name!r}")
    if info.emulated:
        log.warning(
            "the devices under key %r run under emulation (%s): their timings are for correctness checks only, "
            "so records tuned on them say nothing about a real board's speed", key, info.emulated)
    return info


def tuning_parts(tracker: str, key: str, desc, *, build_workers: int | None = None,
                 timeout_sec: float = 60.0) -> dict:
    """``builder`` and ``runner`` for :class:`compiler.tuning.search.Searcher` measuring on the devices
    under ``key``: candidates are built here and linked into ``.so`` files with the target's compiler (its cross
    compiler for ARM), then MetaSchedule's ``RPCRunner`` uploads and times each on a free device, with
    one measurement worker per device free under the key now (several devices measure in parallel).
    Raises what ``check_cross_compiler`` and :func:`compiler.remote.check_key` raise."""
    check_cross_compiler(desc)
    status = check_key(tracker, key)
    host, port = parse_address(tracker)
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                 session_priority=1, session_timeout_sec=int(timeout_sec))
    workers = max(1, status.free)
    builder = PersistentBuilder(max_workers=build_workers or len(os.sched_getaffinity(0)),
                                link=desc.cross_compiler or "")
    runner = ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator_config(desc.to_tvm()),
                                 f_alloc_argument=rpc_alloc_argument,
                                 f_run_evaluator=rpc_run_evaluator, max_workers=workers)
    return {"builder": builder, "runner": runner}
