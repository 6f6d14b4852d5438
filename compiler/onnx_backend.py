"""Kiln as an ONNX backend (``onnx.backend.base.Backend``), the interface ONNX runtimes are tested through.

    from compiler.onnx_backend import KilnBackend
    rep = KilnBackend.prepare(model_proto)        # compiles for this machine (target "x86")
    rep = KilnBackend.prepare(model_proto, constant_inputs={"k": np.array([3])})   # inputs frozen
    outputs = rep.run([x, y])                    # NumPy in, a tuple of NumPy arrays out

``tests/test_onnx_conformance.py`` and ``scripts/onnx_conformance.py`` run ONNX's operator conformance
cases through it (``run_case``, one forked child per case with ``run_isolated``) and compare outputs as
ONNX's own backend test runner does (``compare``). Compile failures are :class:`~compiler.errors.KilnError`.
"""

from __future__ import annotations

import os
import pickle
import signal
import time
import traceback
from typing import Any, Callable, Sequence

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep


class KilnRep(BackendRep):
    """A compiled ONNX model behind the backend interface. Sequence-typed graph outputs come back as
    lists of arrays, as ONNX Runtime returns them (the compiled module returns a tuple for each)."""

    def __init__(self, module, model: onnx.ModelProto | None = None, frozen=()):
        self.module = module
        outputs = model.graph.output if model is not None else []
        self._sequence = [o.type.HasField("sequence_type") for o in outputs]
        inits = {i.name for i in model.graph.initializer} if model is not None else set()
        self._graph_inputs = [i.name for i in model.graph.input if i.name not in inits] if model is not None else []
        self._frozen = set(frozen)

    def run(self, inputs: Any, **kwargs) -> tuple[np.ndarray, ...]:
        """Inputs as an array, a list (in the graph's input order; values for inputs frozen with
        ``constant_inputs`` may be included and are then skipped) or a dict by name."""
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        elif isinstance(inputs, dict):
            names = [s.name for s in self.module.inputs]
            inputs = [inputs[n] for n in names]
        elif self._frozen and len(inputs) == len(self._graph_inputs):
            inputs = [x for x, n in zip(inputs, self._graph_inputs) if n not in self._frozen]
        out = self.module.run(*[np.asarray(x) for x in inputs])
        if not isinstance(out, tuple) or len(self._sequence) == 1:  # run() unwraps a single output
            out = (out,)
        if not self._sequence:
            return out
        return tuple(_as_list(o) if seq else o for o, seq in zip(out, self._sequence))


class KilnBackend(Backend):
    """Compiles with :func:`compiler.compile` (default schedules, no tuning logs) for ``target``."""

    target = "x86"

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs) -> KilnRep:
        import compiler

        super().prepare(model, device, **kwargs)
        frozen = list(kwargs.get("constant_inputs") or ())
        return KilnRep(compiler.compile(model, cls.target, tuning_logs=False, **kwargs), model, frozen)

    @classmethod
    def run_model(cls, model: onnx.ModelProto, inputs: Any, device: str = "CPU", **kwargs) -> tuple:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"


def _as_list(value) -> list:
    return list(value) if isinstance(value, tuple) else [value]


prepare = KilnBackend.prepare
run_model = KilnBackend.run_model
supports_device = KilnBackend.supports_device


def compare(outputs: Sequence, expected: Sequence, rtol: float, atol: float) -> None:
    """Raise ``AssertionError`` unless ``outputs`` match ``expected`` exactly as ONNX's backend test
    runner compares them (same count, shapes and dtypes; values within ``rtol``/``atol``, two units in
    the last place for bfloat16; sequences element by element)."""
    from onnx.backend.test.runner import Runner

    Runner.assert_similar_outputs(list(expected), list(outputs), rtol, atol)


def run_case(case) -> tuple[str, str]:
    """Compile and run one case of ``onnx.backend.test.case.node.collect_testcases`` and classify the
    outcome: ``pass``; ``mismatch`` (wrong outputs, no error); ``kiln_error`` (a clear refusal);
    ``error`` (any other exception: a bug in Kiln)."""
    from .errors import KilnError

    try:
        rep = KilnBackend.prepare(case.model)
        for inputs, expected in case.data_sets:
            compare(rep.run(inputs), expected, case.rtol, case.atol)
    except KilnError as err:
        return "kiln_error", f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    except AssertionError as err:
        return "mismatch", " ".join(str(err).split())[:300]
    except Exception as err:  # noqa: BLE001 - the point is to classify everything
        frame = traceback.extract_tb(err.__traceback__)[-1]
        first = str(err).splitlines()[0][:250] if str(err) else ""
        return "error", f"{type(err).__name__}: {first} ({os.path.basename(frame.filename)}:{frame.lineno})"
    return "pass", ""


def run_isolated(fn: Callable, case, timeout: float) -> tuple[str, str]:
    """``fn(case)`` in a forked child: a signal that kills it becomes ``("crash", signal name)`` and a
    run past ``timeout`` seconds ``("timeout", ...)``, instead of ending the calling process. Import
    what ``fn`` needs before calling this, or every child imports it again."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        try:
            result = fn(case)
        except BaseException as err:  # noqa: BLE001
            result = ("error", repr(err)[:300])
        os.write(write, pickle.dumps(result))
        os._exit(0)
    os.close(write)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read)
            return "timeout", f"more than {timeout:.0f} s"
        time.sleep(0.01)
    data = b""
    while chunk := os.read(read, 1 << 16):
        data += chunk
    os.close(read)
    if os.WIFSIGNALED(status):
        return "crash", f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return pickle.loads(data) if data else ("crash", f"exit status {os.WEXITSTATUS(status)}")
