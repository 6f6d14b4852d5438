"""Rewrite ONNX ``LSTM`` and ``GRU`` nodes into primitive operators, unrolled over time.

TVM 0.27's Relax ONNX importer has no converter for LSTM or GRU. Once input shapes are fixed and
constants folded, the sequence length is static and the weights are initializers, so each node can be
replaced by plain ``MatMul``/``Add``/``Mul``/``Sub``/``Sigmoid``/``Tanh``/``Slice``/``Reshape``/
``Concat``/``Transpose`` nodes. ``Slice`` is always emitted in its opset-10+ input form, even in
older models: TVM's importer has only that converter and reads every ``Slice`` that way (the
rewritten graph goes to TVM only, never back to an ONNX runtime):

* the input projection ``X @ W^T + biases`` is one ``MatMul`` over all time steps;
* each step slices its ``[1, batch, G*H]`` row, adds ``H_{t-1} @ R^T``, slices the gates and applies
  the cell equations; states keep a leading unit axis, so no per-step reshapes are needed;
* a zero (absent or all-zero constant) initial state skips the first step's recurrent terms, so the
  batch size never has to be known;
* ``Y``, ``Y_h`` and ``Y_c`` are assembled with ONNX's shapes, for ``layout`` 0 and 1.

Supported: forward, reverse and bidirectional; optional initial states and peepholes (LSTM);
``linear_before_reset`` 0 and 1 (GRU); default activations only. Rejected with a clear error:
custom activations, ``clip``, ``input_forget``, weights that are not constant, a sequence length
that is not static, and ``sequence_lens`` that differ from the full length. The graph grows by
about 15 nodes per time step and direction: fine for the short sequences of typical exports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_fold import infer_shapes, static_shapes

logger = logging.getLogger(__name__)

RNN_OPS = ("LSTM", "GRU")
_DEFAULT_ACTIVATIONS = {"LSTM": ["sigmoid", "tanh", "tanh"], "GRU": ["sigmoid", "tanh"]}
_DIRECTIONS = {"forward": 1, "reverse": 1, "bidirectional": 2}  # direction -> num_directions


def _attrs(node: onnx.NodeProto) -> dict:
    return {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def attribute_problems(node: onnx.NodeProto) -> list[str]:
    """Why this LSTM/GRU node cannot be rewritten, judged from its attributes alone ([] if it can)."""
    attrs = _attrs(node)
    problems = []
    direction = _text(attrs.get("direction", "forward"))
    if direction not in _DIRECTIONS:
        problems.append(f"direction={direction}")
    if "activations" in attrs:
        acts = [_text(a).lower() for a in attrs["activations"]]
        if acts != _DEFAULT_ACTIVATIONS[node.op_type] * _DIRECTIONS.get(direction, 1):
            problems.append(f"activations={','.join(_text(a) for a in attrs['activations'])}")
    if "clip" in attrs:
        problems.append("clip")
    if attrs.get("input_forget", 0):
        problems.append("input_forget=1")
    if attrs.get("layout", 0) not in (0, 1):
        problems.append(f"layout={attrs['layout']}")
    return problems


class _Emitter:
    """Appends nodes and initializers with fresh names derived from one prefix."""

    def __init__(self, prefix: str, taken: set[str]):
        self.prefix, self.taken = prefix, taken
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._ints: dict[tuple[int, ...], str] = {}

    def fresh(self, tag: str) -> str:
        name, i = f"{self.prefix}/{tag}", 0
        while name in self.taken:
            i += 1
            name = f"{self.prefix}/{tag}_{i}"
        self.taken.add(name)
        return name

    def const(self, value: np.ndarray, tag: str = "const") -> str:
        name = self.fresh(tag)
        self.inits.append(numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def ints(self, values: list[int]) -> str:
        """A 1-D int64 constant, shared by every node that needs the same values."""
        key = tuple(values)
        if key not in self._ints:
            self._ints[key] = self.const(np.array(values, dtype=np.int64), "ints")
        return self._ints[key]

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.fresh(op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.fresh(op_type + "_node"), **attrs))
        return out

    def slice(self, data: str, axis: int, start: int, end: int) -> str:
        """``data[start:end]`` along ``axis``, in Slice's input form (see the module docstring)."""
        return self.op("Slice", [data, self.ints([start]), self.ints([end]), self.ints([axis])])

    def chunk(self, data: str, k: int, size: int) -> str:
        """The k-th block of ``size`` along the last axis of a rank-3 tensor."""
        return self.slice(data, 2, k * size, (k + 1) * size)

    def reshape(self, data: str, shape: list[int], out: str | None = None) -> str:
        return self.op("Reshape", [data, self.ints(shape)], out)


