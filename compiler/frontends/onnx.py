"""Kiln's ONNX frontend: an ONNX model in, a Relax module with static shapes out.

TVM's Relax ONNX importer fails on much of what exporters produce (shape arithmetic, ``ConstantOfShape``
of computed shapes, ``Range`` up to a tensor's length, LSTM/GRU) and fails with raw tracebacks. Kiln
therefore prepares the graph first and reports every problem as a :class:`~compiler.errors.KilnError`:

1. **load and check** the file: missing, truncated or garbage files, dangling references
   (:class:`ModelFormatError`);
2. **freeze** the ``constant_inputs`` to initializers (:mod:`.onnx_freeze`), then **resolve the other
   inputs**: every graph input (initializers excluded) needs a static shape, from the model or from
   ``input_shapes``; symbolic dimensions without an entry, and entries that name no input, are
   :class:`InputShapeError`. An ``input_dtypes`` entry that differs from the model's dtype inserts a
   ``Cast``, so the compiled function accepts that dtype;
3. **fix the input shapes in the graph and fold constants** (:mod:`.onnx_fold`): shape inference, then
   ``Shape``/``Gather``/``Concat``/``Range``/``ConstantOfShape``... subgraphs become initializers and an
   ``If`` on a constant condition becomes its taken branch;
4. **check the operators** of the folded graph against TVM's converter table plus what Kiln rewrites
   itself, listing every unsupported operator type with its nodes at once
   (:class:`UnsupportedOperatorError`); ``Loop`` and ``Scan`` are refused as control flow;
5. **unroll LSTM and GRU** into primitive operators, also inside the branches of an ``If`` that
   stays (:mod:`.onnx_rnn`);
6. **import** with ``relax.frontend.onnx``, weights bound as constants; a converter failure becomes a
   :class:`CompileError` naming the node.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from typing import Iterator, Sequence

import numpy as np
import onnx
import tvm
from onnx import helper
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as _tvm_onnx

from ..errors import CompileError, InputShapeError, ModelFormatError, UnsupportedOperatorError, suggest
from . import ImportedModel, TensorSpec, onnx_ops
from .onnx_fold import default_opset, fold_constants
from .onnx_freeze import freeze_inputs
from .onnx_rnn import RNN_OPS, attribute_problems, rewrite_rnns

logger = logging.getLogger(__name__)

_DEFAULT_DOMAINS = ("", "ai.onnx")
#: Operators TVM's importer handles outside its converter table.
_TVM_BUILTIN_OPS = frozenset({"If", "Constant"})
#: Control flow TVM 0.27's importer cannot convert, with what to say about it.
_LOOPS = {
    "Loop": "control flow: TVM 0.27 has no Loop converter and Kiln does not unroll loops",
    "Scan": "control flow: TVM 0.27 has no Scan converter and Kiln does not unroll scans",
}
SUPPORTED_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                    "float16", "bfloat16", "float32", "float64")


def import_onnx(
    model: str | os.PathLike | onnx.ModelProto,
    input_shapes: dict[str, Sequence[int]] | None = None,
    input_dtypes: dict[str, str] | None = None,
    constant_inputs: dict | None = None,
) -> ImportedModel:
    """Import an ONNX model (path or ``ModelProto``, which is not modified) into a Relax module.

    ``input_shapes`` fixes the shape of inputs with symbolic dimensions, e.g.
    ``{"input": (1, 3, 224, 224)}``; ``input_dtypes`` changes the dtype an input is accepted in;
    ``constant_inputs`` freezes inputs to values (:mod:`.onnx_freeze`): they fold into the graph and
    the imported module does not take them.
    """
    proto, where = _load(model)
    num_params = _count_params(proto)
    _check_structure(proto, where)
    _normalize(proto)
    freeze_inputs(proto, constant_inputs, other_args={"input_shapes": input_shapes, "input_dtypes": input_dtypes})
    specs = _input_specs(proto.graph, dict(input_shapes or {}), dict(input_dtypes or {}))
    _apply_input_specs(proto, specs)
    proto = fold_constants(proto)
    _check_operators(proto)  # on the folded graph: frozen inputs may have removed control flow
    proto, failures = rewrite_rnns(proto)
    if failures:
        raise UnsupportedOperatorError(failures)
    logger.info("importing %s: %d nodes after folding and rewriting", where, len(proto.graph.node))
    mod = _to_relax(proto, specs, where)
    return ImportedModel(mod, inputs=specs, output_names=[o.name for o in proto.graph.output], source="onnx",
                         num_params=num_params)


def _count_params(proto: onnx.ModelProto) -> int:
    """Elements of the floating-point initializers: the model's weights."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    return sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type in floats)


# ---------------------------------------------------------------- loading and structure


