"""Target descriptions as frozen data.

Each ``*.toml`` file in this folder describes one target. A description names everything a
compile, a tuning run or a deployment needs to know about a device: the LLVM triple and CPU, the
ISA features, cores, vector width, cache sizes, memory limits, the cross compiler and how to reach
a device. Descriptions are immutable; variants are made with :func:`dataclasses.replace`.

The special description ``x86`` (``host.toml``) is completed at load time from the machine Kiln runs
on: CPU name from LLVM, features from ``/proc/cpuinfo``, core count from the OS.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

_DIR = Path(__file__).resolve().parent

FAMILIES = ("x86", "arm", "cuda", "mcu")
KINDS = ("llvm", "cuda", "c")

#: Fields that change generated code; the tuning-log key (fingerprint) is computed from these.
_CODEGEN_FIELDS = ("kind", "triple", "cpu", "features", "cores", "vector_bits", "arch", "float_abi")


@dataclass(frozen=True)
class TargetDescription:
    """One compilation target. Load with :func:`get`; never mutate (it is frozen)."""

    name: str
    family: str  # "x86", "arm", "cuda", "mcu"
    kind: str  # TVM target kind: "llvm", "cuda", "c"
    description: str = ""
    triple: str = ""
    cpu: str = ""
    features: tuple[str, ...] = ()
    cores: int = 1
    vector_bits: int = 128
    l1d_kb: int = 0
    l2_kb: int = 0
    l3_kb: int = 0
    flash_kb: int = 0  # microcontrollers: 0 means no limit
    ram_kb: int = 0  # microcontrollers: RAM; CUDA: device memory
    arch: str = ""  # CUDA: "sm_90"
    float_abi: str = ""  # ARM: "hard" / "soft"
    cross_compiler: str = ""  # "" means the host compiler
    remote: str = "local"  # how to reach a device: "local", "rpc", "qemu-aarch64", "qemu-system-arm"
    machine: str = ""  # qemu-system-arm board that emulates it (microcontrollers): "mps2-an386", ...
    host: bool = False  # completed from the machine Kiln runs on
    winograd: bool = False  # 3x3 stride-1 convolutions as Winograd F(m, 3) (compiler/winograd.py)
    aliases: tuple[str, ...] = ()
    llvm_mattr: tuple[str, ...] = field(default=(), repr=False)

    # -- derived -------------------------------------------------------------------------------
    # ``vector_bits`` (a field) is the width of the vectors the generated code uses, which is what
    # the schedule rules size their tiles by: 512 with AVX-512, 256 with AVX2, 128 with NEON (also on
    # SVE parts: TVM's LLVM codegen emits fixed-width NEON, not scalable SVE vectors; see
    # graviton3.toml). The facts below are derived from the fields here, once, for every rule.
    def has(self, feature: str) -> bool:
        """True when the target lists ``feature`` (e.g. ``"avx512f"``, ``"neon"``, ``"dotprod"``)."""
        return feature in self.features

    def vector_lanes(self, dtype: str) -> int:
        """Elements of ``dtype`` (``"float32"``, ``"int8"``, ``"float16"``...) in one vector register:
        ``vector_bits // dtype_bits(dtype)`` (sub-byte types count as bytes), at least 1. 16 for
        float32 with AVX-512, 8 with AVX2, 4 with NEON."""
        return max(self.vector_bits // max(dtype_bits(dtype), 8), 1)

    @property
    def vector_registers(self) -> int:
        """Architectural vector registers the generated code can use: 32 with AVX-512 (zmm0-31) and
        on AArch64 (v0-v31, NEON and SVE alike), 16 with AVX/AVX2 (ymm0-15) and on 32-bit ARM NEON
        (q0-q15), 8 with Arm Helium/MVE (q0-q7); 0 for targets without a CPU vector unit (CUDA, MCUs
        without MVE)."""
        if self.family == "x86":
            return 32 if self.has("avx512f") else 16
        if self.family == "arm":
            return 32 if self.triple.startswith(("aarch64", "arm64")) else 16
        if self.family == "mcu" and any(f.startswith("mve") for f in self.features):
            return 8
        return 0

    @property
    def embedded_broadcast(self) -> bool:
        """True when vector FMAs take a broadcast memory operand (AVX-512:
        ``vfmadd231ps zmm, zmm, [mem]{1to16}``), so a broadcast scalar needs no register."""
        return self.family == "x86" and self.has("avx512f")

    @property
    def l1d_bytes(self) -> int:
        """Level-1 data cache per core in bytes (CUDA: L1/shared memory per SM); 0 when the target
        has none or it is not known."""
        return self.l1d_kb * 1024

    @property
    def l2_bytes(self) -> int:
        """Level-2 cache in bytes (per core or per cluster, as the part has it; CUDA: the whole
        GPU's); 0 when none or not known."""
        return self.l2_kb * 1024

    @property
    def l3_bytes(self) -> int:
        """Last-level (L3) cache in bytes; 0 when the part has none or it is not known."""
        return self.l3_kb * 1024

    @property
    def buildable(self) -> bool:
        """True when Kiln can compile for this target: x86 and ARM Linux (LLVM, ARM by cross-compiling),
        microcontrollers (C), NVIDIA GPUs (CUDA, with nvcc)."""
        return ((self.family in ("x86", "arm") and self.kind == "llvm") or (self.family == "mcu" and self.kind == "c")
                or (self.family == "cuda" and self.kind == "cuda"))

    @property
    def is_cross(self) -> bool:
        """True when code for this target cannot run on the machine Kiln runs on (CUDA: no GPU here)."""
        if self.kind == "cuda":
            if self.triple and not self.triple.startswith("x86_64"):  # a GPU with an ARM host (Jetson)
                return True
            return not has_gpu()
        return not self.triple.startswith("x86_64")

    def fingerprint(self) -> str:
        """A short stable hash of the fields that change generated code (keys tuning logs)."""
        blob = json.dumps({k: _jsonable(getattr(self, k)) for k in _CODEGEN_FIELDS}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def to_tvm(self):
        """The ``tvm.target.Target`` this description compiles for."""
        import tvm  # TVM is imported lazily: listing targets must not pay for it

        if self.kind == "llvm":
            cfg: dict[str, Any] = {"kind": "llvm", "num-cores": self.cores}
            if self.triple:
                cfg["mtriple"] = self.triple
            if self.cpu:
                cfg["mcpu"] = self.cpu
            if self.llvm_mattr:
                cfg["mattr"] = list(self.llvm_mattr)
            if self.float_abi:
                cfg["mfloat-abi"] = self.float_abi
            return tvm.target.Target(cfg)
        if self.kind == "cuda":
            # Host code (VM glue, kernel launches) for any x86-64 CPU, not this build machine's: the
            # GPU machine's CPU may lack its features.
            host = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
            if self.triple:  # a GPU with its own host CPU (Jetson): the host code is cross-compiled
                host = {"kind": "llvm", "mtriple": self.triple, **({"mcpu": self.cpu} if self.cpu else {}),
                        **({"mattr": list(self.llvm_mattr)} if self.llvm_mattr else {})}
            # Limits every NVIDIA GPU from sm_75 on shares (TVM fills them in only when it can query a
            # device): MetaSchedule's GPU rules need them to tune, DLight reads them too.
            return tvm.target.Target({"kind": "cuda", "arch": self.arch, "max_threads_per_block": 1024,
                                      "max_num_threads": 1024, "thread_warp_size": 32,
                                      "max_shared_memory_per_block": 49152}, host=host)
        if self.kind == "c":
            return tvm.target.Target({"kind": "c", "mcpu": self.cpu} if self.cpu else {"kind": "c"})
        raise ValueError(f"target {self.name!r} has unknown kind {self.kind!r}")

    def to_json(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TargetDescription":
        return _from_mapping(data, source="<json>")


_DTYPE_RE = re.compile(r"^(?:u?int|b?float)(\d+)")


def dtype_bits(dtype: str) -> int:
    """Bits of one element of ``dtype`` (a TVM/NumPy dtype string: ``"float32"`` -> 32, ``"int8"`` ->
    8, ``"float8_e4m3fn"`` -> 8, ``"bool"`` -> 8, ``"float32x4"`` -> 32: lanes are not counted).
    ``ValueError`` for a string that is not a dtype."""
    text = str(dtype)
    if text == "bool" or text.startswith("boolx"):
        return 8  # TVM stores bool as one byte
    if text == "handle":
        return 64
    m = _DTYPE_RE.match(text)
    if m is None:
        raise ValueError(f"not a dtype: {dtype!r}")
    return int(m.group(1))


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def _from_mapping(data: Mapping[str, Any], source: str) -> TargetDescription:
    from compiler.errors import TargetError

    names = {f.name for f in dataclasses.fields(TargetDescription)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise TargetError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    for required in ("name", "family", "kind"):
        if required not in data:
            raise TargetError(f"{source}: missing required key {required!r}")
    kwargs = {}
    for key, value in data.items():
        expected = _FIELD_TYPES[key]
        if expected is tuple:
            if not (isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value)):
                raise TargetError(f"{source}: {key!r} must be a list of strings, got {value!r}")
            value = tuple(value)
        elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise TargetError(f"{source}: {key!r} must be {expected.__name__}, got {value!r}")
        elif expected is int and value < 0:
            raise TargetError(f"{source}: {key!r} must not be negative, got {value!r}")
        kwargs[key] = value
    for key, choices in (("family", FAMILIES), ("kind", KINDS)):
        if kwargs[key] not in choices:
            raise TargetError(f"{source}: {key} {kwargs[key]!r} is not one of {', '.join(choices)}")
    return TargetDescription(**kwargs)


#: The Python type each TOML key must have (tuple: a list of strings).
_FIELD_TYPES = {
    f.name: {"str": str, "int": int, "bool": bool}.get(str(f.type), tuple)
    for f in dataclasses.fields(TargetDescription)
}


def resolve(target) -> TargetDescription:
    """A target name (or alias), a :class:`TargetDescription`, or an LLVM ``tvm.target.Target``
    (described as this machine's x86 with that CPU); a ``TargetError`` otherwise."""
    from compiler.errors import TargetError

    if isinstance(target, TargetDescription):
        return target
    if isinstance(target, str):
        return get(target)
    try:
        import tvm

        if isinstance(target, tvm.target.Target) and target.kind.name == "llvm":
            host = get("x86")
            mcpu = str(target.attrs.get("mcpu", ""))
            return dataclasses.replace(host, name=f"llvm-{mcpu or 'generic'}", cpu=mcpu or host.cpu, host=False)
    except ImportError:  # pragma: no cover
        pass
    raise TargetError(f"target must be a name from `kiln targets` or a TargetDescription, not {target!r}")


# -- host detection ----------------------------------------------------------------------------
_X86_FLAG_MAP = {  # /proc/cpuinfo flag -> Kiln feature name
    "avx2": "avx2",
    "fma": "fma",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512vl": "avx512vl",
    "avx512_vnni": "avx512vnni",
    "avx_vnni": "avxvnni",
    "avx512_bf16": "avx512bf16",
    "avx512_fp16": "avx512fp16",
    "amx_bf16": "amx-bf16",
    "amx_int8": "amx-int8",
}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cache_kb(level: int, kind: str) -> int:
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")):
        try:
            if int((idx / "level").read_text()) == level and (idx / "type").read_text().strip() in kind:
                size = (idx / "size").read_text().strip()
                return int(size[:-1]) * (1024 if size.endswith("M") else 1) if size[-1] in "KM" else int(size) // 1024
        except (OSError, ValueError):
            continue
    return 0


def has_gpu() -> bool:
    """True when a CUDA GPU is usable from this process (``tvm.cuda(0).exist``)."""
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001 - no CUDA runtime at all
        return False


@functools.lru_cache(maxsize=1)
def host_description() -> TargetDescription:
    """The description of the machine Kiln runs on (x86-64 Linux), detected once per process."""
    from tvm.target import codegen

    flags = _cpu_flags()
    features = tuple(sorted(k for f, k in _X86_FLAG_MAP.items() if f in flags))
    vector_bits = 512 if "avx512f" in features else 256 if "avx2" in features else 128
    base = _load_file(_DIR / "host.toml")
    return dataclasses.replace(
        base,
        cpu=codegen.llvm_get_system_cpu() or "x86-64",
        features=features,
        cores=len(os.sched_getaffinity(0)),
        vector_bits=vector_bits,
        l1d_kb=_cache_kb(1, "Data Unified") or base.l1d_kb,
        l2_kb=_cache_kb(2, "Unified") or base.l2_kb,
        l3_kb=_cache_kb(3, "Unified") or base.l3_kb,
    )


# -- registry ----------------------------------------------------------------------------------
def _load_file(path: Path) -> TargetDescription:
    from compiler.errors import TargetError

    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise TargetError(f"cannot read target description {path}: {err}") from err
    return _from_mapping(data, source=str(path))


@functools.lru_cache(maxsize=1)
def _registry() -> dict[str, Path]:
    from compiler.errors import TargetError

    reg: dict[str, Path] = {}
    for path in sorted(_DIR.glob("*.toml")):
        desc = _load_file(path)
        for key in (desc.name, *desc.aliases):
            if key in reg:
                raise TargetError(f"target name {key!r} is defined twice: {reg[key].name} and {path.name}")
            reg[key] = path
    return reg


def names() -> list[str]:
    """Every target name and alias Kiln knows."""
    return sorted(_registry())


def get(name: str) -> TargetDescription:
    """The description called ``name`` (or an alias of it); ``UnknownTargetError`` otherwise."""
    from compiler.errors import UnknownTargetError

    path = _registry().get(name)
    if path is None:
        raise UnknownTargetError(name, names())
    desc = _load_file(path)
    if desc.host:
        return host_description()
    return desc


def all_descriptions() -> list[TargetDescription]:
    """One description per file (aliases not repeated), host completed from this machine."""
    seen, out = set(), []
    for name, path in sorted(_registry().items()):
        if path in seen:
            continue
        seen.add(path)
        out.append(get(_load_file(path).name))
    order = {"x86": 0, "arm": 1, "cuda": 2, "mcu": 3}
    return sorted(out, key=lambda d: (order.get(d.family, 9), not d.host, d.name))