@dataclass
class _RnnNode:
    """What one LSTM/GRU node needs to be unrolled, read from the node and the constants."""

    node: onnx.NodeProto
    W: np.ndarray  # [num_dir, G*H, I]
    R: np.ndarray  # [num_dir, G*H, H]
    B: np.ndarray  # [num_dir, 2*G*H]
    P: np.ndarray | None  # [num_dir, 3*H], LSTM peepholes
    seq_len: int
    hidden: int
    direction: str
    layout: int
    linear_before_reset: int

    def input(self, i: int) -> str:
        return self.node.input[i] if len(self.node.input) > i else ""

    def output(self, i: int) -> str:
        return self.node.output[i] if len(self.node.output) > i else ""


def _read_node(node, consts: dict[str, onnx.TensorProto], shapes) -> tuple[_RnnNode | None, str]:
    """Gather the constants of ``node``; returns (None, reason) when they are not available."""
    attrs = _attrs(node)
    gates = 4 if node.op_type == "LSTM" else 3
    direction = _text(attrs.get("direction", "forward"))
    layout = attrs.get("layout", 0)

    def given(i: int) -> str:
        return node.input[i] if len(node.input) > i else ""

    def const(i: int) -> np.ndarray | None:
        return numpy_helper.to_array(consts[given(i)]) if given(i) in consts else None

    W, R, B, P, seq_lens = const(1), const(2), const(3), const(7), const(4)
    if W is None or R is None or (given(3) and B is None) or (given(7) and P is None):
        return None, "non-constant weights"
    if W.shape[0] != _DIRECTIONS[direction]:
        return None, f"weights for {W.shape[0]} direction(s) but direction={direction}"
    x_shape = shapes.get(given(0))
    if x_shape is None:
        return None, (f"an input ({given(0)!r}) whose shape ONNX's shape inference cannot determine after "
                      "folding (fix every input's shape with input_shapes, freeze inputs that shapes are computed "
                      "from with constant_inputs)")
    seq_len, hidden = x_shape[1 if layout else 0], R.shape[-1]
    if given(4) and (seq_lens is None or np.any(seq_lens != seq_len)):
        return None, "sequence_lens other than the full sequence length"
    if B is None:
        B = np.zeros((W.shape[0], 2 * gates * hidden), dtype=W.dtype)
    if node.op_type != "LSTM":
        P = None
    return _RnnNode(node, W, R, B, P, seq_len, hidden, direction, layout,
                    attrs.get("linear_before_reset", 0)), ""


def _initial_state(em: _Emitter, rnn: _RnnNode, i: int, consts, d: int) -> str | None:
    """Direction ``d``'s part [1, batch, H] of initial state input ``i``; None when it is zero."""
    name = rnn.input(i)
    if not name:
        return None
    if name in consts and not np.any(numpy_helper.to_array(consts[name])):
        return None
    if rnn.layout:  # [batch, num_dir, H]
        return em.op("Transpose", [em.slice(name, 1, d, d + 1)], perm=[1, 0, 2])
    return em.slice(name, 0, d, d + 1)


