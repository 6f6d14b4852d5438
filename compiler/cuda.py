"""CUDA builds: device code compiled at build time, GPU checks, inspecting exported device code
(FP16 is ``compiler/precision.py``).

A CUDA build must embed compiled device code (SASS for the target's ``sm_XX``) in the exported
``.so``, so that the module loads on a GPU machine without Python, nvcc or NVRTC there. TVM stores
compiled device code only when its CUDA runtime library (``libtvm_runtime_cuda.so``) is loaded: that
library defines ``ffi.Module.create.cuda``, the constructor of the module holding the fatbin. Without
it, TVM silently falls back to a *source* module and the export carries CUDA C++ to be compiled at
load time.

``libtvm_runtime_cuda.so`` links against the NVIDIA driver library ``libcuda.so.1``, which exists
only on machines with an NVIDIA driver. On a build machine without one (CI, a laptop, this
development machine), ``import tvm`` fails to load it and says nothing. :func:`enable_device_codegen`
fixes that in-process:

1. If a real ``libcuda.so.1`` loads, TVM's CUDA runtime is loaded again (it normally already is).
2. Otherwise Kiln compiles a tiny stub ``libcuda.so.1`` (every ``cu*`` entry point TVM's CUDA runtime
   links against, each returning ``CUDA_ERROR_NO_DEVICE``) with the host C compiler into
   ``${KILN_CACHE:-~/.cache/kiln}/cuda-stub/<hash>/``, ``dlopen``\\ s it by absolute path with
   ``RTLD_GLOBAL``, and loads ``libtvm_runtime_cuda.so`` again. The dynamic loader satisfies the
   runtime's ``DT_NEEDED libcuda.so.1`` with the already-loaded object of that soname.

Why not ``LD_LIBRARY_PATH``, as the recipe in the notes does: glibc reads ``LD_LIBRARY_PATH`` once,
when the process starts; setting it from Python has no effect on later ``dlopen`` calls, so it would
need a subprocess for every build (and a way to bring the executable back). Preloading by absolute
path works in the running process, even after ``import tvm``, and costs nothing on a machine with a
real driver (step 1). The stub never runs a kernel: with it ``tvm.cuda(0).exist`` stays false, so
Kiln never tries to execute on it (:func:`has_gpu`).

Device code is compiled by ``nvcc`` (``TVM_CUDA_COMPILE_MODE=nvcc`` during the build): a fatbin with
SASS for exactly the target's architecture. nvcc missing is a :class:`TargetError` naming the fix.
``TVM_KERNEL_DUMP=<dir>`` (TVM's own switch) dumps the ``.cu``, PTX, cubin and fatbin of a build.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from targets import has_gpu  # noqa: F401  (compiler.cuda.has_gpu: this module's users ask it here)

from .errors import CompileError, IncompatibleModuleError, TargetError

#: Precisions ``compile(..., precision=...)`` accepts (fp16: NVIDIA GPUs; int8: CPUs and microcontrollers).

NVCC_HINT = ("install the CUDA toolkit (`apt-get install nvidia-cuda-toolkit`, or NVIDIA's cuda-toolkit "
             "package) and put its bin/ on PATH, or set CUDA_HOME to the toolkit directory")

#: The driver entry points libtvm_runtime_cuda.so links against (``nm -D --undefined-only``), plus
#: the ones the CUDA runtime library probes. Each returns CUDA_ERROR_NO_DEVICE (100).
_STUB_SOURCE = r"""
/* Kiln build-time stand-in for the NVIDIA driver library (compiler/cuda.py): lets TVM's CUDA
 * runtime load on a machine without a GPU so that builds embed compiled device code. Never runs
 * anything: every entry point reports CUDA_ERROR_NO_DEVICE. */
