"""C code generation for microcontroller builds: one self-contained ``model.c`` plus ``model.h``.

The Relax ``main`` function of the fused, scheduled module is a straight sequence of ``call_tir``
calls. :func:`alias_reshapes` turns reshape kernels (pure copies) into ``R.reshape`` bindings, which
cost nothing: the result is an alias of its input's buffer (a row-major reshape keeps the bytes).
:func:`lower_main` turns the sequence into a :class:`Program` (tensors and calls); :func:`emit_kernels`
turns the kernels into C with TVM's ``c`` target; :func:`emit_model_c` and :func:`emit_model_h` write
the library around them: weights as ``static const`` arrays (flash), static ``DLTensor`` descriptors,
one arena for the intermediates (offsets from :mod:`compiler.mcu.plan`), a LIFO workspace allocator
whose region each kernel gets inside that arena, and ``<prefix>_run`` walking the call sequence.

The generated kernels use TVM's packed calling convention
(``int32_t __tvm_ffi_NAME(void* self, void* args, int32_t n, void* result)`` with ``TVMFFIAny``
arguments holding ``DLTensor*``); the few declarations they need are written into ``model.c``, so the
library needs no TVM header, runtime, ``malloc`` or operating system.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import CompileError, InputShapeError, UnsupportedOperatorError
from .plan import ALIGN, Buffer, MemoryPlan, align_up

# -- the program: tensors and calls ------------------------------------------------------------


@dataclass
class Tensor:
    index: int
    name: str  # the model's name for inputs/outputs, the Relax var name otherwise
    shape: tuple[int, ...]
    dtype: str
    kind: str  # "input", "const", "intermediate", "alias" (a reshape: the bytes of tensor ``alias_of``)
    value: np.ndarray | None = None  # constants only
    output_slot: int | None = None  # set when a kernel writes this tensor as a model output
    alias_of: int | None = None  # aliases only: the tensor that owns the buffer (never an alias itself)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class Call:
    step: int
    kernel: str
    args: list[int]  # tensor indices: inputs then outputs (destination-passing style)
    num_outputs: int


@dataclass
class Program:
    tensors: list[Tensor]
    calls: list[Call]
    inputs: list[int]
    outputs: list[int]  # tensor index per model output
    copies: list[tuple[int, int]] = field(default_factory=list)  # (output slot, tensor) copied at the end
    output_names: list[str] = field(default_factory=list)


def _static_shape(ty, what: str) -> tuple[tuple[int, ...], str]:
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(ty, "dtype"):
        raise CompileError(f"{what} is not a tensor ({ty}); microcontroller builds take tensors only")
    from tvm import tirx

    symbolic = [i for i, d in enumerate(shape) if not isinstance(d, (int, tirx.IntImm))]
    if symbolic:
        raise InputShapeError(
            f"{what} has a dynamic shape (dimension(s) {symbolic} symbolic): microcontroller builds need static "
            "shapes, since every buffer is planned at compile time; export the model with fixed shapes or fix "
            "them with input_shapes={...} / --input-shape"
        )
    dims = tuple(int(d) for d in shape)
    return dims, str(ty.dtype)


def alias_reshapes(mod):
    """``mod`` with every reshape kernel (a ``call_tir`` that only copies) rewritten to ``R.reshape``,
    which :func:`lower_main` lowers to an alias of its input instead of a copy."""
    from tvm import relax

    return relax.transform.RewriteDataflowReshape()(mod)


def constant_bytes(func) -> int:
    """Bytes of the distinct constants a Relax function uses (its weights)."""
    from tvm import relax

    seen: dict = {}

    def visit(e):
        if type(e).__name__ in ("GenericConst", "Constant"):
            seen[e] = e.value.numpy().nbytes

    relax.analysis.post_order_visit(func.body, visit)
    return sum(seen.values())


def lower_main(mod, input_names: list[str], output_names: list[str]) -> Program:
    """The call sequence of ``mod["main"]`` (see the module docstring); raises for anything else."""
    import tvm
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")
    reshape = tvm.ir.Op.get("relax.reshape")
    main = mod["main"]
    tensors: list[Tensor] = []
    const_ids: dict = {}

    def new(name, shape, dtype, kind, value=None) -> int:
        tensors.append(Tensor(len(tensors), name, shape, dtype, kind, value))
        return len(tensors) - 1

    values: dict = {}
    inputs = []
    for i, p in enumerate(main.params):
        name = input_names[i] if i < len(input_names) else p.name
        shape, dtype = _static_shape(p.ty, f"input {name!r}")
        idx = new(name, shape, dtype, "input")
        values[p] = idx
        inputs.append(idx)

    def resolve(expr):
        kind = type(expr).__name__
        if isinstance(expr, relax.Var):
            if expr not in values:
                raise CompileError(f"variable {expr.name} is used before it is defined")
            return values[expr]
        if kind in ("GenericConst", "Constant"):
            key = expr  # TVM objects hash by identity of the underlying node (not of the Python wrapper)
            if key not in const_ids:
                shape, dtype = _static_shape(expr.ty, "a constant")
                const_ids[key] = new(f"const_{len(const_ids)}", shape, dtype, "const", expr.value.numpy())
            return const_ids[key]
        if kind == "Tuple":
            return tuple(resolve(f) for f in expr.fields)
        if kind == "TupleGetItem":
            return resolve(expr.tuple_value)[expr.index]
        raise CompileError(f"cannot lower {kind} expression {expr} in the call sequence")

    calls: list[Call] = []
    unsupported: list[tuple[str, str]] = []
    for block in main.body.blocks:
        for binding in block.bindings:
            var, value = binding.var, binding.value
            if type(binding).__name__ != "VarBinding":
                raise InputShapeError(
                    f"{var.name} is bound by a match_cast (a dynamic shape): microcontroller builds need "
                    "static shapes; fix the input shapes with input_shapes={...} / --input-shape"
                )
            if isinstance(value, relax.Call) and value.op.same_as(call_tir):
                gv, args = value.args[0], value.args[1]
                if len(value.args) > 2:
                    raise InputShapeError(f"kernel {gv.name_hint} takes symbolic shape arguments: "
                                          "microcontroller builds need static shapes")
                ins = [resolve(a) for a in args.fields]
                if any(isinstance(a, tuple) for a in ins):
                    raise CompileError(f"kernel {gv.name_hint} takes a tuple argument")
                out_ty = value.ty_args[0]
                out_tys = list(out_ty.fields) if hasattr(out_ty, "fields") else [out_ty]
                outs = []
                for j, t in enumerate(out_tys):
                    shape, dtype = _static_shape(t, f"the output of kernel {gv.name_hint}")
                    outs.append(new(var.name if len(out_tys) == 1 else f"{var.name}_{j}", shape, dtype,
                                    "intermediate"))
                calls.append(Call(len(calls), gv.name_hint, ins + outs, len(outs)))
                values[var] = outs[0] if not hasattr(out_ty, "fields") else tuple(outs)
            elif isinstance(value, relax.Call) and value.op.same_as(reshape):
                src = resolve(value.args[0])
                if isinstance(src, tuple) or src < 0:
                    raise CompileError(f"cannot alias the reshape {var.name}")
                shape, dtype = _static_shape(var.ty, f"the reshape {var.name}")
                root = tensors[src].alias_of if tensors[src].kind == "alias" else src
                values[var] = new(var.name, shape, dtype, "alias")
                tensors[-1].alias_of = root
            elif isinstance(value, relax.Call):
                op = getattr(value.op, "name", None) or getattr(value.op, "name_hint", None) or str(value.op)
                if op == "relax.call_tir":  # pragma: no cover
                    op = "call_tir"
                unsupported.append((op, var.name))
                values[var] = -1
            else:
                values[var] = resolve(value)
    if unsupported:
        raise UnsupportedOperatorError(unsupported, frontend="microcontroller (no C lowering)")
    result = resolve(main.body.body)
    flat = list(result) if isinstance(result, tuple) else [result]
    if any(isinstance(r, tuple) for r in flat):
        raise CompileError("nested tuple outputs are not supported on microcontroller targets")
    program = Program(tensors, calls, inputs, [])
    for slot, idx in enumerate(flat):
        t = tensors[idx]
        if t.kind == "intermediate" and t.output_slot is None:
            t.output_slot = slot  # the kernel writes straight into the caller's output buffer
        else:
            program.copies.append((slot, idx))
        program.outputs.append(idx)
    program.output_names = [output_names[i] if i < len(output_names) else f"output_{i}"
                            for i in range(len(flat))]
    return program


# -- kernels -----------------------------------------------------------------------------------

_INCLUDE = re.compile(r'^\s*#(include\s+"tvm/.*"|define\s+TVM_EXPORTS)\s*$', re.M)
_FUNC_DEF = re.compile(r"int32_t (__tvm_ffi_\w+)\(void\* self_handle, void\* args, int32_t num_args, void\* result\) \{")
_ALLOC = re.compile(r"(\w+) = \(\([^;]*?TVMBackendAllocWorkspace\(1, dev_id, \(uint64_t\)(\w+?)(?:ULL)?, \d+, \d+\)\)\);")
_FREE = re.compile(r"TVMBackendFreeWorkspace\(1, dev_id, (\w+)\)")


def emit_kernels(mod, kernels: list[str], tvm_target) -> str:
    """C source of ``kernels`` (PrimFunc names in ``mod``), built with TVM's ``c`` target."""
    import tvm

    funcs = {}
    for name in kernels:
        funcs[name] = mod[name].with_attr("global_symbol", name)
    with tvm.transform.PassContext(opt_level=3, config={"tirx.disable_assert": True}):
        try:
            lib = tvm.tirx.build(tvm.IRModule(funcs), tvm_target)
        except Exception as err:  # pylint: disable=broad-except
            raise CompileError(f"C code generation failed: {str(err).strip().splitlines()[-1]}") from err
    src = lib.inspect_source()
    src = _INCLUDE.sub("", src)
    src = src.replace("void* __tvm_ffi__library_ctx = NULL;", "")
    # kernels are private to model.c (two models can be linked into one firmware)
    src = src.replace("TVM_DLL int32_t __tvm_ffi_", "static int32_t __tvm_ffi_")
    return src