def _load(model) -> tuple[onnx.ModelProto, str]:
    """A private copy of the model and a name for it in messages."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy, f"ONNX model {model.graph.name or '<unnamed>'!r}"
    if not isinstance(model, (str, os.PathLike)):
        raise ModelFormatError(f"expected a path or an onnx.ModelProto, got {type(model).__name__}")
    path = os.fspath(model)
    if not os.path.exists(path):
        raise ModelFormatError(f"model file {path!r} does not exist")
    if not os.path.isfile(path):
        raise ModelFormatError(f"model path {path!r} is not a file")
    try:
        return onnx.load(path), repr(path)
    except Exception as err:  # noqa: BLE001 - protobuf DecodeError, missing external data, ...
        raise ModelFormatError(
            f"{path!r} is not a readable ONNX model ({type(err).__name__}: {_first_line(err)}); "
            "the file may be truncated, corrupt or not an ONNX file"
        ) from err


def _check_structure(model: onnx.ModelProto, where: str) -> None:
    """Reject models that parsed but cannot be a complete graph (empty, truncated, dangling names)."""
    graph = model.graph
    if not model.ir_version or (not graph.node and not graph.output):
        raise ModelFormatError(f"{where} contains no ONNX graph (empty file or not an ONNX model)")
    if not graph.output:
        raise ModelFormatError(f"{where}: the graph has no outputs")
    defined = {vi.name for vi in graph.input} | {init.name for init in graph.initializer}
    problems = []
    for node in graph.node:
        for name in node.input:
            if name and name not in defined:
                problems.append(f"node {node.name or node.op_type!r} ({node.op_type}) reads {name!r}")
        defined.update(node.output)
    problems += [f"graph output {out.name!r}" for out in graph.output if out.name not in defined]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ModelFormatError(
            f"{where} refers to tensors that no input, initializer or earlier node defines: {shown} "
            "(the file may be truncated, or the graph is not topologically sorted)"
        )


def _normalize(model: onnx.ModelProto) -> None:
    """Initializers out of the inputs, a name on every node, stale symbolic shape annotations dropped."""
    graph = model.graph
    inits = {init.name for init in graph.initializer}
    real_inputs = [vi for vi in graph.input if vi.name not in inits]
    del graph.input[:]
    graph.input.extend(real_inputs)
    model.ir_version = max(model.ir_version, 4)  # initializers need not be inputs from IR 4 on
    taken = {node.name for node in graph.node}
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = _fresh(f"{node.op_type}_{i}", taken)
    del graph.value_info[:]
    for out in graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")


def _fresh(name: str, taken: set[str]) -> str:
    base, i = name, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


# ---------------------------------------------------------------- inputs


def _dims(info: onnx.ValueInfoProto) -> list[int | str] | None:
    """Declared dimensions (ints, or symbol names / '?' for unknown ones); None for unknown rank."""
    ttype = info.type.tensor_type
    if not ttype.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
            for d in ttype.shape.dim]


def _dtype_name(elem_type: int) -> str:
    if elem_type == onnx.TensorProto.BFLOAT16:
        return "bfloat16"
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name


def _input_specs(graph, shapes: dict, dtypes: dict) -> list[TensorSpec]:
    """The static shape and dtype of every graph input, from the model and the user's overrides."""
    names = [vi.name for vi in graph.input]
    for arg, given in (("input_shapes", shapes), ("input_dtypes", dtypes)):
        for key in given:
            if key not in names:
                raise InputShapeError(
                    f"{arg} names {key!r}, which is not an input of the model.{suggest(key, names)} "
                    f"The model's inputs are: {', '.join(names) or '(none)'}"
                )
    specs, missing = [], []
    for info in graph.input:
        if not info.type.HasField("tensor_type"):
            raise InputShapeError(f"input {info.name!r} is not a tensor; only tensor inputs are supported")
        dims = _dims(info)
        if info.name in shapes:
            shape = _user_shape(info.name, shapes[info.name], dims)
        elif dims is None or not all(isinstance(d, int) for d in dims):
            missing.append((info.name, dims))
            continue
        else:
            shape = tuple(dims)
        dtype = _user_dtype(info.name, dtypes.get(info.name, _dtype_name(info.type.tensor_type.elem_type)))
        specs.append(TensorSpec(info.name, shape, dtype))
    if missing:
        raise InputShapeError(_missing_shapes_message(missing))
    return specs


def _missing_shapes_message(missing: list[tuple[str, list | None]]) -> str:
    lines, example = [], {}
    for name, dims in missing:
        if dims is None:
            lines.append(f"input {name!r} has no shape in the model (unknown rank)")
            example[name] = (1, 3, 224, 224)
        else:
            lines.append(f"input {name!r} has symbolic shape ({', '.join(map(str, dims))})")
            example[name] = tuple(d if isinstance(d, int) else 1 for d in dims)
    api = ", ".join(f"{n!r}: {s}" for n, s in example.items())
    cli = " ".join(f"--input-shape {n}:{'x'.join(map(str, s))}" for n, s in example.items())
    return (
        "; ".join(lines) + ". Kiln compiles for static shapes: pass them with "
        f"input_shapes={{{api}}} or on the command line {cli} (using your real sizes)"
    )


