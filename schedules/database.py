"""Tuning logs on disk: one MetaSchedule JSON database per target, repaired before it is opened.

Layout of a tuning-log directory::

    tuning_logs/
      <target fingerprint>/          one per target description (TargetDescription.fingerprint())
        target.json                  the description, its fingerprint and the Kiln version that made it
        database_workload.json       MetaSchedule JSONDatabase: one workload (kernel) per line
        database_tuning_record.json  one measured candidate per line: [workload index, record]
        logs/                        MetaSchedule's per-task search logs (text, for debugging)

Records of different targets never share a database (TVM's JSON database ignores the target when
it answers a query). Opening a directory whose ``target.json`` describes another target is an error.

Durability: MetaSchedule appends one line per record. A run killed mid-append (``kill -9``, power
loss) can leave a torn last line; :func:`repair` drops it with a warning, keeps the torn original
as ``<file>.torn-<time>`` and replaces the file atomically with the cleaned copy before the database
is opened. Anything else that does not parse is corruption: a :class:`TuningError` naming the file
and line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from targets import TargetDescription

log = logging.getLogger(__name__)

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
TARGET_FILE = "target.json"


def _error(msg: str):
    from compiler.errors import TuningError

    return TuningError(msg)


def target_dir(log_dir, target: TargetDescription) -> Path:
    """Where ``target``'s database lives under the tuning-log directory ``log_dir``."""
    return Path(log_dir) / target.fingerprint()


# -- repair ---------------------------------------------------------------------------------------
def _check_workload(line) -> None:
    if not (isinstance(line, list) and len(line) == 2 and all(isinstance(x, str) for x in line)):
        raise ValueError("expected [structural hash, module]")


def _check_record(line, num_workloads: int) -> None:
    if not (isinstance(line, list) and len(line) == 2 and isinstance(line[0], int) and isinstance(line[1], list)):
        raise ValueError("expected [workload index, record]")


def _scan(path: Path, check) -> tuple[list[bytes], bool]:
    """The valid lines of ``path`` and whether its last line was torn (and dropped)."""
    data = path.read_bytes()
    if not data:
        return [], False
    lines = data.split(b"\n")
    complete = data.endswith(b"\n")
    if complete:
        lines = lines[:-1]
    good: list[bytes] = []
    torn = False
    for i, raw in enumerate(lines, 1):
        last = i == len(lines)
        if not raw.strip():
            continue
        try:
            check(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, ValueError) as err:
            # A torn append: the last line, cut short before its newline, the start of a JSON list.
            if last and not complete and raw.lstrip().startswith(b"["):
                torn = True
                break
            raise _error(
                f"tuning log {path} is corrupt at line {i} ({err}); it is not a MetaSchedule JSON "
                f"database. Move it away (or delete {path.parent}) and tune again"
            ) from None
        good.append(raw)
    return good, torn


