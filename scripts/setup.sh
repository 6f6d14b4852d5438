#!/usr/bin/env bash
# Set up Kiln on a fresh machine: a virtual environment in .venv with the pinned dependencies and
# Kiln itself (editable). Idempotent: a second run only checks. Usage: scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.kiln-setup-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # torch==2.13.0 resolves to the local CPU build; any other spec pulls CUDA wheels.
  python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
python - <<'PY'
import tvm, tvm_ffi, torch, onnxruntime
assert tvm_ffi.__version__.startswith("0.1.14"), f"apache-tvm-ffi {tvm_ffi.__version__}: Kiln needs 0.1.14.post1"
print(f"kiln environment ready: tvm {tvm.__version__}, tvm-ffi {tvm_ffi.__version__}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
PY
