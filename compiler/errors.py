"""Kiln's exception hierarchy: one root, one subclass per kind of user-facing problem.

Every message names the bad value and, where there is a fixed set of choices, the valid ones.
The CLI turns a :class:`KilnError` into a one-line message and a non-zero exit code; anything
else is a bug in Kiln and is shown with its traceback.
"""

from __future__ import annotations

import difflib
from typing import Iterable, Sequence


class KilnError(Exception):
    """Root of every error Kiln raises on purpose."""


class ModelFormatError(KilnError):
    """The model file or object could not be read (malformed, truncated, wrong kind)."""


class UnsupportedOperatorError(KilnError):
    """The model uses operators Kiln cannot lower. Lists every one, with node names, at once."""

    def __init__(self, ops: Sequence[tuple[str, str]], frontend: str = "onnx"):
        self.ops = list(ops)
        by_type: dict[str, list[str]] = {}
        for op_type, node in self.ops:
            by_type.setdefault(op_type, []).append(node)
        parts = [f"{t} (nodes: {', '.join(n or '<unnamed>' for n in nodes)})" for t, nodes in by_type.items()]
        super().__init__(
            f"{len(by_type)} unsupported {frontend} operator type(s): " + "; ".join(parts)
        )


class InputShapeError(KilnError):
    """An input shape or dtype is missing, symbolic or does not match the model."""


class UnknownTargetError(KilnError):
    """A target name that is not in the registry."""

    def __init__(self, name: str, known: Iterable[str]):
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.4)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        super().__init__(f"unknown target {name!r}.{hint} Known targets: {', '.join(known)}")
        self.name = name
        self.known = known


class TargetError(KilnError):
    """A target description is invalid, or a target needs a tool that is missing."""


class IncompatibleModuleError(KilnError):
    """A compiled module was built for another target, architecture or Kiln version."""


class CompileError(KilnError):
    """Lowering or code generation failed for a reason Kiln could name."""


class TuningError(KilnError):
    """Tuning could not run or its logs are unusable."""


class PathError(KilnError):
    """A file or folder given to Kiln cannot be used: missing, a folder where a file is expected (or
    the reverse), unwritable, or not in the expected format (an inputs ``.npz`` holding objects)."""


class MemoryLimitError(KilnError):
    """A module needs more memory than the machine that would run it has (huge declared inputs)."""


class NonFiniteError(KilnError):
    """An input or output holds NaN or infinity where the caller asked for finite values
    (``run(..., check_finite=True)``, ``kiln run --check-finite``)."""


class RemoteError(KilnError):
    """An RPC tracker or server is unreachable, has no (free) device for a key, or cannot run a module
    (``compiler.remote``)."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """A ' Did you mean X?' hint for ``name`` among ``choices`` (empty when nothing is close)."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.4)
    return f" Did you mean {close[0]!r}?" if close else ""
