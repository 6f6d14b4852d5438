"""Constant folding of ONNX graphs whose input shapes have been fixed.

Real-world exports compute shapes at run time (``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``,
``ConstantOfShape`` of a computed shape, ``Range`` up to ``x.shape[1]``). TVM's Relax importer handles
these badly, but once every graph input has a static shape they are all constants. This module turns
them into initializers before the graph reaches TVM:

1. run ONNX shape inference (with data propagation) so that every tensor whose shape is static says so;
2. walk the nodes in topological order and replace by initializers
   * ``Constant`` nodes,
   * ``Shape`` and ``Size`` nodes whose input has a fully static inferred shape,
   * every deterministic default-domain node whose inputs are all constants, evaluated one node at a
     time with ``onnx.reference.ReferenceEvaluator`` (pure numpy, every standard operator, exact);
3. repeat until nothing changes (a folded ``Reshape`` shape can make a later ``Shape`` static), then
   drop nodes and initializers that no graph output depends on.

ONNX Runtime's offline basic optimisation would also fold these, but it rewrites into
``com.microsoft`` fused operators at higher levels and needs a session per model; the reference
evaluator keeps the graph in the default domain and folds only what is constant.

An ``If`` whose condition folds to a constant is replaced by its taken branch (exporters guard
``squeeze(-1)`` and similar with a run-time shape test; a frozen input picks a branch).

Not folded on purpose: random and quantisation operators (folding ``DequantizeLinear`` would turn
quantised weights into float ones), control flow and sequence operators, and outputs that would be
large *and* larger than the node's inputs (folding an ``Expand`` to a huge tensor only bloats the
model; TVM handles such nodes once their shape input is constant).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference
from onnx.reference import ReferenceEvaluator

logger = logging.getLogger(__name__)

#: Outputs with more elements than this are folded only when they are no larger than the inputs.
FOLD_SIZE_LIMIT = 1 << 20

#: Operators never folded even when their inputs are constant (see the module docstring).
NEVER_FOLD = frozenset(
    {
        "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
        "Bernoulli", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
        "If", "Loop", "Scan", "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase",
        "SequenceAt", "SequenceLength", "SplitToSequence", "ConcatFromSequence", "Optional",
        "OptionalHasElement", "OptionalGetElement",
    }
)

_DEFAULT_DOMAINS = ("", "ai.onnx")


def default_opset(model: onnx.ModelProto) -> int:
    """The model's version of the default ONNX operator set."""
    for entry in model.opset_import:
        if entry.domain in _DEFAULT_DOMAINS:
            return entry.version
    return onnx.defs.onnx_opset_version()


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference with data propagation (without it if data propagation fails: its
    per-operator rules are younger than shape inference's); returns the model unchanged if
    inference fails."""
    try:
        return shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as err:  # noqa: BLE001 - inference is an optimisation, never fatal
        logger.debug("ONNX shape inference with data propagation failed, retrying without: %s", err)
    try:
        return shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=False)
    except Exception as err:  # noqa: BLE001
        logger.warning("ONNX shape inference failed, folding without it: %s", err)
        return model


def static_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    """Names of the tensors whose shape is fully known, with that shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        ttype = info.type.tensor_type
        if not info.type.HasField("tensor_type") or not ttype.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim]
        if all(d >= 0 for d in dims):
            shapes[info.name] = tuple(dims)
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def fold_constants(model: onnx.ModelProto, max_rounds: int = 16) -> onnx.ModelProto:
    """Fold constant and shape subgraphs to a fixpoint; returns the new model (input unchanged)."""
    for round_no in range(max_rounds):
        model = infer_shapes(model)
        folded = _fold_pass(model)
        logger.debug("fold round %d: %d node(s) folded", round_no, folded)
        if not folded:
            break
    remove_dead_nodes(model.graph)
    return model


class _Constants:
    """Initializer values by name, converted to numpy only when a node needs them."""

    def __init__(self, graph: onnx.GraphProto):
        self._protos = {init.name: init for init in graph.initializer}
        self._arrays: dict[str, np.ndarray] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._protos or name in self._arrays

    def get(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self._protos[name])
        return self._arrays[name]

    def add(self, name: str, value: np.ndarray) -> None:
        self._arrays[name] = value


