"""Fault injection: untrusted model files, damaged artefacts, concurrency and non-finite inputs.

Each case asserts the exact error class, that no crafted payload ran, and that nothing already
written was lost.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import compiler
from compiler.errors import ModelFormatError

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return torch.relu(self.fc(x))


@pytest.fixture(scope="module")
def clean_pt2(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pt2") / "small.pt2"
    torch.export.save(torch.export.export(_Small().eval(), (torch.randn(2, 8),)), str(path))
    return path


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy the zip ``src`` to ``dst``, passing each (name, bytes) through ``edit`` (None drops it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
    return dst


def _pickled_weight(clean: Path, dst: Path, marker: Path) -> Path:
    def edit(name, data):
        if name.endswith("_weights_config.json"):
            cfg = json.loads(data)
            cfg["config"]["fc.weight"]["use_pickle"] = True
            return json.dumps(cfg).encode()
        if name.endswith("data/weights/" + _weight_file(clean, "fc.weight")):
            return pickle.dumps(_Payload(marker))
        return data

    return _rewrite(clean, dst, edit)


def _weight_file(clean: Path, fqn: str) -> str:
    with zipfile.ZipFile(clean) as z:
        name = next(n for n in z.namelist() if n.endswith("_weights_config.json"))
        return json.loads(z.read(name))["config"][fqn]["path_name"]


def test_clean_pt2_still_compiles_and_matches_torch(clean_pt2):
    mod = compiler.compile(str(clean_pt2), target="x86")
    x = np.random.default_rng(0).standard_normal((2, 8)).astype("float32")
    program = torch.export.load(str(clean_pt2))
    np.testing.assert_allclose(mod(x), program.module()(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_the_crafted_weight_is_a_real_exploit_for_plain_torch_load(clean_pt2, tmp_path):
    """The payload below does run when torch loads the file itself (in a child process), so the
    refusals that follow are not vacuous."""
    marker = tmp_path / "ran"
    bad = _pickled_weight(clean_pt2, tmp_path / "bad.pt2", marker)
    subprocess.run([sys.executable, "-c", f"import torch; torch.export.load({str(bad)!r})"],
                   capture_output=True, timeout=300)
    assert marker.exists()


@pytest.mark.parametrize("entry", ["weight", "sample_inputs", "expr", "target", "legacy", "guards"])
def test_crafted_pt2_is_refused_before_any_code_runs(clean_pt2, tmp_path, entry):
    marker = tmp_path / "ran"
    bad = tmp_path / "bad.pt2"
    payload = f"__import__('os').system('touch {marker}')"
    if entry == "weight":
        _pickled_weight(clean_pt2, bad, marker)
    elif entry == "sample_inputs":
        _rewrite(clean_pt2, bad, lambda n, d: pickle.dumps(_Payload(marker)) if "/sample_inputs/" in n else d)
    elif entry in ("expr", "target", "guards"):
        def edit(name, data):
            if "/models/" not in name or not name.endswith(".json"):
                return data
            program = json.loads(data)
            if entry == "guards":
                program["guards_code"] = [payload]
            elif entry == "expr":
                program["range_constraints"] = {payload: {"min_val": 0, "max_val": None}}
            else:
                node = program["graph_module"]["graph"]["nodes"][0]
                node["target"] = "torch.os.system"
            return json.dumps(program).encode()

        _rewrite(clean_pt2, bad, edit)
    else:  # legacy format: a top-level "version" entry sends torch down its pickle-based loader
        _rewrite(clean_pt2, bad, lambda n, d: None if n.endswith("archive_version") else d)
    with pytest.raises(ModelFormatError, match="re-export|legacy|pickle|registered|shape expression"):
        compiler.compile(str(bad), target="x86")
    r = subprocess.run([sys.executable, "-m", "compiler", "info", str(bad)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert not marker.exists()


def test_pt2_that_is_not_a_zip_is_a_model_format_error(tmp_path):
    bad = tmp_path / "garbage.pt2"
    bad.write_bytes(b"\x80\x04not a zip at all")
    with pytest.raises(ModelFormatError, match="not a torch.export archive"):
        compiler.compile(str(bad), target="x86")
