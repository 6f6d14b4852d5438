"""Transposed convolutions (compiler/conv_transpose.py): ConvTranspose1d/2d through the PyTorch and ONNX
routes for a matrix of strides, paddings, output paddings, groups (depthwise included), dilations and
kernels, compared with PyTorch and ONNX Runtime; the ordinary convolution they become gets Kiln's
conv schedule; ARM and CUDA builds; the DB-style text detector of the zoo through the PyTorch route
and both ONNX exporters."""

from __future__ import annotations

import logging
import shutil
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_close, export_onnx, onnx_input_names, run_ort, run_torch, zoo_model

import compiler
import targets
from compiler import conv_transpose, cuda, emulator, pipeline

# (in, out, kernel, stride, padding, output_padding, groups, dilation, input H x W)
CASES = {
    "k2s2": (8, 16, 2, 2, 0, 0, 1, 1, (9, 7)),
    "k3s2p1op1": (8, 16, 3, 2, 1, 1, 1, 1, (9, 7)),
    "k4s2p1": (8, 16, 4, 2, 1, 0, 1, 1, (8, 8)),
    "k4s4": (8, 8, 4, 4, 0, 0, 1, 1, (5, 6)),
    "k3s4p2op3": (8, 12, 3, 4, 2, 3, 1, 1, (5, 6)),
    "groups2": (8, 16, 3, 2, 1, 1, 2, 1, (7, 7)),
    "depthwise": (16, 16, 3, 2, 1, 1, 16, 1, (7, 7)),
    "depthwise_k4": (16, 16, 4, 2, 1, 0, 16, 1, (7, 7)),
    "dilation2_s2": (8, 16, 3, 2, 2, 1, 1, 2, (7, 7)),
    "dilation2_s1": (8, 16, 3, 1, 2, 0, 1, 2, (7, 7)),
    "k5s3_pad_gt_stride": (8, 16, 5, 3, 4, 2, 1, 1, (6, 5)),
    "asymmetric": (8, 16, (3, 2), (2, 1), (1, 0), (1, 0), 4, (1, 2), (6, 5)),
}


def _layer(case: str) -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    cin, cout, k, s, p, op, g, d, hw = CASES[case]
    layer = torch.nn.ConvTranspose2d(cin, cout, k, stride=s, padding=p, output_padding=op, groups=g, dilation=d)
    return torch.nn.Sequential(layer, torch.nn.ReLU()).eval(), (torch.randn(1, cin, *hw),)


def _issue_model() -> torch.nn.Module:
    """Issue 13 item 1: conv -> relu -> ConvTranspose -> BatchNorm -> relu."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.ConvTranspose2d(32, 16, 2, stride=2), torch.nn.BatchNorm2d(16),
                                torch.nn.ReLU())
    bn = model[3]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
    return model.eval()


def _compile(model, inputs, route: str, tmp_path, caplog):
    """Compile through ``route``; the layout conversion must not have fallen back."""
    with caplog.at_level(logging.WARNING, logger="compiler.pipeline"):
        if route == "onnx":
            mod = compiler.compile(export_onnx(model, inputs, tmp_path / "m.onnx"), target="x86")
        else:
            mod = compiler.compile(model, target="x86", example_inputs=inputs)
    assert not [r for r in caplog.records if "layout conversion failed" in r.getMessage()]
    return mod


def _reference(model, inputs, route: str, tmp_path):
    if route == "onnx":
        path = tmp_path / "m.onnx"
        return run_ort(str(path), dict(zip(onnx_input_names(path), [x.numpy() for x in inputs])))[0]
    return run_torch(model, inputs)


@pytest.mark.parametrize("route", ["torch", "onnx"])
def test_issue_model_compiles_and_matches(route, tmp_path, caplog):
    model, inputs = _issue_model(), (torch.randn(1, 3, 64, 64),)
    mod = _compile(model, inputs, route, tmp_path, caplog)
    assert_close(mod(inputs[0].numpy()), run_torch(model, inputs), what=route)
    if route == "onnx":
        assert_close(mod(inputs[0].numpy()), _reference(model, inputs, route, tmp_path), what="vs ORT")


@pytest.mark.parametrize("route", ["torch", "onnx"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_transposed_conv_matrix(case, route, tmp_path, caplog):
    model, inputs = _layer(case)
    mod = _compile(model, inputs, route, tmp_path, caplog)
    assert_close(mod(inputs[0].numpy()), _reference(model, inputs, route, tmp_path), what=f"{case} via {route}")


@pytest.mark.parametrize("route", ["torch", "onnx"])
def test_conv_transpose1d(route, tmp_path, caplog):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(4, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.ConvTranspose1d(8, 6, 4, stride=2, padding=1),
                                torch.nn.ConvTranspose1d(6, 6, 3, stride=3, output_padding=1, groups=2, dilation=2))
    inputs = (torch.randn(1, 4, 20),)
    mod = _compile(model.eval(), inputs, route, tmp_path, caplog)
    assert_close(mod(inputs[0].numpy()), _reference(model, inputs, route, tmp_path), what=route)


@pytest.mark.parametrize("case", ["k2s2", "k4s2p1", "depthwise", "groups2", "k4s4"])
def test_becomes_a_convolution_with_kiln_schedules(case):
    """No transposed convolution reaches lowering; the convolution it becomes is claimed by the x86 conv
    rule (register tile over output channels, parallel rows), the depth-to-space by the transposing
    elementwise schedule (NCHW output here)."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    from schedules.x86 import conv as conv_rule
    from schedules.x86 import elementwise

    model, inputs = _layer(case)
    target = targets.resolve("x86")
    lowered = pipeline.lower(model, target, example_inputs=inputs)
    ops = [ops for ops in lowered.groups.values()] + [(gv.name_hint,) for gv in lowered.fused.get_global_vars()]
    assert not any("transpose" in op and "conv" in op for group in ops for op in group), ops
    kernels = {gv.name_hint: f for gv, f in lowered.fused.functions_items() if isinstance(f, tirx.PrimFunc)}
    convs = [name for name in kernels if "conv2d" in name]
    assert len(convs) == 1, sorted(kernels)
    assert conv_rule.Conv2D(target).apply(kernels[convs[0]], target.to_tvm(), False) is not None
    shuffles = [name for name in kernels if "reshape" in name]
    assert len(shuffles) == 1, sorted(kernels)
    assert elementwise.Elementwise(target).apply(kernels[shuffles[0]], target.to_tvm(), False) is not None
    if CASES[case][6] == 1:  # channels of a pixel are contiguous on both sides: tiled, not strided
        sch = s_tir.Schedule(kernels[shuffles[0]])
        blocks = elementwise._inline_all(sch, [b.block_rv for b in normalize_prim_func(sch)])
        assert len(blocks) == 1 and elementwise.schedule_transposing_block(sch, blocks[0], target)