def _atomic_write(path: Path, lines: list[bytes]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def repair(work: Path) -> list[str]:
    """Drop torn last lines (and records pointing at a dropped workload) from ``work``'s database
    files; return one warning per repair. The originals are kept as ``<file>.torn-<time>``."""
    warnings: list[str] = []
    wpath, rpath = work / WORKLOAD_FILE, work / RECORD_FILE
    workloads, wtorn = _scan(wpath, _check_workload) if wpath.exists() else ([], False)
    records, rtorn = _scan(rpath, lambda line: _check_record(line, 0)) if rpath.exists() else ([], False)
    kept = [r for r in records if json.loads(r)[0] < len(workloads)]
    orphans = len(records) - len(kept)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path, lines, torn, extra in ((wpath, workloads, wtorn, 0), (rpath, kept, rtorn, orphans)):
        if not (torn or extra):
            continue
        backup = path.with_name(f"{path.name}.torn-{stamp}")
        shutil.copy2(path, backup)
        _atomic_write(path, lines)
        what = []
        if torn:
            what.append("a torn last line (an interrupted write)")
        if extra:
            what.append(f"{extra} record(s) of a workload that was never written")
        msg = f"tuning log {path}: skipped {' and '.join(what)}; original kept as {backup.name}"
        log.warning(msg)
        warnings.append(msg)
    return warnings


# -- opening --------------------------------------------------------------------------------------
def _codegen_view(data: dict) -> dict:
    from targets import _CODEGEN_FIELDS

    return {k: data.get(k) for k in _CODEGEN_FIELDS}


def _check_target_file(work: Path, target: TargetDescription) -> None:
    path = work / TARGET_FILE
    try:
        data = json.loads(path.read_text())
        recorded = data["target"]
        fingerprint = data["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _error(f"tuning log {path} is unreadable or corrupt ({err})") from None
    if fingerprint != target.fingerprint() or _codegen_view(recorded) != _codegen_view(target.to_json()):
        raise _error(
            f"tuning logs in {work} were made for target {recorded.get('name')!r} (fingerprint "
            f"{fingerprint}), not for {target.name!r} (fingerprint {target.fingerprint()}); "
            "records of different targets never share a database"
        )


def _write_target_file(work: Path, target: TargetDescription) -> None:
    from compiler import __version__

    data = {"fingerprint": target.fingerprint(), "kiln_version": __version__, "target": target.to_json()}
    _atomic_write(work / TARGET_FILE, [json.dumps(data, indent=1).encode()])


@dataclass
class TuningLogs:
    """An opened per-target database: ``database`` is the MetaSchedule JSONDatabase, ``work`` its
    folder, ``repairs`` the warnings issued while opening it."""

    work: Path
    database: object
    repairs: list[str]

    def record_counts(self) -> dict[str, int]:
        """Measured records per workload, keyed by the workload's structural hash (as a string)."""
        hashes = []
        wpath = self.work / WORKLOAD_FILE
        if wpath.exists():
            hashes = [json.loads(line)[0] for line in wpath.read_text().splitlines() if line.strip()]
        counts = {h: 0 for h in hashes}
        rpath = self.work / RECORD_FILE
        if rpath.exists():
            with open(rpath) as f:
                for line in f:
                    if line.strip():
                        idx = int(line[1:line.index(",")])
                        if idx < len(hashes):
                            counts[hashes[idx]] += 1
        return counts


def open_logs(log_dir, target: TargetDescription, *, create: bool) -> TuningLogs:
    """Open ``target``'s database under ``log_dir``.

    ``create=False`` (compiling): the directory and a database for ``target`` must exist, else a
    :class:`TuningError` saying what was found. ``create=True`` (tuning): make them if needed.
    Either way a ``target.json`` that disagrees with ``target`` is an error, torn last lines are
    repaired (:func:`repair`), and a database that cannot be read is a ``TuningError`` naming it.
    """
    from tvm.s_tir import meta_schedule as ms

    root = Path(log_dir)
    work = target_dir(root, target)
    if not create:
        if not root.is_dir():
            raise _error(f"tuning log directory not found: {root}")
        if not (work / WORKLOAD_FILE).exists():
            found = sorted(p.name for p in root.iterdir() if (p / TARGET_FILE).exists())
            raise _error(
                f"{root} has no tuning records for target {target.name!r} (fingerprint "
                f"{target.fingerprint()}); it holds logs for: {', '.join(found) or 'no target'}"
            )
    else:
        work.mkdir(parents=True, exist_ok=True)
    if (work / TARGET_FILE).exists():
        _check_target_file(work, target)
    elif create:
        _write_target_file(work, target)
    repairs = repair(work)
    try:
        db = ms.database.JSONDatabase(
            path_workload=str(work / WORKLOAD_FILE),
            path_tuning_record=str(work / RECORD_FILE),
            allow_missing=create,
        )
    except Exception as err:  # TVM raises its own error types for malformed content
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise _error(f"cannot read the tuning database in {work} ({WORKLOAD_FILE} / {RECORD_FILE}): {first}") from err
    return TuningLogs(work, db, repairs)


def set_aside(log_dir, target: TargetDescription) -> Path | None:
    """Move ``target``'s existing database out of the way (``resume=False``); return where to."""
    work = target_dir(log_dir, target)
    if not work.exists():
        return None
    dest = work.with_name(f"{work.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    work.rename(dest)
    return dest
