"""Relax graph passes Kiln adds to TVM's: folding per-channel affine chains into convolutions."""

from __future__ import annotations

import tvm
from tvm import relax


@tvm.transform.module_pass(opt_level=0, name="kiln.FoldAffineIntoConv")
def FoldAffineIntoConv(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (TVM pass naming)
    """Placeholder: replaced by the real fold below once written."""
    return mod
