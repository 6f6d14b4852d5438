"""Tuning logs on disk: one MetaSchedule JSON database per target, repaired before it is opened.

Layout of a tuning-log directory::

    tuning_logs/
      <target fingerprint>/          one per target description (TargetDescription.fingerprint())
        target.json                  the description, its fingerprint and the Kiln version that made it
        database_workload.json       MetaSchedule JSONDatabase: one workload (kernel) per line
        database_tuning_record.json  one measured candidate per line: [workload index, record]
        defaults.json                Kiln's default schedule per workload: its latency, measured with
                                     the runner that measures candidates, and its trace's key
        models.json                  per model tuned here: its tasks (workload hash, weight), for
                                     estimates after merges (`kiln logs list`)
        cost_model.npz               the XGBoost cost model after the last run (warm start; no pickle)
        logs/                        MetaSchedule's per-task search logs (text, for debugging)

Kiln's default schedule of every tuned kernel is itself a record in the database (its DLight trace,
measured like any candidate): the best record of a kernel is therefore never slower than its
default, compile applies it, and the evolutionary search starts from it. Default records are not
trials: :meth:`TuningLogs.record_counts` leaves them out (``defaults.json`` names their traces).

Records of different targets never share a database (TVM's JSON database ignores the target when
it answers a query). Opening a directory whose ``target.json`` describes another target is an error.

Durability: MetaSchedule appends one line per record. A run killed mid-append (``kill -9``, power
loss) can leave a torn last line; :func:`repair` drops it with a warning, keeps the torn original
as ``<file>.torn-<time>`` and replaces the file atomically with the cleaned copy before the database
is opened. Anything else that does not parse is corruption: a :class:`TuningError` naming the file
and line.
"""

from __future__ import annotations

import hashlib
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from targets import _CODEGEN_FIELDS, TargetDescription

from ..errors import TuningError
from ..version import __version__
from .measurement import MEASUREMENT

# TVM (MetaSchedule's JSONDatabase) is imported in the functions that open a database: listing and
# merging logs read plain JSON and need no TVM.

