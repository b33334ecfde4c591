"""LoRA, rsLoRA, DoRA and PiSSA checked against their equations on small layers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.layer import delta_layers


def one_layer(module: nn.Module) -> nn.Module:
    model = nn.Sequential()
    model.add_module("proj", module)
    return model


def delta_of(model, name="default"):
    return delta_layers(model)["proj"].deltas[name]


def randomize(delta, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_equation_on_linear(rslora):
    torch.manual_seed(0)
    linear = nn.Linear(12, 7)
    w0, b0 = linear.weight.detach().clone(), linear.bias.detach().clone()
    model = one_layer(linear)
    dt.attach(model, dt.LoRAConfig(r=3, alpha=6, rslora=rslora, targets=["proj"]))
    delta = delta_of(model)
    randomize(delta)
    s = 6 / math.sqrt(3) if rslora else 6 / 3
    x = torch.randn(5, 12)
    expected = x @ w0.T + b0 + s * (x @ delta.A.T @ delta.B.T)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    dt.merge(model)
    torch.testing.assert_close(linear.weight, w0 + s * delta.B @ delta.A, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_default_init_is_kaiming_a_and_zero_b():
    model = one_layer(nn.Linear(64, 32))
    dt.attach(model, dt.LoRAConfig(r=8, targets=["proj"]))
    delta = delta_of(model)
    assert torch.count_nonzero(delta.B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=√5) on fan_in 64, as nn.Linear does
    assert delta.A.abs().max() <= bound and delta.A.std() > bound / 4


def test_gaussian_init():
    torch.manual_seed(0)
    model = one_layer(nn.Linear(256, 16))
    dt.attach(model, dt.LoRAConfig(r=4, init="gaussian", targets=["proj"]))
    delta = delta_of(model)
    assert torch.count_nonzero(delta.B) == 0
    assert abs(delta.A.std().item() - 1 / 4) < 0.02


def test_conv1d_matches_linear_with_transposed_weight():
    torch.manual_seed(0)
    conv = Conv1D(7, 12)  # (nf=out, nx=in), weight stored (in, out)
    linear = nn.Linear(12, 7)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    a, b = one_layer(conv), one_layer(linear)
    for m in (a, b):
        dt.attach(m, dt.LoRAConfig(r=2, targets=["proj"]))
        randomize(delta_of(m))
    x = torch.randn(3, 12)
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)
    dt.merge(a)
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)


def test_embedding_lora_equation():
    torch.manual_seed(0)
    emb = nn.Embedding(20, 6)
    w0 = emb.weight.detach().clone()
    model = one_layer(emb)
    dt.attach(model, dt.LoRAConfig(r=2, alpha=4, targets=["proj"]))
    delta = delta_of(model)
    randomize(delta)
    ids = torch.tensor([[1, 5, 19], [0, 2, 2]])
    # as a linear map from one-hot ids: W = weight^T (dim × vocab), ΔW = s·B A
    expected = (w0.T + 2.0 * delta.B @ delta.A).T[ids]
    torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=1e-5)


def test_dora_matches_its_definition():
    torch.manual_seed(0)
    linear = nn.Linear(10, 6)
    w0, b0 = linear.weight.detach().clone(), linear.bias.detach().clone()
    model = one_layer(linear)
    dt.attach(model, dt.LoRAConfig(r=2, alpha=2, dora=True, targets=["proj"]))
    delta = delta_of(model)
    torch.testing.assert_close(delta.magnitude, w0.norm(dim=1))  # m starts at ‖W0‖ per output
    randomize(delta)
    s = 1.0
    adapted = w0 + s * delta.B @ delta.A
    expected_w = delta.magnitude[:, None] * adapted / adapted.norm(dim=1, keepdim=True)
    x = torch.randn(4, 10)
    torch.testing.assert_close(model(x), x @ expected_w.T + b0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(delta.weight_norm(delta_layers(model)["proj"].backend), adapted.norm(dim=1))
    dt.merge(model)
    torch.testing.assert_close(linear.weight, expected_w, atol=1e-5, rtol=1e-5)


def test_dora_norm_is_detached_from_the_graph():
    model = one_layer(nn.Linear(8, 4))
    dt.attach(model, dt.LoRAConfig(r=2, dora=True, targets=["proj"]))
    delta = delta_of(model)
    randomize(delta)
    model(torch.randn(3, 8)).sum().backward()
    # the gradient of A must come only through the low-rank path scaled by m/‖·‖ (paper §4.3)
    assert delta.A.grad is not None and delta.magnitude.grad is not None
    assert not delta.weight_norm(delta_layers(model)["proj"].backend).requires_grad


def test_pissa_starts_from_principal_singular_vectors_and_is_identity():
    torch.manual_seed(0)
    linear = nn.Linear(16, 12)
    w0 = linear.weight.detach().clone()
    model = one_layer(linear)
    x = torch.randn(3, 16)
    before = model(x)
    dt.attach(model, dt.LoRAConfig(r=4, alpha=8, init="pissa", targets=["proj"]))
    delta = delta_of(model)
    u, s, vh = torch.linalg.svd(w0)
    principal = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    torch.testing.assert_close(delta.scale * delta.B @ delta.A, principal, atol=1e-5, rtol=1e-5)
    assert torch.equal(model(x), before)
    assert torch.equal(linear.weight, w0), "PiSSA keeps the base weight untouched"


def test_bias_delta_trains_and_merges():
    torch.manual_seed(0)
    linear = nn.Linear(5, 3)
    model = one_layer(linear)
    dt.attach(model, dt.LoRAConfig(r=1, bias="targets", targets=["proj"]))
    delta = delta_of(model)
    randomize(delta)
    x = torch.randn(2, 5)
    out = model(x)
    dt.merge(model)
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)
    dt.unmerge(model)
    with pytest.raises(dt.TargetError, match="has no bias"):
        dt.attach(one_layer(nn.Linear(5, 3, bias=False)), dt.LoRAConfig(bias="targets", targets=["proj"]))


def test_no_input_copy_when_dropout_is_zero(monkeypatch):
    from deltatune.backends import LinearBackend
    from deltatune.fused import LowRankLinear

    seen = []
    original, fused = LinearBackend.project_input, LowRankLinear.forward

    def spy(self, x, a):
        seen.append(x)
        return original(self, x, a)

    def fused_spy(ctx, x, *args):  # the product fused with the base layer's (deltatune/fused.py)
        seen.append(x)
        return fused(ctx, x, *args)

    monkeypatch.setattr(LinearBackend, "project_input", spy)
    monkeypatch.setattr(LowRankLinear, "forward", staticmethod(fused_spy))
    model = one_layer(nn.Linear(8, 8))
    dt.attach(model, dt.LoRAConfig(r=2, targets=["proj"]))
    x = torch.randn(2, 8)
    model(x)
    assert seen and seen[0] is x
    assert delta_of(model).dropout is None


def test_bf16_merge_unmerge_cycles_restore_weights_exactly():
    torch.manual_seed(0)
    linear = nn.Linear(32, 32).to(torch.bfloat16)
    w0 = linear.weight.detach().clone()
    model = one_layer(linear)
    dt.attach(model, dt.LoRAConfig(r=4, targets=["proj"]))
    randomize(delta_of(model))
    assert delta_of(model).A.dtype == torch.float32, "deltas on a half base are kept in fp32"
    for _ in range(20):
        dt.merge(model)
        dt.unmerge(model)
    assert torch.equal(linear.weight, w0)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    assert model(x).dtype == torch.bfloat16, "the delta computes in the base dtype"


def test_fp32_merge_unmerge_is_within_float_tolerance():
    torch.manual_seed(0)
    linear = nn.Linear(32, 32)
    w0 = linear.weight.detach().clone()
    model = one_layer(linear)
    dt.attach(model, dt.LoRAConfig(r=4, targets=["proj"]))
    randomize(delta_of(model))
    for _ in range(20):
        dt.merge(model)
        dt.unmerge(model)
    torch.testing.assert_close(linear.weight, w0, atol=1e-5, rtol=0)


def test_per_module_rank_and_alpha_patterns():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(8, 8))
    model.add_module("v_proj", nn.Linear(8, 8))
    config = dt.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"re:v.*": 1})
    dt.attach(model, config)
    layers = delta_layers(model)
    assert layers["q_proj"].deltas["default"].r == 4 and layers["q_proj"].deltas["default"].scale == 2.0
    assert layers["v_proj"].deltas["default"].r == 2 and layers["v_proj"].deltas["default"].scale == 0.5