def _fold_pass(model: onnx.ModelProto) -> int:
    """One topological sweep; returns how many nodes were replaced by initializers or inlined."""
    graph = model.graph
    opset = default_opset(model)
    consts = _Constants(graph)
    shapes = static_shapes(graph)
    kept: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    folded = 0
    for node in graph.node:
        branch = _taken_branch(node, consts)
        if branch is not None:  # an If on a constant condition: its taken branch, inlined
            kept.extend(_inline(node, branch, new_inits))
            folded += 1
            continue
        values = _try_fold(node, consts, shapes, opset)
        if values is None:
            kept.append(node)
            continue
        folded += 1
        for name, value in zip(node.output, values):
            if name:
                consts.add(name, value)
                shapes[name] = value.shape
                new_inits.append(numpy_helper.from_array(value, name))
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
        graph.initializer.extend(new_inits)
        done = {init.name for init in new_inits}
        kept_info = [vi for vi in graph.value_info if vi.name not in done]
        del graph.value_info[:]
        graph.value_info.extend(kept_info)
    return folded


def _taken_branch(node: onnx.NodeProto, consts: _Constants) -> onnx.GraphProto | None:
    """The branch an ``If`` takes when its condition is a constant, else None."""
    if node.op_type != "If" or node.domain not in _DEFAULT_DOMAINS or node.input[0] not in consts:
        return None
    cond = consts.get(node.input[0])
    if cond.size != 1:
        return None
    branches = {attr.name: attr.g for attr in node.attribute}
    return branches.get("then_branch" if bool(cond.reshape(())) else "else_branch")


def _inline(node: onnx.NodeProto, branch: onnx.GraphProto, new_inits: list) -> list[onnx.NodeProto]:
    """The branch's nodes (they read the outer graph's names directly; ONNX names are unique across
    subgraphs), its initializers moved to the outer graph, and an ``Identity`` per ``If`` output."""
    new_inits.extend(branch.initializer)
    nodes = list(branch.node)
    for inner, outer in zip(branch.output, node.output):
        if outer:
            nodes.append(onnx.helper.make_node("Identity", [inner.name], [outer],
                                               name=f"{node.name or 'If'}/{outer}"))
    return nodes


def _try_fold(node, consts: _Constants, shapes, opset: int) -> list[np.ndarray] | None:
    """The node's output values if it can be folded, else None."""
    if node.domain not in _DEFAULT_DOMAINS or node.op_type in NEVER_FOLD:
        return None
    if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in node.attribute):
        return None
    if node.op_type in ("Shape", "Size") and node.input[0] in shapes:
        return [_shape_value(node, shapes[node.input[0]])]
    inputs = [name for name in node.input if name]
    if not all(name in consts for name in inputs):
        return None
    feeds = {name: consts.get(name) for name in inputs}
    try:
        outputs = ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds)
    except Exception as err:  # noqa: BLE001 - an unfoldable node simply stays in the graph
        logger.debug("not folding %s (%s): %s", node.name, node.op_type, err)
        return None
    if not all(isinstance(out, np.ndarray) or np.isscalar(out) for out in outputs):
        return None
    outputs = [np.asarray(out) for out in outputs]
    in_size = sum(value.size for value in feeds.values())
    if any(out.size > FOLD_SIZE_LIMIT and out.size > in_size for out in outputs):
        return None
    return outputs


def _shape_value(node: onnx.NodeProto, shape: tuple[int, ...]) -> np.ndarray:
    """Value of a ``Shape`` (with optional start/end) or ``Size`` node on a static shape."""
    if node.op_type == "Size":
        return np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
    attrs = {attr.name: attr.i for attr in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    return np.array(shape[start:end], dtype=np.int64)


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Every name read inside the node's subgraphs (conservatively, including inner names)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in graphs:
            for inner in sub.node:
                names.update(inner.input)
                names |= _subgraph_inputs(inner)
            names.update(out.name for out in sub.output)
    return names


def remove_dead_nodes(graph: onnx.GraphProto) -> None:
    """Drop nodes, initializers and value_info that no graph output depends on."""
    needed = {out.name for out in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(node.input)
            needed |= _subgraph_inputs(node)
    kept.reverse()
    inits = [init for init in graph.initializer if init.name in needed]
    infos = [vi for vi in graph.value_info if vi.name in needed]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    del graph.value_info[:]
    graph.value_info.extend(infos)