def workspace_peaks(csrc: str) -> dict[str, int]:
    """Peak workspace bytes of every kernel in ``csrc``, replaying its (LIFO) alloc/free calls in
    source order with the allocator's alignment: what the shim in ``model.c`` will hand out."""
    peaks: dict[str, int] = {}
    current = None
    stack: list[tuple[str, int]] = []
    top = 0
    events = []
    for m in _FUNC_DEF.finditer(csrc):
        events.append((m.start(), "func", m.group(1)[len("__tvm_ffi_"):]))
    for m in _ALLOC.finditer(csrc):
        events.append((m.start(), "alloc", (m.group(1), m.group(2))))
    for m in _FREE.finditer(csrc):
        events.append((m.start(), "free", m.group(1)))
    if csrc.count("TVMBackendAllocWorkspace(") != len([e for e in events if e[1] == "alloc"]):
        raise CompileError("a kernel allocates a workspace of a size Kiln cannot read (a dynamic size?); "
                           "microcontroller builds need every workspace size known at compile time")
    for _, kind, arg in sorted(events, key=lambda e: e[0]):
        if kind == "func":
            current, stack, top = arg, [], 0
            peaks[current] = 0
        elif kind == "alloc":
            var, size = arg
            try:
                nbytes = int(size, 0)
            except ValueError:
                raise CompileError(f"kernel {current} allocates a workspace of non-constant size {size!r}") from None
            start = align_up(top)
            stack.append((var, top))
            top = start + nbytes
            peaks[current] = max(peaks[current], top)
        else:
            while stack:
                var, before = stack.pop()
                if var == arg:
                    top = before
                    break
    return peaks