def _user_shape(name: str, shape, dims: list | None) -> tuple[int, ...]:
    """Validate ``input_shapes[name]`` against the model's declared dimensions."""
    try:
        shape = tuple(shape)
        ok = all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in shape)
    except TypeError:
        ok = False
    if not ok:
        raise InputShapeError(f"input_shapes[{name!r}] = {shape!r} is not a sequence of positive integers")
    shape = tuple(int(d) for d in shape)
    if dims is not None and len(dims) != len(shape):
        raise InputShapeError(
            f"input_shapes[{name!r}] = {shape} has rank {len(shape)}, but the model declares "
            f"rank {len(dims)}: ({', '.join(map(str, dims))})"
        )
    for axis, (want, got) in enumerate(zip(dims or [], shape)):
        if isinstance(want, int) and want != got:
            raise InputShapeError(
                f"input_shapes[{name!r}] = {shape} sets dimension {axis} to {got}, but the model fixes it "
                f"to {want}: ({', '.join(map(str, dims))})"
            )
    return shape


def _user_dtype(name: str, dtype) -> str:
    if not isinstance(dtype, str) or dtype not in SUPPORTED_DTYPES:
        raise InputShapeError(
            f"dtype {dtype!r} for input {name!r} is not supported; choose one of {', '.join(SUPPORTED_DTYPES)}"
        )
    return dtype


def _elem_type(dtype: str) -> int:
    if dtype == "bfloat16":
        return onnx.TensorProto.BFLOAT16
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _apply_input_specs(model: onnx.ModelProto, specs: list[TensorSpec]) -> None:
    """Write the static shapes into the graph inputs; cast inputs whose dtype was overridden."""
    graph = model.graph
    taken = {name for node in graph.node for name in node.output} | {vi.name for vi in graph.input}
    for info, spec in zip(graph.input, specs):
        ttype = info.type.tensor_type
        ttype.ClearField("shape")
        ttype.shape.SetInParent()
        for d in spec.shape:
            ttype.shape.dim.add().dim_value = d
        if ttype.elem_type != _elem_type(spec.dtype):
            cast_out = _fresh(f"{spec.name}__kiln_cast", taken)
            _rename_uses(graph, spec.name, cast_out)
            graph.node.insert(0, helper.make_node("Cast", [spec.name], [cast_out], name=cast_out,
                                                  to=ttype.elem_type))
            ttype.elem_type = _elem_type(spec.dtype)


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Make every node (subgraphs included) read ``new`` where it read ``old``."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for sub in _subgraphs(node):
            _rename_uses(sub, old, new)


# ---------------------------------------------------------------- operator support


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    graphs = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attr.graphs)
    return graphs


def _all_nodes(graph: onnx.GraphProto, depth: int = 0) -> Iterator[tuple[onnx.NodeProto, int]]:
    for node in graph.node:
        yield node, depth
        for sub in _subgraphs(node):
            yield from _all_nodes(sub, depth + 1)


def tvm_supported_ops() -> frozenset[str]:
    """Operator types TVM's Relax ONNX importer converts."""
    return frozenset(_tvm_onnx._get_convert_map()) | _TVM_BUILTIN_OPS


def _check_operators(model: onnx.ModelProto) -> None:
    """Raise one UnsupportedOperatorError listing every node Kiln cannot import."""
    supported = tvm_supported_ops()
    problems: list[tuple[str, str]] = []
    for node, depth in _all_nodes(model.graph):
        default = node.domain in _DEFAULT_DOMAINS
        if default and node.op_type in RNN_OPS:
            problems += [(f"{node.op_type} with {p}", node.name) for p in attribute_problems(node)]
        elif default and node.op_type in _LOOPS:
            problems.append((f"{node.op_type} ({_LOOPS[node.op_type]})", node.name))
        elif node.op_type not in supported or not (default or node.domain == "com.microsoft"):
            problems.append((node.op_type if default else f"{node.domain}.{node.op_type}", node.name))
    if problems:
        raise UnsupportedOperatorError(problems)


# ---------------------------------------------------------------- TVM import


