"""Numeric precisions: which a target supports (:func:`check_precision`) and the FP16 rewrite
(:func:`mixed_precision`). INT8 post-training quantization is ``compiler/quantize.py``'s job."""

from __future__ import annotations

from .errors import KilnError

#: Precisions ``compile(..., precision=...)`` accepts (fp16: NVIDIA GPUs; int8: CPUs and microcontrollers).
PRECISIONS = ("fp32", "fp16", "int8")
#: Target families that build ``precision="int8"`` (post-training quantization, compiler/quantize.py).
INT8_FAMILIES = ("mcu", "x86", "arm")


def check_precision(precision: str, target) -> None:
    """``precision`` is one Kiln knows, and supported on ``target`` (a ``TargetDescription``)."""
    if precision not in PRECISIONS:
        raise KilnError(f"unknown precision {precision!r}; choices: {', '.join(PRECISIONS)}")
    if precision == "fp16" and target.family != "cuda":
        raise KilnError(
            f"precision 'fp16' is supported on NVIDIA GPU targets only for now, not on {target.name!r} "
            f"({target.family}); choices there: fp32 (the default)"
            + (", int8" if target.family in INT8_FAMILIES else "")
        )
    if precision == "int8" and target.family not in INT8_FAMILIES:
        valid = ["fp32"] + (["fp16"] if target.family == "cuda" else [])
        raise KilnError(
            f"precision 'int8' is supported on CPU and microcontroller targets only for now, not on {target.name!r} "
            f"({target.family}); choices there: {', '.join(valid)}"
        )
    if precision == "fp16" and target.family == "cuda" and not target.has("fp16"):
        raise KilnError(f"target {target.name!r} does not list the fp16 feature; use precision='fp32'")


def mixed_precision(mod, precision: str):
    """FP16 compute with FP32 accumulation: ``ToMixedPrecision(out_dtype="float32")``.

    Matmuls and convolutions take FP16 operands and accumulate in FP32; elementwise work runs in
    FP16; reductions that need range (softmax, layer norm, means) stay in FP32, as the pass decides
    per operator. Weights are cast once at compile time (folded). Inputs and outputs stay FP32 at
    the module boundary (cast inside)."""
    if precision != "fp16":  # fp32 as is; int8 is compiler/quantize.py's job
        return mod
    import tvm
    from tvm import relax

    seq = tvm.transform.Sequential(
        [relax.transform.ConvertToDataflow(), relax.transform.ToMixedPrecision(out_dtype="float32"),
         relax.transform.FoldConstant(), relax.transform.DeadCodeElimination(),
         relax.transform.CanonicalizeBindings()],
        name="kiln.mixed_precision",
    )
    return seq(mod)