# -- the library -------------------------------------------------------------------------------

_DL_CODES = {"float": 2, "int": 0, "uint": 1, "bfloat": 4}
_C_TYPES = {"float32": "float", "float64": "double", "int8": "int8_t", "uint8": "uint8_t", "int16": "int16_t",
            "uint16": "uint16_t", "int32": "int32_t", "uint32": "uint32_t", "int64": "int64_t",
            "uint64": "uint64_t", "bool": "uint8_t", "float16": "uint16_t"}


def c_type(dtype: str) -> str:
    if dtype not in _C_TYPES:
        raise CompileError(f"dtype {dtype} has no C type on microcontroller targets")
    return _C_TYPES[dtype]


def _dl_dtype(dtype: str) -> str:
    if dtype == "bool":
        return "{6, 8, 1}"
    m = re.fullmatch(r"([a-z]+?)(\d+)", dtype)
    if not m or m.group(1) not in _DL_CODES:
        raise CompileError(f"dtype {dtype} is not supported on microcontroller targets")
    return f"{{{_DL_CODES[m.group(1)]}, {m.group(2)}, 1}}"


def c_ident(name: str) -> str:
    ident = re.sub(r"\W", "_", name)
    return ident if ident and not ident[0].isdigit() else f"t_{ident}"


def _words(arr: np.ndarray) -> list[str]:
    raw = np.ascontiguousarray(arr).tobytes()
    raw += b"\0" * (-len(raw) % 4)
    words = np.frombuffer(raw, dtype="<u4")
    return [f"0x{w:08x}u" for w in words]


