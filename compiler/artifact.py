"""The deployable file: one ``.so`` with code, weights and Kiln's metadata inside.

Metadata (Kiln version, target description, input/output specs, kernel table) is compiled into the
library as a marked, base64-encoded string constant, so it can be read back from the file bytes
without loading the library: :func:`read_metadata` works for a .so of any architecture, which is
how ``load`` refuses a module built for another CPU or Kiln version with a clear message.

After the library is written, an integrity record is appended to the file (after the ELF data, where
the loader never looks): the byte count and SHA-256 of everything before it. :func:`read_metadata`
checks it before anything maps the library, so a truncated or damaged copy is a
:class:`ModelFormatError` instead of a SIGBUS when the loader touches the missing pages.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

from .errors import IncompatibleModuleError, ModelFormatError, PathError
from .version import __version__, same_minor

FORMAT_VERSION = 2
_BEGIN, _END = b"KILN-METADATA-V1:", b":KILN-END"
#: The integrity record: magic, 16 decimal digits of size, SHA-256 in hex, newline (fixed length).
_SEAL = b"\nKILN-SEAL-V1:"
_SEAL_LEN = len(_SEAL) + 16 + 1 + 64 + 1
#: Metadata fields every module needs, and their JSON types.
_REQUIRED = {"format": int, "kiln_version": str, "target": dict, "inputs": list, "outputs": list,
             "kernels": list, "params": int, "flops": int}

#: ELF e_machine values Kiln produces.
ELF_MACHINES = {62: "x86_64", 183: "aarch64", 40: "arm"}


def module_metadata(imported, desc, kernels) -> dict:
    """The metadata every compiled artifact carries (a .so's embedded JSON, an MCU library's
    kiln.json): format, Kiln version, target, inputs, fused kernels, parameters, FLOPs.
    ``imported``: the :class:`compiler.frontends.ImportedModel`; ``desc``: the target description;
    ``kernels``: the :class:`compiler.analysis.KernelInfo` table."""
    return {
        "format": FORMAT_VERSION,
        "kiln_version": __version__,
        "target": desc.to_json(),
        "target_fingerprint": desc.fingerprint(),
        "source": imported.source,
        "inputs": [s.to_json() for s in imported.inputs],
        "kernels": [k.to_json() for k in kernels],
        "params": imported.num_params,
        "flops": sum(k.flops for k in kernels),
    }


def check_version(meta: dict, path) -> None:
    """An :class:`IncompatibleModuleError` unless the module at ``path`` was written in this metadata
    format by a Kiln of the same minor version."""
    if meta.get("format") != FORMAT_VERSION or not same_minor(meta.get("kiln_version", ""), __version__):
        raise IncompatibleModuleError(
            f"{path} was written by Kiln {meta.get('kiln_version', '?')} (metadata format "
            f"{meta.get('format', '?')}); this is Kiln {__version__}: recompile the model"
        )


def _metadata_source(meta: dict) -> str:
    payload = base64.b64encode(json.dumps(meta, sort_keys=True).encode()).decode()
    literal = (_BEGIN.decode() + payload + _END.decode())
    return (
        "/* Kiln module metadata (read from the file bytes by compiler.artifact.read_metadata). */\n"
        '#ifdef __cplusplus\nextern "C" {\n#endif\n'
        '__attribute__((used, visibility("default"))) const char kiln_module_metadata[] = '
        f'"{literal}";\n'
        "#ifdef __cplusplus\n}\n#endif\n"
    )


def _with_metadata(fcompile, meta: dict, workdir: str):
    """Wrap an export ``fcompile`` so the metadata source is compiled into the library."""
    from tvm.support import cc

    base = fcompile or cc.create_shared

    def compile_with_metadata(output, objects, options=None, **kwargs):
        src = os.path.join(workdir, "kiln_metadata.c")
        Path(src).write_text(_metadata_source(meta))
        objects = list(objects) + [src]
        if options is not None:
            kwargs["options"] = options
        return base(output, objects, **kwargs)

    for attr in ("object_format", "get_target_triple", "need_system_lib", "output_format"):
        if hasattr(base, attr):
            setattr(compile_with_metadata, attr, getattr(base, attr))
    return compile_with_metadata


def export(executable, path: str | os.PathLike, meta: dict, fcompile=None) -> Path:
    """Write ``executable`` to ``path`` atomically (a half-written file never replaces a good one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise PathError(f"cannot write the module to {path}: it is a folder; give a file path such as {path / 'model.so'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="kiln-export-") as work:
            tmp = os.path.join(work, "module.so")
            executable.export_library(tmp, fcompile=_with_metadata(fcompile, meta, work))
            seal(tmp)
            os.replace(tmp, path) if _same_fs(work, path.parent) else _copy_replace(tmp, path)
    except OSError as err:
        raise PathError(f"cannot write the module to {path}: {err.strerror or err}") from err
    return path


def seal(path: str | os.PathLike) -> None:
    """Append the integrity record (size and SHA-256 of the file as it is now) to ``path``."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest().encode()
    with open(path, "ab") as f:
        f.write(_SEAL + b"%016d:" % len(data) + digest + b"\n")


def verify_seal(path: Path, data: bytes) -> None:
    """A :class:`ModelFormatError` unless ``data`` (the bytes of ``path``) ends with an integrity record
    that matches what precedes it."""
    tail = data[-_SEAL_LEN:]
    if len(data) < _SEAL_LEN or not tail.startswith(_SEAL):
        raise ModelFormatError(
            f"{path} is damaged or was modified after Kiln wrote it: its integrity record is missing "
            f"(truncated, stripped or edited; {len(data)} bytes); copy it again or recompile")
    size_text, digest = tail[len(_SEAL):].rstrip(b"\n").split(b":")
    size = int(size_text)
    if size != len(data) - _SEAL_LEN:
        raise ModelFormatError(f"{path} is damaged: Kiln wrote {size} bytes of library and {len(data) - _SEAL_LEN} "
                               "are there (truncated or extended); copy it again or recompile")
    if hashlib.sha256(data[:size]).hexdigest().encode() != digest:
        raise ModelFormatError(f"{path} is damaged: its checksum does not match its contents (bit errors or an "
                               "edit after export); copy it again or recompile")


def _same_fs(a, b) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def _copy_replace(src: str, dst: Path) -> None:
    import shutil

    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def elf_machine(path: str | os.PathLike) -> str:
    """The architecture an ELF file was built for (``x86_64``, ``aarch64``, ``arm``)."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise ModelFormatError(f"{path} is not a compiled module (not an ELF shared library)")
    endian = "<" if head[5] == 1 else ">"
    (machine,) = struct.unpack(endian + "H", head[18:20])
    return ELF_MACHINES.get(machine, f"unknown (e_machine={machine})")


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata Kiln compiled into a module, without loading it."""
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"no such module file: {path}")
    if path.is_dir():
        raise ModelFormatError(f"{path} is a folder, not a module file (.so written by `kiln compile`); a "
                               "microcontroller C library folder runs with `kiln run DIR --emulate`")
    elf_machine(path)
    data = path.read_bytes()
    start = data.find(_BEGIN)
    end = data.find(_END, start + 1)
    if start < 0 or end < 0:
        raise IncompatibleModuleError(
            f"{path} has no Kiln metadata: it was not written by Kiln's export (or by a Kiln older "
            "than metadata format 1); recompile it with `kiln compile`"
        )
    try:
        meta = json.loads(base64.b64decode(data[start + len(_BEGIN) : end]))
    except ValueError as err:
        raise ModelFormatError(f"{path}: Kiln metadata is corrupt ({err})") from err
    if not isinstance(meta, dict):
        raise ModelFormatError(f"{path}: Kiln metadata is not a JSON object")
    check_version(meta, path)
    verify_seal(path, data)
    check_fields(meta, path)
    return meta


def check_fields(meta: dict, path) -> None:
    """A :class:`ModelFormatError` naming the first field a module's metadata lacks or holds in the
    wrong type (an edited file), before anything reads it."""
    for key, kind in _REQUIRED.items():
        if not isinstance(meta.get(key), kind):
            raise ModelFormatError(f"{path}: Kiln metadata has no valid {key!r} field (edited or damaged); recompile")
    for spec in meta["inputs"] + meta["outputs"]:
        if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(spec.get("shape"), list)
                and isinstance(spec.get("dtype"), str) and all(isinstance(d, int) and d >= 0 for d in spec["shape"])):
            raise ModelFormatError(f"{path}: Kiln metadata has a malformed input/output entry {str(spec)[:80]}; recompile")
