"""Tuning-log archives: one target's database as a ``.tar.gz`` (``kiln logs export`` / ``import``).

An archive holds a manifest (:data:`MANIFEST_FILE`: Kiln version, fingerprint, target, counts) and
the target's data files (:data:`compiler.tuning.database.DATA_FILES`; never the cost model, a pickle).
Importing is atomic and checked: every entry's name, the manifest against the contents, the target
file, every database line, and that MetaSchedule loads it, before anything under the destination
changes; then the records are merged (:func:`compiler.tuning.database.merge`).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

from targets import TargetDescription

from ..errors import TuningError
from ..version import __version__
from .database import (DATA_FILES, TARGET_FILE, WORKLOAD_FILE, MergeResult, check_loads, merge, open_logs,
                       read_json, read_target_file, summarize, valid_lines)

#: The archive's manifest (at its root, beside the ``<fingerprint>/`` folder).
MANIFEST_FILE = "kiln_logs.json"


def export_logs(log_dir, target: TargetDescription, out) -> Path:
    """Write ``target``'s database under ``log_dir`` to the ``.tar.gz`` archive ``out`` (the cost
    model and search logs stay behind). The archive is written beside ``out`` and renamed into place."""
    opened = open_logs(log_dir, target, create=False)  # checks the target, repairs torn lines
    work = opened.work
    summary = summarize(work)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    manifest = {"format": 1, "kiln_version": __version__, "fingerprint": summary.fingerprint,
                "target": summary.target, "workloads": summary.workloads, "records": summary.records}
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            data = json.dumps(manifest, indent=1).encode()
            info = tarfile.TarInfo(MANIFEST_FILE)
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, io.BytesIO(data))
            for name in DATA_FILES:
                if (work / name).exists():
                    tar.add(work / name, arcname=f"{summary.fingerprint}/{name}", recursive=False)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


#: An archive may unpack to at most this many bytes, or ``MAX_RATIO`` times its own size if more
#: (tuning logs compress about 10:1); a bomb is refused from its declared sizes, before unpacking.
MAX_UNPACKED_BYTES = 256 * 2**20
MAX_RATIO = 40
#: What a target fingerprint looks like (``TargetDescription.fingerprint``): hex digits.
_FINGERPRINT = re.compile(r"[0-9a-f]{6,64}")


def _copy_limited(src, dest: Path, size: int, bad: str) -> None:
    """Stream one entry to ``dest``, never writing more than it declared."""
    written = 0
    with open(dest, "wb") as out:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > size:
                raise TuningError(f"{bad} (entry {dest.name} is larger than it declares)")
            out.write(chunk)


def import_logs(archive, log_dir) -> MergeResult:
    """Merge a ``kiln logs export`` archive into ``log_dir``. Atomic: the archive is unpacked into a
    temporary folder and checked (names, manifest, target, every line of the database, and that
    MetaSchedule can load it) before anything under ``log_dir`` changes; a damaged or foreign archive
    is a :class:`TuningError` and leaves ``log_dir`` as it was."""
    archive = Path(archive)
    if not archive.is_file():
        raise TuningError(f"tuning-log archive not found: {archive}")
    bad = f"{archive} is not a tuning-log archive written by `kiln logs export`, or it is damaged"
    with tempfile.TemporaryDirectory(prefix="kiln-import-") as tmp:
        tmp_path = Path(tmp)
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = tar.getmembers()
                declared = sum(m.size for m in members)
                if declared > max(MAX_UNPACKED_BYTES, MAX_RATIO * archive.stat().st_size):
                    raise TuningError(f"{bad} (its entries declare {declared / 1e6:.0f} MB for a "
                                      f"{archive.stat().st_size / 1e6:.1f} MB archive; refused before unpacking)")
                for m in members:
                    parts = Path(m.name).parts
                    ok_name = (len(parts) == 1 and parts[0] == MANIFEST_FILE) or (
                        len(parts) == 2 and parts[1] in DATA_FILES and parts[0].isalnum())
                    if m.isdir() and len(parts) == 1 and parts[0].isalnum():
                        continue
                    if not (m.isfile() and ok_name and not m.name.startswith("/")):
                        raise TuningError(f"{bad} (unexpected entry {m.name!r})")
                    dest = tmp_path.joinpath(*parts)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    _copy_limited(tar.extractfile(m), dest, m.size, bad)
        except (tarfile.TarError, EOFError, zlib.error, OSError, UnicodeError) as err:
            raise TuningError(f"{bad} ({err})") from None
        manifest = read_json(tmp_path / MANIFEST_FILE, None)
        if not isinstance(manifest, dict) or "fingerprint" not in manifest:
            raise TuningError(f"{bad} (no {MANIFEST_FILE})")
        if not (isinstance(manifest["fingerprint"], str) and _FINGERPRINT.fullmatch(manifest["fingerprint"])):
            raise TuningError(f"{bad} (its manifest's fingerprint {str(manifest['fingerprint'])[:40]!r} is not a "
                              "target fingerprint)")
        work = tmp_path / str(manifest["fingerprint"])
        if not (work / TARGET_FILE).exists() or not (work / WORKLOAD_FILE).exists():
            raise TuningError(f"{bad} (no database for fingerprint {manifest['fingerprint']})")
        try:
            read_target_file(work)
            summary = summarize(work)
            valid_lines(work, strict=True)
        except Exception as err:
            raise TuningError(f"{bad} ({err})") from None
        if (summary.workloads, summary.records) != (manifest.get("workloads"), manifest.get("records")):
            raise TuningError(f"{bad} (the manifest lists {manifest.get('workloads')} workloads and "
                         f"{manifest.get('records')} records; the archive holds {summary.workloads} and "
                         f"{summary.records})")
        check_loads(work)
        return merge([work], log_dir, strict=True)
