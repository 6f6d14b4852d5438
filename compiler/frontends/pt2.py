"""Load ``torch.export`` archives (``.pt2``) without running code from the file.

``torch.export.load`` trusts its input: weights and constants marked ``use_pickle``, opaque and
TorchBind objects, and the legacy archive format are unpickled (``weights_only=False``); sample
inputs that fail a weights-only load are unpickled again without the restriction; symbolic shape
expressions are parsed with ``sympy.sympify`` (which evaluates Python); graph targets are resolved
by attribute path (``torch.os.system`` resolves); and the stored guards become Python code when the
program is turned into a module. A downloaded ``.pt2`` could therefore run anything.

:func:`load` reads the archive as a zip first and refuses, with a :class:`ModelFormatError` that
says how to re-export safely, every entry that would reach one of those paths. Only what passes
(plain tensor payloads, sample inputs that load with ``weights_only=True``, shape expressions made
of sympy's shape vocabulary, targets that are registered operators) is handed to torch.
"""

from __future__ import annotations

import io
import json
import re
import tokenize
import zipfile
from pathlib import Path, PurePosixPath

from ..errors import ModelFormatError

#: The first line of every refusal's advice.
_REEXPORT = ("re-export it with torch.export.save from a program whose weights are plain tensors "
             "(no tensor subclasses, custom objects or dynamic shapes)")

#: Names a symbolic shape expression may use: sympy's constructors and assumptions, and the
#: functions torch's deserializer puts in sympify's namespace.
_SYMPY_NAMES = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Mod",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "true", "false", "True", "False",
    "oo", "zoo", "nan", "floor", "ceiling", "sqrt", "Piecewise",
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "zero",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt",
    "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "TruncToFloat", "TruncToInt",
    "RoundToInt", "RoundDecimal", "ToFloat", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "Identity", "OpaqueUnaryFn_sqrt", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or",
})
#: A shape symbol as torch names them (s0, u3, ...).
_SYMBOL = re.compile(r"[a-z]+\d+")
_SYMBOL_STRING = re.compile(r"""(['"])[a-z]+\d+\1""")
_EXPR_OPS = frozenset({"+", "-", "*", "/", "//", "%", "**", "(", ")", ",", "=", "==", "!=", "<", "<=",
                       ">", ">=", "&", "|", "~"})