def build_plan(program: Program, ws_peaks: dict[str, int]) -> MemoryPlan:
    """The arena plan: intermediates live from their producing call to their last reader; each
    call's workspace lives during that call."""
    from .plan import plan

    last_use: dict[int, int] = {}
    first: dict[int, int] = {}

    def owner(idx: int) -> int:  # an alias (reshape) keeps its owner's buffer alive
        alias = program.tensors[idx].alias_of
        return idx if alias is None else alias

    for call in program.calls:
        for pos, idx in enumerate(call.args):
            if pos >= len(call.args) - call.num_outputs:
                first.setdefault(idx, call.step)
            last_use[owner(idx)] = call.step
    end = len(program.calls)
    for _, idx in program.copies:  # copied into an output after the last call
        last_use[owner(idx)] = end
    buffers = []
    for t in program.tensors:
        if t.kind == "intermediate" and t.output_slot is None:
            buffers.append(Buffer(f"t{t.index}", t.nbytes, first.get(t.index, 0), last_use.get(t.index, 0)))
    for call in program.calls:
        ws = ws_peaks.get(call.kernel, 0)
        if ws:
            buffers.append(Buffer(f"ws{call.step}", ws, call.step, call.step, kind="workspace"))
    return plan(buffers)


def emit_model_h(program: Program, plan: MemoryPlan, prefix: str, target_name: str, weights_bytes: int,
                 precision: str = "fp32") -> str:
    P = prefix.upper()
    int8 = [
        " *",
        " * Precision int8 (post-training quantization): convolution and matmul weights are int8 with one",
        " * scale per output channel, biases int32, accumulation int32, and the intermediates between",
        " * quantized layers are 8-bit in the arena. The API is unchanged: inputs and outputs are float32,",
        " * quantized on entry and dequantized to float32 at the outputs inside the run function.",
    ] if precision == "int8" else []
    lines = [
        f"/* {prefix}.h: a model compiled by Kiln for {target_name}.",
        " *",
        " * Self-contained C library: no TVM runtime, no malloc, no operating system. Link model.c",
        " * (see the Makefile or model.cmake) and call:",
        " *",
        f" *     int {prefix}_run(<one pointer per input>, <one pointer per output>);",
        " *",
        " * Inputs and outputs are dense row-major (C-contiguous) arrays of the shapes below, owned by the",
        " * caller. Returns 0 on success, or the non-zero status of the kernel that failed. Intermediates",
        f" * live in one static arena of {P}_ARENA_BYTES bytes (.bss) planned at compile time; weights are",
        " * static const arrays (flash). Not reentrant: one call at a time.",
        *int8,
        " */",
        f"#ifndef {P}_H_",
        f"#define {P}_H_",
        "#include <stdint.h>",
        "",
        "#ifdef __cplusplus",
        'extern "C" {',
        "#endif",
        "",
        f"#define {P}_NUM_INPUTS {len(program.inputs)}",
        f"#define {P}_NUM_OUTPUTS {len(program.outputs)}",
        f"#define {P}_ARENA_BYTES {plan.arena_bytes}u  /* intermediates + kernel workspaces, shared by liveness */",
        f"#define {P}_INTERMEDIATE_BYTES {plan.tensor_bytes}u  /* sum of all intermediates (no reuse) */",
        f"#define {P}_WORKSPACE_BYTES {plan.workspace_bytes}u  /* the largest kernel workspace (inside the arena) */",
        f"#define {P}_WEIGHTS_BYTES {weights_bytes}u  /* constant data in flash */",
        f'#define {P}_PRECISION "{precision}"',
        "",
    ]
    params = []
    for role, idxs, names in (("INPUT", program.inputs, [program.tensors[i].name for i in program.inputs]),
                              ("OUTPUT", program.outputs, program.output_names)):
        for k, (idx, name) in enumerate(zip(idxs, names)):
            t = program.tensors[idx]
            shape = ", ".join(str(d) for d in t.shape)
            lines += [
                f"/* {role.lower()} {k}: {name} {list(t.shape)} {t.dtype} */",
                f'#define {P}_{role}_{k}_NAME "{name}"',
                f"#define {P}_{role}_{k}_NDIM {len(t.shape)}",
                f"#define {P}_{role}_{k}_SHAPE {{{shape}}}",
                f"#define {P}_{role}_{k}_SIZE {t.numel}u  /* elements */",
                f"#define {P}_{role}_{k}_BYTES {t.nbytes}u",
                f"typedef {c_type(t.dtype)} {prefix}_{role.lower()}_{k}_t;",
                "",
            ]
            const = "const " if role == "INPUT" else ""
            params.append(f"{const}{c_type(t.dtype)}* {c_ident(name)}")
    lines += [
        "/* Run the model: inputs first, then outputs, in the order above. Returns 0 on success. */",
        f"int {prefix}_run({', '.join(params)});",
        "",
        "#ifdef __cplusplus",
        "}",
        "#endif",
        f"#endif  /* {P}_H_ */",
        "",
    ]
    return "\n".join(lines)


