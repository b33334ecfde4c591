"""The fused low-rank product (deltatune/fused.py): its equation, bitwise equality with the
unfused modules in fp32, bf16 within bf16's rounding, and the layer using it only where the
result is the same as running the base module and the delta."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.main import app
from deltatune.fused import LowRankLinear
from deltatune.layer import delta_layers

GOLDEN = Path(__file__).parent / "golden" / "fp32_training"


def factors(dtype=torch.float32, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(12, 10, generator=generator).to(dtype)
    b0 = torch.randn(12, generator=generator).to(dtype) if bias else None
    a = torch.randn(3, 10, generator=generator, requires_grad=True)
    b = torch.randn(12, 3, generator=generator, requires_grad=True)
    x = torch.randn(2, 5, 10, generator=generator).to(dtype).requires_grad_()
    return x, weight, b0, a, b


def unfused(x, weight, bias, a, b, scale):
    """The base layer and the delta as separate modules compute it."""
    base_out = F.linear(x, weight, bias)
    return torch.add(base_out, F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)), alpha=scale)


@pytest.mark.parametrize("bias", [False, True])
def test_the_equation_and_its_gradients(bias):
    x, weight, b0, a, b = factors(torch.float32, bias)
    x64, w64 = x.detach().double().requires_grad_(), weight.double()
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    expected = x64 @ w64.T + (0 if b0 is None else b0.double()) + 0.5 * (x64 @ a64.T) @ b64.T
    got = LowRankLinear.apply(x, weight, b0, a, b, 0.5)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    upstream = torch.randn(expected.shape, dtype=torch.float64)
    expected.backward(upstream)
    got.backward(upstream.float())
    for mine, reference in ((x.grad, x64.grad), (a.grad, a64.grad), (b.grad, b64.grad)):
        torch.testing.assert_close(mine.double(), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
def test_fp32_is_bitwise_the_unfused_path(bias):
    x, weight, b0, a, b = factors(torch.float32, bias)
    upstream = torch.randn(2, 5, 12)
    reference = unfused(x, weight, b0, a, b, 0.7)
    reference.backward(upstream)
    expected = [reference.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone()]
    for t in (x, a, b):
        t.grad = None
    got = LowRankLinear.apply(x, weight, b0, a, b, 0.7)
    got.backward(upstream)
    for mine, theirs in zip([got.detach(), x.grad, a.grad, b.grad], expected):
        assert torch.equal(mine, theirs)


def test_bf16_agrees_with_the_unfused_path_to_bf16_rounding_and_keeps_fp32_gradients():
    x, weight, b0, a, b = factors(torch.bfloat16)
    upstream = torch.randn(2, 5, 12, dtype=torch.bfloat16)
    reference = unfused(x, weight, b0, a, b, 0.7)
    reference.backward(upstream)
    expected = [reference.detach().float(), x.grad.float(), a.grad.clone(), b.grad.clone()]
    for t in (x, a, b):
        t.grad = None
    got = LowRankLinear.apply(x, weight, b0, a, b, 0.7)
    got.backward(upstream)
    assert got.dtype == torch.bfloat16 and a.grad.dtype == b.grad.dtype == torch.float32
    for mine, theirs in zip([got.detach().float(), x.grad.float(), a.grad, b.grad], expected):
        torch.testing.assert_close(mine, theirs, atol=0.1, rtol=2e-2)


def _lora_layer(**options):
    model = torch.nn.Sequential(torch.nn.Linear(10, 12))
    model.requires_grad_(False)
    dt.attach(model, dt.LoRAConfig(r=3, targets=["0"], **options))
    layer = delta_layers(model)["0"]
    with torch.no_grad():
        for p in layer.deltas["default"].parameters():
            p.normal_()
    return model, layer


@pytest.mark.parametrize("options", [{}, {"init": "pissa"}, {"dora": True}, {"bias": "targets"}, {"dropout": 0.5}],
                         ids=["lora", "pissa", "dora", "bias-delta", "dropout"])
def test_the_layer_fuses_exactly_where_the_result_is_unchanged(options):
    model, layer = _lora_layer(**options)
    model.train()
    x = torch.randn(4, 10)
    delta = layer.deltas["default"]
    fused = delta.fused_output(x, layer.backend)
    assert (fused is not None) == (not options)
    if fused is not None:
        torch.testing.assert_close(fused, delta(x, layer.base(x), layer.backend), atol=1e-6, rtol=1e-6)


def test_no_fusion_where_the_base_must_run_itself():
    model, layer = _lora_layer()
    x = torch.randn(4, 10)
    delta = layer.deltas["default"]
    assert delta.fused_output(x, layer.backend) is not None
    seen = []
    handle = layer.base.register_forward_hook(lambda *args: seen.append(True))
    model(x)
    assert seen  # a hook on the base module sees it run
    handle.remove()
    layer.base.weight.requires_grad_(True)  # a trained base weight needs its own gradient
    assert delta.fused_output(x, layer.backend) is None
    layer.base.weight.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert delta.fused_output(x, layer.backend) is None


@pytest.mark.parametrize("method", ["lora", "houlsby", "ia3"])
def test_fp32_unpacked_training_reproduces_the_earlier_numerics(tiny_dir, data_file, tmp_path, method):
    """The delta after 4 steps of `--precision fp32 --no-packing` against the one saved by the
    code before packing and fusion (commit 04c6db4). On the machine that saved them, (IA)³ and
    adapters (no fused product) agree bitwise, and LoRA to 5.5e-7: its fused product sums the
    input gradients of layers sharing an input in another order. The bound leaves room for
    another CPU's fp32 kernels."""
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [str(a) for a in [
        "train", "--model", tiny_dir, "--data", data_file, "-o", out, "--method", method, "--batch-size", 4,
        "--lr", 0.02, "--eval-limit", 2, "--max-new-tokens", 2, "--no-progress", "--max-steps", 4,
        "--precision", "fp32", "--attention", "model", "--no-packing"]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    got = load_file(out / "delta" / "delta.safetensors")
    golden = load_file(GOLDEN / f"{method}.safetensors")
    assert set(got) == set(golden)
    for key, value in golden.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-5)