def test_sub_pixel_plan_matches_the_output_size():
    for (i, k, s, d, pb, pe, op) in [(9, 3, 2, 1, 1, 1, 1), (5, 3, 4, 1, 2, 2, 3), (7, 3, 2, 2, 2, 2, 1),
                                     (6, 5, 3, 1, 4, 4, 2), (7, 3, 1, 2, 2, 2, 0), (4, 1, 3, 1, 0, 0, 0)]:
        plan = conv_transpose.plan_axis(i, k, s, d, pb, pe, op)
        assert plan.out_len == (i - 1) * s - pb - pe + d * (k - 1) + op + 1
        span = plan.crop_end - plan.crop_begin + plan.pad_before + plan.pad_after
        assert span - plan.dilation * (plan.taps - 1) == plan.q_len
        assert 0 <= plan.offset < s and plan.offset + plan.out_len <= plan.q_len * s
        assert len(set(plan.tap_of)) == k  # every tap lands on its own (phase, tap) slot


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="aarch64-linux-gnu-g++ not installed")
def test_arm_build(tmp_path):
    model, inputs = _issue_model(), (torch.randn(1, 3, 64, 64),)
    mod = compiler.compile(model, "arm", example_inputs=inputs)
    path = mod.export(tmp_path / "convt-arm.so")
    if emulator.unavailable_reason() is None:  # run it on the emulated aarch64 device where there is one
        assert_close(emulator.run(path, inputs[0].numpy()), run_torch(model, inputs), what="arm")


@pytest.mark.skipif(cuda.find_nvcc() is None, reason="nvcc (CUDA toolkit) not installed")
def test_cuda_build(tmp_path):
    """CUDA keeps TVM's NCHW lowering of transposed convolutions: it builds and exports device code."""
    model, inputs = _issue_model(), (torch.randn(1, 3, 64, 64),)
    path = compiler.compile(model, "h100", example_inputs=inputs).export(tmp_path / "convt-h100.so")
    assert cuda.device_code(path)


# ---------------------------------------------------------------- the DB-style text detector of the zoo


def _export(model, inputs, path, dynamo: bool) -> str:
    if not dynamo:
        return export_onnx(model, inputs, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), tuple(inputs), str(path), dynamo=True)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("route", ["torch", "onnx", "onnx-dynamo"])
def test_dbnet_compiles_and_matches(route, tmp_path, caplog):
    model, inputs = zoo_model("dbnet")
    with caplog.at_level(logging.WARNING, logger="compiler.pipeline"):
        if route == "torch":
            mod = compiler.compile(model, "x86", example_inputs=inputs)
        else:
            path = _export(model, inputs, tmp_path / "dbnet.onnx", dynamo=route == "onnx-dynamo")
            mod = compiler.compile(path, "x86")
    assert not [r for r in caplog.records if "layout conversion failed" in r.getMessage()]
    got = mod(inputs[0].numpy())
    assert_close(got, run_torch(model, inputs), what=f"dbnet via {route}")
    if route != "torch":
        want = run_ort(path, dict(zip(onnx_input_names(path), [inputs[0].numpy()])))[0]
        assert_close(got, want, what=f"dbnet via {route} vs ORT")
    assert np.std(got) > 1e-2
