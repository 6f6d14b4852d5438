"""``kiln info``: a model's operators, parameters and FLOPs per layer, and how Kiln fuses them."""

from __future__ import annotations

from . import native_log
from .analysis import FLOPS_NOTE, kernel_table, layer_table


def model_info(model, *, target="x86", input_shapes=None, example_inputs=None, constant_inputs=None) -> str:
    """A printable report: one row per operator (after graph optimisation), totals, fused kernels."""
    import targets

    from . import pipeline

    desc = targets.resolve(target)
    with native_log.captured():
        lowered = pipeline.lower(model, desc, example_inputs=example_inputs, input_shapes=input_shapes,
                                 constant_inputs=constant_inputs)
    imported = lowered.imported
    original = layer_table(imported.mod)
    layers = layer_table(lowered.prepared)
    kernels = kernel_table(lowered.fused, lowered.groups)

    lines = [f"model {model if isinstance(model, str) else type(model).__name__} ({imported.source})"]
    lines += [f"  input  {s.name}: {list(s.shape)} {s.dtype}" for s in imported.inputs]
    lines.append("")
    lines.append(f"{'layer':<28} {'op':<22} {'output shape':<22} {'params':>10} {'MFLOP':>10}")
    for row in layers:
        lines.append(f"{row.name[:28]:<28} {row.op[:22]:<22} {str(list(row.shape)):<22} {row.params:>10,} {row.flops / 1e6:>10.2f}")
    lines.append(f"{'total':<28} {len(layers)} ops ({len(original)} before graph optimisation)"
                 f"{'':<6} {imported.num_params:>10,} {sum(r.flops for r in layers) / 1e6:>10.2f}")
    lines.append("(total params: the model's own count before folding; per-layer params: constants each "
                 "optimised op reads, BatchNorm folded into convolutions)")
    lines.append("")
    lines.append(f"fused kernels for target {desc.name} ({len(kernels)}):")
    for k in kernels:
        lines.append(f"  {k.name:<48} x{k.calls:<3} {k.flops / 1e6:>10.2f} MFLOP  [{' + '.join(k.ops)}]")
    lines.append(f"({FLOPS_NOTE} BatchNorm and bias are folded into convolution weights before fusion.)")
    return "\n".join(lines)