_SHIM = r"""
/* ---- the few DLPack / TVM-FFI declarations the generated kernels use (ABI-compatible subset) ---- */
typedef struct { int32_t device_type; int32_t device_id; } DLDevice;
typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } DLDataType;
typedef struct {
  void* data; DLDevice device; int32_t ndim; DLDataType dtype;
  int64_t* shape; int64_t* strides; uint64_t byte_offset;
} DLTensor;
typedef struct {
  int32_t type_index; uint32_t zero_padding;
  union { int64_t v_int64; double v_float64; void* v_ptr; const char* v_c_str; uint64_t v_uint64; };
} TVMFFIAny;
#define KILN_FFI_DLTENSOR_PTR 7 /* TVMFFITypeIndex kTVMFFIDLTensorPtr */
#define TVM_DLL

/* ---- workspace: a LIFO allocator over the region the memory plan gives the running kernel ---- */
static uint8_t* kiln_ws_base;
static uint32_t kiln_ws_cap;
static uint32_t kiln_ws_top;
static void* TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int code, int bits) {
  uint32_t start = (kiln_ws_top + (KILN_ALIGN - 1u)) & ~(KILN_ALIGN - 1u);
  (void)device_type; (void)device_id; (void)code; (void)bits;
  if ((uint64_t)start + nbytes > kiln_ws_cap) return NULL; /* cannot happen: sizes are planned */
  kiln_ws_top = start + (uint32_t)nbytes;
  return kiln_ws_base + start;
}
static int TVMBackendFreeWorkspace(int device_type, int device_id, void* ptr) {
  (void)device_type; (void)device_id;
  kiln_ws_top = (uint32_t)((uint8_t*)ptr - kiln_ws_base); /* LIFO: back to where this block began */
  return 0;
}
"""