typedef int CUresult;
#define NO_DEVICE 100
static const char kMsg[] = "no NVIDIA driver: Kiln's build-time stub libcuda.so.1 is loaded";
CUresult cuGetErrorName(CUresult e, const char **s) { (void)e; if (s) *s = "CUDA_ERROR_NO_DEVICE"; return 0; }
CUresult cuGetErrorString(CUresult e, const char **s) { (void)e; if (s) *s = kMsg; return 0; }
CUresult cuInit(unsigned flags) { (void)flags; return NO_DEVICE; }
CUresult cuDriverGetVersion(int *v) { if (v) *v = 0; return NO_DEVICE; }
CUresult cuDeviceGetCount(int *n) { if (n) *n = 0; return NO_DEVICE; }
CUresult cuDeviceGet(int *d, int i) { (void)d; (void)i; return NO_DEVICE; }
CUresult cuDeviceGetName(char *name, int len, int dev) { (void)dev; if (name && len > 0) name[0] = 0; return NO_DEVICE; }
CUresult cuFuncSetAttribute(void *f, int a, int v) { (void)f; (void)a; (void)v; return NO_DEVICE; }
CUresult cuLaunchKernel(void *f, unsigned a, unsigned b, unsigned c, unsigned d, unsigned e, unsigned g,
                        unsigned shm, void *s, void **p, void **x) {
  (void)f; (void)a; (void)b; (void)c; (void)d; (void)e; (void)g; (void)shm; (void)s; (void)p; (void)x;
  return NO_DEVICE;
}
CUresult cuLaunchKernelEx(const void *cfg, void *f, void **p, void **x) { (void)cfg; (void)f; (void)p; (void)x; return NO_DEVICE; }
CUresult cuModuleGetFunction(void **f, void *m, const char *n) { (void)f; (void)m; (void)n; return NO_DEVICE; }
CUresult cuModuleGetGlobal(void **p, unsigned long *b, void *m, const char *n) { (void)p; (void)b; (void)m; (void)n; return NO_DEVICE; }
CUresult cuModuleLoadData(void **m, const void *d) { (void)m; (void)d; return NO_DEVICE; }
CUresult cuModuleUnload(void *m) { (void)m; return NO_DEVICE; }
CUresult cuTensorMapEncodeTiled(void *a, int b, unsigned c, void *d, const void *e, const void *f, const void *g,
                                const void *h, int i, int j, int k, int l) {
  (void)a; (void)b; (void)c; (void)d; (void)e; (void)f; (void)g; (void)h; (void)i; (void)j; (void)k; (void)l;
  return NO_DEVICE;
}
"""


def cache_dir() -> Path:
    """Kiln's cache: ``$KILN_CACHE``, else ``~/.cache/kiln``."""
    return Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln")


# -- tools -----------------------------------------------------------------------------------------
def find_nvcc() -> str | None:
    """The nvcc Kiln builds with: on PATH, else under ``$CUDA_HOME``/``$CUDA_PATH`` or /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    return None


def check_nvcc(target_name: str = "cuda") -> str:
    """nvcc's path, or a :class:`TargetError` saying how to install it."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise TargetError(
            f"a CUDA build for target {target_name!r} needs nvcc (the CUDA toolkit's compiler) to embed "
            f"compiled device code, and it is not installed here (not on PATH, nor in $CUDA_HOME/bin or "
            f"/usr/local/cuda/bin): {NVCC_HINT}"
        )
    return nvcc


def _runtime_loaded() -> bool:
    import tvm_ffi

    return tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None


def _load_tvm_cuda_runtime() -> None:
    from tvm_ffi.libinfo import load_lib_ctypes

    from tvm.base import _LOADED_LIBS

    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
        package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL"
    )


def stub_library() -> Path:
    """The stub ``libcuda.so.1`` (built once with the host C compiler, cached by source hash)."""
    digest = hashlib.sha256(_STUB_SOURCE.encode()).hexdigest()[:12]
    out = cache_dir() / "cuda-stub" / digest / "libcuda.so.1"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise TargetError("building for CUDA on a machine without an NVIDIA driver needs a host C compiler "
                          "(for Kiln's stub libcuda.so.1): `apt-get install gcc`")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiln-cuda-stub-", dir=out.parent) as work:
        src, tmp = os.path.join(work, "stub.c"), os.path.join(work, "libcuda.so.1")
        Path(src).write_text(_STUB_SOURCE)
        proc = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wl,-soname,libcuda.so.1", "-o", tmp, src],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise TargetError(f"cannot build Kiln's stub libcuda.so.1 with {cc}: {proc.stderr.strip()}")
        os.replace(tmp, out)  # atomic: a concurrent build sees the old file or the new one
    return out


_STUB_HANDLE = None


def enable_device_codegen(target_name: str = "cuda") -> str:
    """Make sure TVM's CUDA runtime is loaded, so builds store compiled device code (module docstring).

    Returns ``"driver"`` (a real libcuda.so.1) or ``"stub"`` (Kiln's stand-in). Raises
    :class:`TargetError` when neither works (e.g. the CUDA runtime library libcudart is missing)."""
    global _STUB_HANDLE
    import tvm  # noqa: F401  (registers the CUDA backend and tries to load its runtime)

    if _runtime_loaded():
        return "stub" if _STUB_HANDLE is not None else "driver"
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        source = "driver"
    except OSError:
        _STUB_HANDLE = ctypes.CDLL(str(stub_library()), mode=ctypes.RTLD_GLOBAL)
        source = "stub"
    try:
        _load_tvm_cuda_runtime()
    except (OSError, RuntimeError) as err:
        raise TargetError(
            f"cannot load TVM's CUDA runtime (libtvm_runtime_cuda.so) to build for {target_name!r}: {err}. "
            f"It needs the CUDA runtime library libcudart.so.13: {NVCC_HINT}"
        ) from err
    if not _runtime_loaded():  # pragma: no cover - a TVM build without CUDA
        raise TargetError(f"this TVM build has no CUDA runtime (ffi.Module.create.cuda): cannot build for "
                          f"{target_name!r}; install the apache-tvm wheel Kiln pins")
    return source