def _lstm_direction(em: _Emitter, rnn: _RnnNode, x: str, d: int, consts) -> tuple[list, str, str]:
    """Unroll direction ``d`` of an LSTM; returns (H per time step, last H, last C)."""
    H, dt = rnn.hidden, rnn.W.dtype
    wt = em.const(rnn.W[d].T, "Wt")
    rt = em.const(rnn.R[d].T, "Rt")
    bias = em.const(rnn.B[d, : 4 * H] + rnn.B[d, 4 * H:], "bias")
    xw = em.op("Add", [em.op("MatMul", [x, wt]), bias])  # [seq, batch, 4H]
    peep = None if rnn.P is None else [em.const(rnn.P[d, k * H:(k + 1) * H].astype(dt), "P") for k in range(3)]
    h = _initial_state(em, rnn, 5, consts, d)
    c = _initial_state(em, rnn, 6, consts, d)
    hs: list[str] = [""] * rnn.seq_len
    for t in _time_steps(rnn, d):
        g = em.slice(xw, 0, t, t + 1)  # every per-step tensor keeps a leading unit time axis
        if h is not None:
            g = em.op("Add", [g, em.op("MatMul", [h, rt])])
        i_, o_, f_, c_ = (em.chunk(g, k, H) for k in range(4))  # ONNX gate order: i, o, f, c
        if peep is not None and c is not None:
            i_ = em.op("Add", [i_, em.op("Mul", [peep[0], c])])
            f_ = em.op("Add", [f_, em.op("Mul", [peep[2], c])])
        ic = em.op("Mul", [em.op("Sigmoid", [i_]), em.op("Tanh", [c_])])
        c = ic if c is None else em.op("Add", [em.op("Mul", [em.op("Sigmoid", [f_]), c]), ic])
        if peep is not None:
            o_ = em.op("Add", [o_, em.op("Mul", [peep[1], c])])
        h = em.op("Mul", [em.op("Sigmoid", [o_]), em.op("Tanh", [c])])
        hs[t] = h
    return hs, h, c


def _gru_direction(em: _Emitter, rnn: _RnnNode, x: str, d: int, consts) -> tuple[list, str, None]:
    """Unroll direction ``d`` of a GRU; returns (H per time step, last H, None)."""
    H, lbr = rnn.hidden, rnn.linear_before_reset
    wb, rb = rnn.B[d, : 3 * H], rnn.B[d, 3 * H:]
    rt_all = rnn.R[d].T  # [H, 3H], gate order z, r, h
    x_bias = wb + np.concatenate([rb[: 2 * H], np.zeros_like(rb[2 * H:]) if lbr else rb[2 * H:]])
    xw = em.op("Add", [em.op("MatMul", [x, em.const(rnn.W[d].T, "Wt")]), em.const(x_bias, "bias")])
    if lbr:
        rt = em.const(rt_all, "Rt")
        rbias = em.const(np.concatenate([np.zeros_like(rb[: 2 * H]), rb[2 * H:]]), "Rb")
        rbh = em.const(rb[2 * H:], "Rbh")
    else:
        rt_zr, rt_h = em.const(rt_all[:, : 2 * H], "Rt_zr"), em.const(rt_all[:, 2 * H:], "Rt_h")
    h = _initial_state(em, rnn, 5, consts, d)
    hs: list[str] = [""] * rnn.seq_len
    for t in _time_steps(rnn, d):
        g = em.slice(xw, 0, t, t + 1)  # every per-step tensor keeps a leading unit time axis
        xz, xr, xh = (em.chunk(g, k, H) for k in range(3))
        if h is None:
            z, r = em.op("Sigmoid", [xz]), em.op("Sigmoid", [xr])
            n = em.op("Tanh", [em.op("Add", [xh, em.op("Mul", [r, rbh])]) if lbr else xh])
            h = em.op("Sub", [n, em.op("Mul", [z, n])])  # (1 - z) * n
        else:
            if lbr:
                hr = em.op("Add", [em.op("MatMul", [h, rt]), rbias])
            else:
                hr = em.op("MatMul", [h, rt_zr])
            z = em.op("Sigmoid", [em.op("Add", [xz, em.chunk(hr, 0, H)])])
            r = em.op("Sigmoid", [em.op("Add", [xr, em.chunk(hr, 1, H)])])
            if lbr:
                n_in = em.op("Mul", [r, em.chunk(hr, 2, H)])
            else:
                n_in = em.op("MatMul", [em.op("Mul", [r, h]), rt_h])
            n = em.op("Tanh", [em.op("Add", [xh, n_in])])
            h = em.op("Add", [n, em.op("Mul", [z, em.op("Sub", [h, n])])])  # (1 - z) * n + z * h
        hs[t] = h
    return hs, h, None


def _time_steps(rnn: _RnnNode, d: int) -> range:
    reverse = rnn.direction == "reverse" or (rnn.direction == "bidirectional" and d == 1)
    return range(rnn.seq_len - 1, -1, -1) if reverse else range(rnn.seq_len)