def emit_model_c(program: Program, plan: MemoryPlan, kernels_c: str, ws_peaks: dict[str, int], prefix: str,
                 target_name: str) -> str:
    P = prefix.upper()
    out = [
        f"/* {prefix}.c: generated by Kiln for {target_name}. Do not edit. See {prefix}.h for the API. */",
        "#include <stdint.h>",
        "#include <stddef.h>",
        "#include <stdbool.h>",
        "#include <string.h>",
        "#include <math.h>",
        f'#include "{prefix}.h"',
        f"#define KILN_ALIGN {ALIGN}u",
        "#ifndef KILN_PROFILE_BEGIN  /* optional per-kernel hooks, e.g. for cycle counting */",
        "#define KILN_PROFILE_BEGIN(step, name)",
        "#define KILN_PROFILE_END(step, name)",
        "#endif",
        _SHIM,
        "/* ---- kernels (TVM C codegen) ---- */",
        kernels_c,
        "",
        "/* ---- weights (flash) ---- */",
    ]
    for t in program.tensors:
        if t.kind != "const":
            continue
        words = _words(t.value)
        out.append(f"/* {t.name}: {list(t.shape)} {t.dtype} */")
        out.append(f"static const uint32_t kiln_w{t.index}[{max(len(words), 1)}] __attribute__((aligned({ALIGN}))) = {{")
        for i in range(0, len(words), 8):
            out.append("  " + ", ".join(words[i:i + 8]) + ",")
        if not words:
            out.append("  0u,")
        out.append("};")
    out += ["", "/* ---- arena: intermediates and workspaces, offsets from the static memory plan ---- */",
            f"static uint8_t kiln_arena[{P}_ARENA_BYTES > 0 ? {P}_ARENA_BYTES : 1] __attribute__((aligned({ALIGN})));",
            "", "/* ---- tensor descriptors ---- */"]
    for t in program.tensors:
        shape = ", ".join(str(d) for d in t.shape) or "1"
        out.append(f"static const int64_t kiln_s{t.index}[{max(len(t.shape), 1)}] = {{{shape}}};")
        if t.kind == "const":
            data = f"(void*)kiln_w{t.index}"
        elif t.kind == "intermediate" and t.output_slot is None:
            data = f"(void*)(kiln_arena + {plan.offsets[f't{t.index}']}u)"
        else:  # inputs, outputs and aliases: bound in <prefix>_run
            data = "NULL"
        out.append(f"static DLTensor kiln_t{t.index} = {{{data}, {{1, 0}}, {len(t.shape)}, {_dl_dtype(t.dtype)}, "
                   f"(int64_t*)kiln_s{t.index}, NULL, 0}};  /* {t.kind} {t.name} {list(t.shape)} */")
    max_args = max((len(c.args) for c in program.calls), default=1)
    out += ["",
            "static int kiln_call(int32_t (*f)(void*, void*, int32_t, void*), DLTensor* const* ts, int n) {",
            f"  TVMFFIAny args[{max_args}];",
            "  TVMFFIAny result;",
            "  for (int i = 0; i < n; ++i) {",
            "    args[i].type_index = KILN_FFI_DLTENSOR_PTR;",
            "    args[i].zero_padding = 0;",
            "    args[i].v_ptr = ts[i];",
            "  }",
            "  memset(&result, 0, sizeof(result));",
            "  return (int)f(NULL, args, n, &result);",
            "}", ""]
    params, binds = [], []
    for idx in program.inputs:
        t = program.tensors[idx]
        params.append(f"const {c_type(t.dtype)}* {c_ident(t.name)}")
        binds.append(f"  kiln_t{idx}.data = (void*){c_ident(t.name)};")
    for slot, (idx, name) in enumerate(zip(program.outputs, program.output_names)):
        t = program.tensors[idx]
        params.append(f"{c_type(t.dtype)}* {c_ident(name)}")
        if t.output_slot == slot:
            binds.append(f"  kiln_t{idx}.data = (void*){c_ident(name)};")
    for t in program.tensors:  # reshapes: the owner's bytes, no copy
        if t.kind == "alias":
            binds.append(f"  kiln_t{t.index}.data = kiln_t{t.alias_of}.data;  /* reshape of {program.tensors[t.alias_of].name} */")
    out.append(f"int {prefix}_run({', '.join(params)}) {{")
    out.append("  int kiln_rc;")
    out += binds
    for call in program.calls:
        arglist = ", ".join(f"&kiln_t{i}" for i in call.args)
        out.append(f"  {{ /* step {call.step}: {call.kernel} */")
        out.append(f"    static DLTensor* const ts[{len(call.args)}] = {{{arglist}}};")
        ws = ws_peaks.get(call.kernel, 0)
        if ws:
            out.append(f"    kiln_ws_base = kiln_arena + {plan.offsets[f'ws{call.step}']}u; kiln_ws_cap = {ws}u; kiln_ws_top = 0;")
        out.append(f'    KILN_PROFILE_BEGIN({call.step}, "{call.kernel}");')
        out.append(f"    kiln_rc = kiln_call(__tvm_ffi_{call.kernel}, ts, {len(call.args)});")
        out.append(f'    KILN_PROFILE_END({call.step}, "{call.kernel}");')
        out.append("    if (kiln_rc != 0) return kiln_rc;")
        out.append("  }")
    for slot, idx in program.copies:
        t = program.tensors[idx]
        dst = c_ident(program.output_names[slot])
        out.append(f"  memcpy({dst}, kiln_t{idx}.data, {t.nbytes}u);")
    out += ["  return 0;", "}", ""]
    return "\n".join(out)