class _TrackingImporter(_tvm_onnx.ONNXGraphImporter):
    """TVM's importer, with Kiln's converters where TVM's compute something else (:mod:`.onnx_ops`),
    remembering the node being converted so that failures can name it, and checking each node's
    result against the shapes and dtypes ONNX's shape inference gives its outputs: a converter that
    ignores an attribute or fakes an output is refused instead of silently computing something else."""

    current: tuple[str, str] = ("", "")

    def __init__(self, *args, expected: dict | None = None, outputs: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._expected = expected or {}  # tensor name -> (shape, dtype) from ONNX shape inference
        self._outputs = outputs or {}    # node name -> its output names

    def _convert_operator(self, op_name, inputs, attrs, opset):
        node = attrs.get("tvm_custom", {}).get("name", "")
        self.current = (op_name, node)
        kiln = onnx_ops.CONVERTERS.get(op_name)
        if kiln is None:
            sym = super()._convert_operator(op_name, inputs, attrs, opset)
        else:
            def default(new_inputs, new_attrs):
                return _tvm_onnx._get_convert_map()[op_name].get_converter(opset)(
                    self.bb, new_inputs, new_attrs, [self._nodes, self._params])

            sym = kiln(self.bb, inputs, attrs, opset, default)
            if isinstance(sym, relax.Expr):
                sym = self.bb.normalize(sym)
        self._check_result(op_name, node, sym)
        return sym

    def _check_result(self, op_name: str, node: str, sym) -> None:
        if op_name in ("SplitToSequence", "SequenceConstruct", "SequenceInsert", "SequenceErase", "Optional"):
            return  # one sequence-typed output, returned as a tuple of tensors
        names = self._outputs.get(node, [])
        if isinstance(sym, relax.Tuple):
            types = [getattr(f, "ty", None) for f in sym.fields]
        elif isinstance(getattr(sym, "ty", None), relax.TupleType):
            types = list(sym.ty.fields)
        else:
            types = [getattr(sym, "ty", None)]
        problems = []
        for name, ty in zip(names, types):
            want = self._expected.get(name)
            if not name or want is None or not isinstance(ty, relax.TensorType) or ty.shape is None:
                continue
            try:
                got_shape = tuple(int(d) for d in ty.shape)
            except (TypeError, ValueError):
                continue
            want_shape, want_dtype = want
            if want_shape is not None and got_shape != want_shape:
                problems.append(f"output {name!r} has shape {got_shape}, ONNX infers {want_shape}")
            elif want_dtype is not None and str(ty.dtype) != want_dtype:
                problems.append(f"output {name!r} has dtype {ty.dtype}, ONNX infers {want_dtype}")
        if problems:
            raise UnsupportedOperatorError(
                [(f"{op_name} as TVM's converter lowers it ({'; '.join(problems)})", node)])


def _expected_types(model: onnx.ModelProto) -> dict:
    """Shape (None where not static) and dtype of every tensor ONNX's shape inference typed: the
    ``value_info`` that :func:`.onnx_fold.fold_constants` leaves from its last inference round (none if
    inference failed: then nothing is checked)."""
    out = {}
    for vi in list(model.graph.value_info) + list(model.graph.output):
        ttype = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if ttype is None or not ttype.elem_type:
            continue
        try:
            dtype = _dtype_name(ttype.elem_type)
        except Exception:  # noqa: BLE001 - float8/int4 and other types NumPy lacks
            continue
        shape = None
        if ttype.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
            if all(d is not None for d in dims):
                shape = tuple(dims)
        out[vi.name] = (shape, dtype)
    return out


def _to_relax(model: onnx.ModelProto, specs: list[TensorSpec], where: str) -> tvm.IRModule:
    """Run TVM's importer (quietly: it prints and warns) and translate its failures."""
    importer = _TrackingImporter(
        {s.name: list(s.shape) for s in specs}, {s.name: s.dtype for s in specs}, keep_params_in_input=False,
        expected=_expected_types(model), outputs={n.name: list(n.output) for n, _ in _all_nodes(model.graph)},
    )
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            mod = importer.from_onnx(model.graph, default_opset(model))
    except UnsupportedOperatorError:
        raise
    except tvm.error.OpNotImplemented as err:
        op, node = importer.current
        raise UnsupportedOperatorError([(f"{op}: {_first_line(err)}", node)]) from err
    except Exception as err:  # noqa: BLE001 - anything from TVM's converters
        op, node = importer.current
        at = f" at node {node!r} ({op})" if op else ""
        raise CompileError(
            f"TVM's ONNX importer failed on {where}{at}: {type(err).__name__}: {_first_line(err)}"
        ) from err
    if len(mod["main"].params) != len(specs):
        raise CompileError(f"imported main of {where} takes {len(mod['main'].params)} inputs, expected "
                           f"{len(specs)} ({', '.join(s.name for s in specs)})")
    return mod


def _first_line(err: BaseException, limit: int = 400) -> str:
    """The error's first line, with TVM's long ``ir.Op(...)`` reprs cut to the op name."""
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    line = re.sub(r'ir\.Op\(span=.*?name="([^"]+)".*?support_level=\d+\)', r"\1", line)
    return line if len(line) <= limit else line[: limit // 3] + " ... " + line[-(2 * limit) // 3:]