log = logging.getLogger(__name__)

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
TARGET_FILE = "target.json"
DEFAULTS_FILE = "defaults.json"
MODELS_FILE = "models.json"
COST_MODEL_FILE = "cost_model.npz"  # compiler.tuning.cost_model: no pickle
#: Files that make up one target's logs (what merge, export and import carry; not the cost model,
#: which is a pickle: never load one from an archive).
DATA_FILES = (TARGET_FILE, WORKLOAD_FILE, RECORD_FILE, DEFAULTS_FILE, MODELS_FILE)


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
            raise TuningError(
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
    return {k: data.get(k) for k in _CODEGEN_FIELDS}


def _check_target_file(work: Path, target: TargetDescription) -> None:
    path = work / TARGET_FILE
    try:
        data = json.loads(path.read_text())
        recorded = data["target"]
        fingerprint = data["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TuningError(f"tuning log {path} is unreadable or corrupt ({err})") from None
    if fingerprint != target.fingerprint() or _codegen_view(recorded) != _codegen_view(target.to_json()):
        raise TuningError(
            f"tuning logs in {work} were made for target {recorded.get('name')!r} (fingerprint "
            f"{fingerprint}), not for {target.name!r} (fingerprint {target.fingerprint()}); "
            "records of different targets never share a database"
        )


#: The measurement protocol of logs whose ``target.json`` names none (older Kiln: hot caches).
LEGACY_MEASUREMENT = "hot"


def current_measurement() -> str:
    """How this Kiln times candidates (``compiler.tuning.measurement.MEASUREMENT``)."""
    return MEASUREMENT


def measurement(meta: dict) -> str:
    """The measurement protocol a ``target.json`` (as read) records."""
    return str(meta.get("measurement", LEGACY_MEASUREMENT))


def _write_target_file(work: Path, target: TargetDescription) -> None:
    data = {"fingerprint": target.fingerprint(), "kiln_version": __version__, "target": target.to_json(),
            "measurement": current_measurement()}
    _atomic_write(work / TARGET_FILE, [json.dumps(data, indent=1).encode()])


@dataclass
class TuningLogs:
    """An opened per-target database: ``database`` is the MetaSchedule JSONDatabase, ``work`` its
    folder, ``repairs`` the warnings issued while opening it."""

    work: Path
    database: object
    repairs: list[str]

    def record_counts(self) -> dict[str, int]:
        """Measured trials per workload, keyed by the workload's structural hash (as a string).
        Records of Kiln's default schedules (named in ``defaults.json``) are not trials."""
        defaults = read_defaults(self.work)
        default_keys = {h: {d.get("trace"), *d.get("previous", [])} - {None} for h, d in defaults.items()}
        hashes, records = read_db(self.work)
        counts = {h: 0 for h in hashes}
        for idx, rec in records:
            h = hashes[idx]
            if trace_key(rec[0]) in default_keys.get(h, ()):
                continue
            counts[h] += 1
        return counts

    @property
    def defaults(self) -> dict[str, dict]:
        """``defaults.json``: per workload hash, ``{"ms": default latency, "trace": trace key}``."""
        return read_defaults(self.work)

    def set_default(self, workload_hash: str, ms: float | None, trace: str | None) -> None:
        """Record the default schedule's latency (and the key of its record's trace) for a workload; the
        trace keys of its earlier defaults (Kiln's default schedule changed) are kept in ``previous``."""
        data = read_defaults(self.work)
        old = data.get(workload_hash, {})
        # earlier default schedules of the workload stay records of it, and are not trials either
        previous = [t for t in [*old.get("previous", []), old.get("trace")] if t is not None and t != trace]
        data[workload_hash] = {"ms": ms, "trace": trace, "kiln_version": __version__,
                               **({"previous": previous} if previous else {})}
        write_json(self.work / DEFAULTS_FILE, {"format": 1, "workloads": data})


# -- reading the files directly (listing, merging, counting) --------------------------------------
def trace_key(trace_json) -> str:
    """A stable key of a record's trace (its JSON form, as stored in the record file)."""
    return hashlib.sha1(json.dumps(trace_json, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def record_trace_key(record) -> str:
    """:func:`trace_key` of a ``TuningRecord`` not yet stored (serialised as the JSON database would)."""
    from tvm.s_tir import meta_schedule as ms

    with tempfile.TemporaryDirectory() as tmp:
        db = ms.database.JSONDatabase(path_workload=f"{tmp}/w.json", path_tuning_record=f"{tmp}/r.json",
                                      allow_missing=True)
        db.commit_workload(record.workload.mod)
        db.commit_tuning_record(record)
        line = json.loads(Path(f"{tmp}/r.json").read_text().splitlines()[-1])
    return trace_key(line[1][0])


def read_db(work: Path) -> tuple[list[str], list[tuple[int, list]]]:
    """The workload hashes (in file order) and the records ``(workload index, record)`` of the
    database in ``work``, read as plain JSON (records of a missing workload are dropped)."""
    hashes: list[str] = []
    wpath = Path(work) / WORKLOAD_FILE
    if wpath.exists():
        hashes = [json.loads(line)[0] for line in wpath.read_text().splitlines() if line.strip()]
    records: list[tuple[int, list]] = []
    rpath = Path(work) / RECORD_FILE
    if rpath.exists():
        with open(rpath) as f:
            for line in f:
                if line.strip():
                    idx, rec = json.loads(line)
                    if idx < len(hashes):
                        records.append((idx, rec))
    return hashes, records


def record_seconds(rec) -> float | None:
    """Mean measured seconds of a record (``None``: failed or not measured)."""
    secs = rec[1] if len(rec) > 1 else None
    if not secs:
        return None
    try:
        mean = sum(float(s) for s in secs) / len(secs)
    except (TypeError, ValueError):
        return None
    return mean if mean < 1e9 else None  # MetaSchedule stores failed candidates with 1e10 s


def read_json(path: Path, default):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as err:
        raise TuningError(f"tuning log {path} is unreadable or corrupt ({err})") from None


def write_json(path: Path, data) -> None:
    _atomic_write(Path(path), [json.dumps(data, indent=1, sort_keys=True).encode()])


def _read_table(work: Path, name: str, key: str) -> dict[str, dict]:
    """The ``{key: {...}}`` table of the JSON file ``name`` in ``work`` ({} when absent)."""
    data = read_json(Path(work) / name, {})
    table = data.get(key, {}) if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise TuningError(f"tuning log {Path(work) / name} is corrupt (expected {{'{key}': {{...}}}})")
    return table


def read_defaults(work: Path) -> dict[str, dict]:
    """Per workload hash, its default schedule's latency and trace (``defaults.json``)."""
    return _read_table(work, DEFAULTS_FILE, "workloads")


def read_models(work: Path) -> dict[str, dict]:
    """Per model name, its tasks (``models.json``)."""
    return _read_table(work, MODELS_FILE, "models")


def record_model(work: Path, model: str, tasks: list[tuple[str, str, float]]) -> None:
    """Remember ``model``'s tasks ``(name, workload hash, weight)`` in ``models.json``."""
    models = read_models(work)
    models[model] = {"tasks": [{"name": n, "workload": h, "weight": w} for n, h, w in tasks],
                     "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(Path(work) / MODELS_FILE, {"format": 1, "models": models})


def lock_path(work: Path) -> Path:
    """The writer-lock file of the per-target database ``work``: beside it (``.<fingerprint>.lock``), so it
    stays put when the folder is set aside."""
    return work.parent / f".{work.name}.lock"


@contextlib.contextmanager
def writer_lock(work: Path, what: str, *, wait: bool = True):
    """Hold the writer lock of the per-target database ``work`` (a ``filelock`` lock file, so it holds
    across processes and is released when a process dies) for the block; yields True. Every writer takes
    it (tuning for its whole run, merge, import, torn-line repair). When another process holds it: wait,
    with a warning naming the folder, or with ``wait=False`` yield False at once."""
    from filelock import FileLock, Timeout

    work.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(work)), is_singleton=True)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            yield False
            return
        log.warning("%s: another Kiln process is writing the tuning logs in %s; waiting for it to finish",
                    what, work)
        lock.acquire()
    try:
        yield True
    finally:
        lock.release()


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
            raise TuningError(f"tuning log directory not found: {root}")
        if not (work / WORKLOAD_FILE).exists():
            found = sorted(p.name for p in root.iterdir() if (p / TARGET_FILE).exists())
            raise TuningError(
                f"{root} has no tuning records for target {target.name!r} (fingerprint "
                f"{target.fingerprint()}); it holds logs for: {', '.join(found) or 'no target'}"
            )
    else:
        work.mkdir(parents=True, exist_ok=True)
    if (work / TARGET_FILE).exists():
        _check_target_file(work, target)
    elif create:
        _write_target_file(work, target)
    with writer_lock(work, "repair", wait=create) as locked:
        # A reader never repairs while a tuner writes: its last line may be half-written, not torn.
        repairs = repair(work) if locked else []
    try:
        db = ms.database.JSONDatabase(
            path_workload=str(work / WORKLOAD_FILE),
            path_tuning_record=str(work / RECORD_FILE),
            allow_missing=create,
        )
    except Exception as err:  # TVM raises its own error types for malformed content
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise TuningError(f"cannot read the tuning database in {work} ({WORKLOAD_FILE} / {RECORD_FILE}): {first}") from err
    return TuningLogs(work, db, repairs)


def set_aside(log_dir, target: TargetDescription) -> Path | None:
    """Move ``target``'s existing database out of the way (``resume=False``); return where to:
    ``LOG_DIR/old-<date-time>``, itself a tuning-log directory (``compile(tuning_logs=...)`` and
    ``kiln logs`` accept it)."""
    work = target_dir(log_dir, target)
    if not work.exists():
        return None
    stamp = time.strftime('%Y%m%d-%H%M%S')
    root = Path(log_dir) / f"old-{stamp}"
    n = 1
    while (root / work.name).exists():
        n += 1
        root = Path(log_dir) / f"old-{stamp}-{n}"
    root.mkdir(parents=True, exist_ok=True)
    work.rename(root / work.name)
    return root


def set_aside_stale(log_dir, target: TargetDescription) -> tuple[Path, str] | None:
    """Before tuning: move ``target``'s database out of the way if it was measured under another
    protocol than this Kiln's (:data:`compiler.tuning.measurement.MEASUREMENT`), so new timings never compete with
    old ones. Returns (where it went, its protocol), or None when nothing was moved."""
    work = target_dir(log_dir, target)
    if not (work / TARGET_FILE).exists():
        return None
    old = measurement(read_json(work / TARGET_FILE, {}) or {})
    if old == current_measurement():
        return None
    return set_aside(log_dir, target), old


# -- list, merge ----------------------------------------------------------------------------------
def target_dirs(path) -> list[Path]:
    """The per-target databases in ``path``: ``path`` itself when it is one, else its sub-folders
    that are (each holds a ``target.json``)."""
    p = Path(path)
    if (p / TARGET_FILE).exists():
        return [p]
    if not p.is_dir():
        raise TuningError(f"tuning log directory not found: {p}")
    return sorted(c for c in p.iterdir() if c.is_dir() and (c / TARGET_FILE).exists())


def read_target_file(work: Path) -> dict:
    """``target.json`` of a per-target database, checked: it names its fingerprint and target, and
    the folder is named after the fingerprint."""
    path = Path(work) / TARGET_FILE
    data = read_json(path, None)
    try:
        fingerprint, name = data["fingerprint"], data["target"]["name"]
        if not (isinstance(fingerprint, str) and isinstance(name, str)):
            raise TypeError("fingerprint and target name must be strings")
    except (KeyError, TypeError) as err:
        raise TuningError(f"tuning log {path} is unreadable or corrupt ({err})") from None
    if Path(work).name != fingerprint:
        raise TuningError(f"tuning log {path} describes fingerprint {fingerprint}, but its folder is named "
                     f"{Path(work).name}: folders are named after their target's fingerprint")
    return data


@dataclass(frozen=True)
class LogSummary:
    """One per-target database, as ``kiln logs list`` shows it. ``models``: per model tuned here,
    its estimated end-to-end kernel time with the best records (ms; None when some kernel has no
    measured record)."""

    path: Path
    fingerprint: str
    target: str
    kiln_version: str
    workloads: int
    records: int
    default_records: int
    models: dict

    def __str__(self) -> str:
        lines = [f"{self.fingerprint}  target {self.target}  (Kiln {self.kiln_version})  {self.workloads} workloads, "
                 f"{self.records} records ({self.records - self.default_records} trials + "
                 f"{self.default_records} default schedules)  {self.path}"]
        for name, est in sorted(self.models.items()):
            lines.append(f"    {name}: best estimated {'-' if est is None else f'{est:.4f} ms'}")
        return "\n".join(lines)


def summarize(work: Path) -> LogSummary:
    """Counts and best estimates of the per-target database in ``work`` (read as plain JSON)."""
    work = Path(work)
    meta = read_target_file(work)
    for name in (WORKLOAD_FILE, RECORD_FILE):
        if (work / name).exists():
            _scan(work / name, _check_workload if name == WORKLOAD_FILE else lambda line: _check_record(line, 0))
    hashes, records = read_db(work)
    defaults = read_defaults(work)
    best: dict[str, float] = {}
    n_default = 0
    for idx, rec in records:
        h = hashes[idx]
        if defaults.get(h, {}).get("trace") and trace_key(rec[0]) == defaults[h]["trace"]:
            n_default += 1
        secs = record_seconds(rec)
        if secs is not None and secs < best.get(h, float("inf")):
            best[h] = secs
    models = {}
    for name, entry in read_models(work).items():
        tasks = entry.get("tasks", [])
        known = all(t.get("workload") in best for t in tasks) and tasks
        models[name] = sum(t["weight"] * best[t["workload"]] for t in tasks) * 1e3 if known else None
    return LogSummary(work, meta["fingerprint"], meta["target"]["name"], str(meta.get("kiln_version", "?")),
                      len(hashes), len(records), n_default, models)


def list_logs(log_dir) -> list[LogSummary]:
    """One :class:`LogSummary` per target database under ``log_dir``, each checked to load with
    MetaSchedule (a :class:`TuningError` naming the one that does not)."""
    summaries = []
    for work in target_dirs(log_dir):
        summaries.append(summarize(work))
        check_loads(work)
    return summaries


@dataclass(frozen=True)
class MergeResult:
    """What a merge added to ``work``: new workloads, new records, and records skipped because the
    same trace of the same workload was already there."""

    work: Path
    target: str
    workloads_added: int
    records_added: int
    duplicates: int

    def __str__(self) -> str:
        return (f"merged into {self.work} (target {self.target}): {self.workloads_added} new workloads, "
                f"{self.records_added} new records, {self.duplicates} duplicate records skipped")


def valid_lines(work: Path, strict: bool) -> tuple[list[bytes], list[bytes]]:
    """The workload and record lines of ``work``'s database without modifying it: a torn last line
    is left out (an error when ``strict``), as are records of a missing workload."""
    out = []
    for name, check in ((WORKLOAD_FILE, _check_workload), (RECORD_FILE, lambda line: _check_record(line, 0))):
        path = work / name
        lines, torn = _scan(path, check) if path.exists() else ([], False)
        if torn and strict:
            raise TuningError(f"tuning log {path} is corrupt: its last line is cut short")
        out.append(lines)
    workloads, records = out
    return workloads, [r for r in records if json.loads(r)[0] < len(workloads)]


def check_loads(work: Path) -> None:
    """Open ``work``'s database with MetaSchedule: a TuningError naming it if TVM cannot read it."""
    from tvm.s_tir import meta_schedule as ms

    try:
        ms.database.JSONDatabase(path_workload=str(work / WORKLOAD_FILE), path_tuning_record=str(work / RECORD_FILE),
                                 allow_missing=True)
    except Exception as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise TuningError(f"cannot read the tuning database in {work}: {first}") from err


def _describe(work: Path, meta: dict) -> str:
    return f"{work} is for target {meta['target']['name']!r} (fingerprint {meta['fingerprint']})"


def _best_records(records: list[bytes]) -> list[bytes]:
    """The fastest measured record line per workload index (failed candidates dropped), in file order."""
    best: dict[int, tuple[float, int]] = {}
    for i, raw in enumerate(records):
        idx, rec = json.loads(raw)
        secs = record_seconds(rec)
        if secs is not None and (idx not in best or secs < best[idx][0]):
            best[idx] = (secs, i)
    keep = sorted(i for _, i in best.values())
    return [records[i] for i in keep]


def _check_same_measurement(a: Path, a_meta: dict, b: Path, b_meta: dict) -> None:
    """Records timed under different protocols do not compare (the best of a mix is meaningless)."""
    if measurement(a_meta) != measurement(b_meta):
        raise TuningError(
            f"cannot merge tuning logs measured differently: {a} ({measurement(a_meta)!r} timings) and {b} "
            f"({measurement(b_meta)!r}); their latencies do not compare. Keep the logs of one protocol (this "
            f"Kiln measures {current_measurement()!r}; re-tune to replace older logs)"
        )


def merge(sources, log_dir, *, target: TargetDescription | None = None, strict: bool = False,
          best_only: bool = False) -> MergeResult:
    """Merge the per-target databases in ``sources`` (each a per-target folder or a tuning-log
    directory) into ``log_dir`` (``log_dir/<fingerprint>``, or ``log_dir`` itself if it is a
    per-target folder).

    Every source must be for the same target fingerprint (``target`` picks one from directories
    holding several): records of different targets never share a database, and mixing them is a
    :class:`TuningError` naming both. Workloads are deduplicated by structural hash; records are all
    kept, except a second copy of the same trace for the same workload. The merged database is
    written to a staging folder, checked to load with MetaSchedule, then moved into place file by
    file (workloads first, so a crash never leaves records pointing at a missing workload).

    ``best_only``: keep only the fastest measured record of each workload (the one compile applies),
    e.g. to ship logs with a model or with Kiln (``tuning_logs/``): a fraction of the size, and as fast
    to compile with; resumed tuning then starts from those records."""
    with contextlib.ExitStack() as held:  # the destination's writer lock, once it is known
        srcs: list[tuple[Path, dict]] = []
        for src in sources:
            found = target_dirs(src)
            if target is not None:
                found = [w for w in found if w.name == target.fingerprint()]
            if not found:
                what = f"for target {target.name!r} (fingerprint {target.fingerprint()})" if target else ""
                raise TuningError(f"{src} holds no tuning logs {what}".rstrip())
            srcs += [(w, read_target_file(w)) for w in found]
        first_work, first_meta = srcs[0]
        for work, meta in srcs[1:]:
            if meta["fingerprint"] != first_meta["fingerprint"]:
                raise TuningError(
                    f"cannot merge tuning logs of different targets: {_describe(first_work, first_meta)}, "
                    f"{_describe(work, meta)}; records of different targets never share a database: merge "
                    "each target on its own (--target NAME)"
                )
        for work, meta in srcs[1:]:
            _check_same_measurement(first_work, first_meta, work, meta)
        fingerprint = first_meta["fingerprint"]
        root = Path(log_dir)
        if (root / TARGET_FILE).exists():
            dst = root
        else:
            dst = root / fingerprint
        held.enter_context(writer_lock(dst, "kiln logs merge"))
        if (dst / TARGET_FILE).exists():
            dmeta = read_target_file(dst)
            if dmeta["fingerprint"] != fingerprint:
                raise TuningError(f"cannot merge tuning logs of different targets: {_describe(first_work, first_meta)}, "
                             f"the destination {_describe(dst, dmeta)}")
            _check_same_measurement(first_work, first_meta, dst, dmeta)
            repair(dst)
        else:
            dmeta = first_meta
        workloads, records = valid_lines(dst, strict=False) if dst.exists() else ([], [])
        index = {json.loads(w)[0]: i for i, w in enumerate(workloads)}
        seen = {(json.loads(workloads[json.loads(r)[0]])[0], trace_key(json.loads(r)[1][0])) for r in records}
        defaults = read_defaults(dst) if dst.exists() else {}
        models = read_models(dst) if dst.exists() else {}
        n_w, n_r, dup = len(workloads), len(records), 0
        for work, _meta in srcs:
            if work.resolve() == dst.resolve():
                continue
            s_workloads, s_records = valid_lines(work, strict=strict)
            s_hashes = [json.loads(w)[0] for w in s_workloads]
            for h, line in zip(s_hashes, s_workloads):
                if h not in index:
                    index[h] = len(workloads)
                    workloads.append(line)
            for raw in s_records:
                idx, rec = json.loads(raw)
                key = (s_hashes[idx], trace_key(rec[0]))
                if key in seen:
                    dup += 1
                    if not best_only:  # best-only keeps every timing of a trace: the fastest is what compile picks
                        continue
                seen.add(key)
                records.append(b"[" + str(index[s_hashes[idx]]).encode() + raw[raw.index(b","):])
            for h, entry in read_defaults(work).items():
                defaults.setdefault(h, entry)
            for name, entry in read_models(work).items():
                if name not in models or str(entry.get("updated", "")) > str(models[name].get("updated", "")):
                    models[name] = entry
        if best_only:
            records = _best_records(records)
        root.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".merge-", dir=root))
        try:
            _atomic_write(stage / WORKLOAD_FILE, workloads)
            _atomic_write(stage / RECORD_FILE, records)
            write_json(stage / DEFAULTS_FILE, {"format": 1, "workloads": defaults})
            write_json(stage / MODELS_FILE, {"format": 1, "models": models})
            write_json(stage / TARGET_FILE, dmeta)
            check_loads(stage)
            dst.mkdir(parents=True, exist_ok=True)
            for name in (WORKLOAD_FILE, RECORD_FILE, DEFAULTS_FILE, MODELS_FILE, TARGET_FILE):
                os.replace(stage / name, dst / name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return MergeResult(dst, dmeta["target"]["name"], len(workloads) - n_w, len(records) - n_r, dup)