def _rewrite_node(em: _Emitter, rnn: _RnnNode, consts) -> None:
    """Emit the unrolled computation of one node, writing to the node's own output names."""
    H, T = rnn.hidden, rnn.seq_len
    x = rnn.input(0)
    if rnn.layout:
        x = em.op("Transpose", [x], perm=[1, 0, 2])
    unroll = _lstm_direction if rnn.node.op_type == "LSTM" else _gru_direction
    results = [unroll(em, rnn, x, d, consts) for d in range(rnn.W.shape[0])]
    y, y_h, y_c = rnn.output(0), rnn.output(1), rnn.output(2)
    if y:
        per_dir = [em.reshape(em.op("Concat", hs, axis=0), [T, 1, -1, H]) for hs, _, _ in results]
        _finish(em, per_dir, 1, y, [2, 0, 1, 3] if rnn.layout else None)
    for out, k in ((y_h, 1), (y_c, 2)):
        if out:
            _finish(em, [r[k] for r in results], 0, out, [1, 0, 2] if rnn.layout else None)


def _finish(em: _Emitter, parts: list[str], axis: int, out: str, perm: list[int] | None) -> None:
    """Concatenate per-direction parts into ``out``, transposing for layout 1."""
    if perm is None:
        em.op("Concat", parts, out=out, axis=axis)
    else:
        em.op("Transpose", [em.op("Concat", parts, axis=axis)], out=out, perm=perm)


def rewrite_rnns(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[str, str]]]:
    """Replace every LSTM/GRU node, in the main graph and in the subgraphs of control-flow nodes
    that folding left (an ``If`` on a run-time condition), by primitive operators.

    Returns the model and the nodes that could not be rewritten as ``(description, node name)``,
    for :class:`~compiler.errors.UnsupportedOperatorError`. Expects fixed input shapes and folded
    constants (see :mod:`.onnx_fold`); shapes come from ONNX's shape inference on the folded graph,
    which also types the tensors inside subgraphs. Inside a subgraph, weights may be initializers
    or ``Constant`` nodes of that subgraph or of any enclosing graph.
    """
    if not any(node.op_type in RNN_OPS for node in _all_nodes(model.graph)):
        return model, []
    model = infer_shapes(model)
    taken: set[str] = set()
    for graph in _all_graphs(model.graph):
        taken |= {name for node in graph.node for name in list(node.input) + list(node.output) + [node.name]}
        taken |= {init.name for init in graph.initializer} | {vi.name for vi in graph.input}
    failures: list[tuple[str, str]] = []
    _rewrite_graph(model.graph, {}, {}, taken, failures)
    return model, failures


def _rewrite_graph(graph: onnx.GraphProto, outer_consts: dict, outer_shapes: dict, taken: set[str],
                   failures: list) -> None:
    """Rewrite the RNN nodes of ``graph`` (new initializers go to ``graph`` itself), then recurse
    into its nodes' subgraphs, which see this graph's constants and shapes."""
    consts = dict(outer_consts)
    consts.update({init.name: init for init in graph.initializer})
    consts.update({node.output[0]: attr.t for node in graph.node if node.op_type == "Constant"
                   for attr in node.attribute if attr.name == "value"})
    shapes = dict(outer_shapes)
    shapes.update(static_shapes(graph))
    new_nodes = []
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                _rewrite_graph(sub, consts, shapes, taken, failures)
        if node.op_type not in RNN_OPS or node.domain not in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        rnn, reason = _read_node(node, consts, shapes)
        if rnn is None:
            failures.append((f"{node.op_type} with {reason}", node.name))
            new_nodes.append(node)
            continue
        em = _Emitter(node.name or node.output[0], taken)
        _rewrite_node(em, rnn, consts)
        logger.debug("unrolled %s %s into %d nodes", node.op_type, node.name, len(em.nodes))
        new_nodes.extend(em.nodes)
        graph.initializer.extend(em.inits)
    del graph.node[:]
    graph.node.extend(new_nodes)


def _all_graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                yield from _all_graphs(sub)


def _all_nodes(graph: onnx.GraphProto):
    for g in _all_graphs(graph):
        yield from g.node