#: Python functions (not registered operators) that exported graphs call: shape arithmetic.
_PYTHON_TARGETS = frozenset(
    {f"_operator.{n}" for n in ("getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "neg",
                               "pow", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_")}
    | {f"math.{n}" for n in ("ceil", "floor", "trunc", "sqrt")}
    | {f"torch.{n}" for n in ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_sqrt",
                              "sym_ite", "sym_sum", "_assert", "_assert_async")}
)


def load(path: str | Path):
    """Check the archive at ``path`` and return its ``torch.export.ExportedProgram``.

    Raises :class:`ModelFormatError` for a file that is not a ``torch.export`` archive, and for one
    that holds anything torch would unpickle, evaluate or resolve to a Python function (the message
    names the entry).
    """
    import torch

    path = Path(path)
    check(path)
    try:
        return torch.export.load(str(path))
    except Exception as err:  # torch raises many types for damaged archives
        raise ModelFormatError(f"cannot read exported program {path}: {type(err).__name__}: {err}") from err


def check(path: Path) -> None:
    """Refuse an archive that torch could only load by running code from it (see the module doc)."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ModelFormatError(f"{path} is not a torch.export archive (.pt2 is a zip file): {err}") from err
    with zf:
        names = zf.namelist()
        roots = {PurePosixPath(n).parts[0] for n in names if PurePosixPath(n).parts}
        if len(roots) != 1:
            raise ModelFormatError(f"{path} is not a torch.export archive: expected one top-level folder")
        root = roots.pop()
        rel = {n[len(root) + 1:]: n for n in names}
        if "version" in rel or "archive_version" not in rel:
            raise ModelFormatError(
                f"{path} is in torch's legacy export format, which is loaded with pickle; Kiln does not "
                f"open it: {_REEXPORT}, with torch >= 2.6")
        models = [r for r in rel if r.startswith("models/") and r.endswith(".json")]
        if not models:
            raise ModelFormatError(f"{path} holds no exported program (no models/*.json)")
        for r in rel:
            if r.startswith("data/aotinductor/"):
                raise ModelFormatError(f"{path} holds AOTInductor code ({r}); Kiln compiles exported programs "
                                       "only, and never loads compiled code from a model file")
        for model in models:
            name = model[len("models/"):-len(".json")]
            _check_payloads(path, zf, rel, f"data/weights/{name}_weights_config.json", "weight")
            _check_payloads(path, zf, rel, f"data/constants/{name}_constants_config.json", "constant")
            _check_sample_inputs(path, zf, rel, f"data/sample_inputs/{name}.pt")
            _check_program(path, _read_json(path, zf, rel[model]))


def _read_json(path: Path, zf: zipfile.ZipFile, name: str):
    try:
        return json.loads(zf.read(name))
    except (ValueError, KeyError, zipfile.BadZipFile, OSError) as err:
        raise ModelFormatError(f"{path}: entry {name} is not readable JSON: {err}") from err


def _check_payloads(path, zf, rel, config_name, kind) -> None:
    """Weights and constants must be plain tensor payloads, never pickles or Python objects."""
    if config_name not in rel:
        legacy = config_name.rsplit("/", 1)[0] + "/" + config_name.rsplit("/", 1)[1].split("_")[0] + ".pt"
        if legacy in rel:
            raise ModelFormatError(f"{path} stores its {kind}s as one pickle ({legacy}); {_REEXPORT}")
        raise ModelFormatError(f"{path} has no {kind} table ({config_name})")
    config = _read_json(path, zf, rel[config_name]).get("config", {})
    if not isinstance(config, dict):
        raise ModelFormatError(f"{path}: {config_name} is not a table of {kind}s")
    for fqn, meta in config.items():
        file = str(meta.get("path_name", "")) if isinstance(meta, dict) else ""
        if not isinstance(meta, dict) or meta.get("use_pickle") or not file.startswith(("weight_", "tensor_")):
            raise ModelFormatError(
                f"{path}: {kind} {fqn!r} ({file or 'no file'}) is stored as a pickle or Python object, which "
                f"Kiln does not unpickle from model files; {_REEXPORT}")


def _check_sample_inputs(path, zf, rel, name) -> None:
    """torch retries a failed weights-only load of the sample inputs without the restriction; make
    sure the restricted load succeeds, so the retry never happens."""
    import torch

    if name not in rel:
        return
    data = zf.read(rel[name])
    if not data:
        return
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as err:
        raise ModelFormatError(
            f"{path}: its sample inputs ({name}) are not plain tensors (a weights-only load fails: "
            f"{str(err).splitlines()[0][:200]}); Kiln does not unpickle them; {_REEXPORT}") from err


def _check_program(path: Path, program) -> None:
    """Every shape expression uses sympy's shape vocabulary only; every target is a registered operator
    or shape arithmetic; no guards code (it is Python source)."""
    if program.get("guards_code"):
        raise ModelFormatError(f"{path} carries guard code (Python source from dynamic-shape export); Kiln "
                               f"compiles static shapes and does not run code from model files; {_REEXPORT}")
    for key, value in _walk(program):
        if key == "expr_str" and isinstance(value, str):
            _check_expr(path, value)
        elif key in ("target", "as_operator") and isinstance(value, str):
            _check_target(path, value)
    for name in (program.get("range_constraints") or {}):
        _check_expr(path, name)


def _walk(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _check_expr(path: Path, expr: str) -> None:
    """Accept an expression only if every token is a number, a shape symbol, an operator or a name of
    sympy's shape vocabulary: then ``sympify`` cannot reach attributes, builtins or imports."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(expr).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError) as err:
        raise ModelFormatError(f"{path}: shape expression {expr[:80]!r} does not parse: {err}") from err
    for tok in tokens:
        if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.NUMBER):
            continue
        if tok.type == tokenize.NAME and (tok.string in _SYMPY_NAMES or _SYMBOL.fullmatch(tok.string)):
            continue
        if tok.type == tokenize.STRING and _SYMBOL_STRING.fullmatch(tok.string):
            continue
        if tok.type == tokenize.OP and tok.string in _EXPR_OPS:
            continue
        raise ModelFormatError(
            f"{path}: shape expression {expr[:80]!r} contains {tok.string!r}, which is not part of a shape "
            f"formula; Kiln does not evaluate it; {_REEXPORT}")


def _check_target(path: Path, target: str) -> None:
    """A graph target must be a registered torch operator (``torch.ops.<ns>.<op>.<overload>``) or
    shape arithmetic; torch resolves anything else by attribute path, which reaches any function."""
    import torch

    if target in _PYTHON_TARGETS:
        return
    if target.startswith("torch.ops.") and all(p.isidentifier() and not p.startswith("__")
                                               for p in target.split(".")):
        obj = torch
        for part in target.split(".")[1:]:
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)):
            return
    raise ModelFormatError(
        f"{path}: the graph calls {target[:120]!r}, which is not a registered torch operator; Kiln does not "
        f"resolve Python functions named in model files; {_REEXPORT}")