@contextlib.contextmanager
def build_environment(target_name: str = "cuda"):
    """Everything a CUDA build needs, for the duration of the ``with``: nvcc found (and on PATH for
    TVM, which runs plain ``nvcc``), TVM's CUDA runtime loaded, ``TVM_CUDA_COMPILE_MODE=nvcc``
    (TVM's default, NVRTC, needs the ``cuda-bindings`` package and writes a cubin, not a fatbin)."""
    nvcc = check_nvcc(target_name)
    enable_device_codegen(target_name)
    saved = {k: os.environ.get(k) for k in ("TVM_CUDA_COMPILE_MODE", "PATH")}
    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    bindir = os.path.dirname(nvcc)
    if shutil.which("nvcc") != nvcc:
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- the GPU at run time ---------------------------------------------------------------------------
def _arch_version(arch: str) -> tuple[int, int]:
    digits = arch.removeprefix("sm_").rstrip("af")
    return int(digits[:-1]), int(digits[-1])


def check_device(meta_target: dict, path=None) -> None:
    """An :class:`IncompatibleModuleError` unless this machine has a GPU that runs ``meta_target``'s code.

    SASS for ``sm_XY`` runs on GPUs of compute capability X.Z with Z >= Y (``sm_90a``: exactly 9.0)."""
    what = f"{path} was compiled for" if path else "this module is compiled for"
    name, arch = meta_target.get("name", "?"), meta_target.get("arch", "?")
    if not has_gpu():
        raise IncompatibleModuleError(
            f"{what} the NVIDIA GPU target {name!r} ({arch}) and needs a CUDA GPU to run: this machine has "
            "none (no NVIDIA driver or no device). Run it on a machine with a matching GPU, or recompile "
            "with --target x86 to run on this CPU"
        )
    import tvm

    cc = tuple(int(x) for x in tvm.cuda(0).compute_version.split("."))
    want = _arch_version(arch)
    if cc[0] != want[0] or cc[1] < want[1] or (arch.endswith("a") and cc != want):
        raise IncompatibleModuleError(
            f"{what} {name!r} ({arch}) but this GPU ({tvm.cuda(0).device_name}) has compute capability "
            f"{cc[0]}.{cc[1]}, which cannot run that code: recompile for this GPU (`kiln targets` lists the "
            f"CUDA targets by architecture)"
        )


# -- inspecting device code ------------------------------------------------------------------------
_FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
_EM_CUDA = 190


def device_code(path_or_bytes) -> list[dict]:
    """The device code entries embedded in a file: ``[{"kind": "sass"|"ptx", "arch": "sm_90",
    "bytes": n}, ...]``, read from the CUDA fatbin headers (no cuobjdump needed).

    An empty list means no compiled device code: e.g. a module that carries CUDA source only."""
    data = path_or_bytes if isinstance(path_or_bytes, (bytes, bytearray)) else Path(path_or_bytes).read_bytes()
    found, pos = [], data.find(_FATBIN_MAGIC)
    while pos >= 0:
        try:
            _magic, _version, header, size = struct.unpack_from("<IHHQ", data, pos)
            entry, end = pos + header, pos + header + size
            while entry + 32 <= min(end, len(data)):
                kind, _flags, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
                (sm,) = struct.unpack_from("<I", data, entry + 28)
                body = data[entry + entry_header: entry + entry_header + 20]
                if kind in (1, 2):
                    info = {"kind": "ptx" if kind == 1 else "sass", "arch": f"sm_{sm}", "bytes": payload}
                    if kind == 2 and body[:4] == b"\x7fELF":
                        info["elf_machine"] = struct.unpack_from("<H", body, 18)[0]
                    found.append(info)
                if entry_header == 0:
                    break
                entry += entry_header + payload
        except struct.error:
            pass
        pos = data.find(_FATBIN_MAGIC, pos + 4)
    return found


def device_archs(path_or_bytes) -> set[str]:
    """The ``sm_XX`` architectures a file carries compiled SASS for."""
    return {e["arch"] for e in device_code(path_or_bytes) if e["kind"] == "sass"}


def carries_cuda_source(path_or_bytes) -> bool:
    """True when a file embeds CUDA C++ source (compiled at load time), not just device code."""
    data = path_or_bytes if isinstance(path_or_bytes, (bytes, bytearray)) else Path(path_or_bytes).read_bytes()
    return b'extern "C" __global__' in data


def kernel_source(executable) -> str:
    """The CUDA C++ of every kernel in a built executable (``ex.mod``'s CUDA import), for inspection."""
    out = []

    def walk(m):
        for imp in m.imports:
            if imp.kind == "cuda":  # the in-memory module keeps its source; the export does not
                try:
                    out.append(imp.inspect_source("cuda"))
                except Exception:  # noqa: BLE001
                    pass
            walk(imp)

    walk(executable.mod)
    return "\n".join(out)


def check_device_code(path, arch: str) -> None:
    """A :class:`CompileError` unless the exported ``path`` carries SASS for ``arch``."""
    archs = device_archs(path)
    if arch not in archs:
        raise CompileError(
            f"{path} carries no compiled device code for {arch} (found: {sorted(archs) or 'none'}); the CUDA "
            "runtime was not loaded at build time, so TVM kept CUDA source. See compiler/cuda.py"
        )
