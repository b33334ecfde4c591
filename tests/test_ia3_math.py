"""(IA)³ checked against its equations: l_k, l_v scale outputs, l_ff scales the down projection's input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.layer import delta_layers
from zoo import tiny_inputs, tiny_model


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj = nn.Linear(6, 10)
        self.down_proj = nn.Linear(10, 6)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x)))


def set_scales(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in delta_layers(model).values():
            for delta in layer.deltas.values():
                delta.scale.copy_(1 + 0.5 * torch.randn(delta.scale.shape, generator=gen))


def test_l_ff_scales_the_input_of_the_down_projection_not_its_output():
    torch.manual_seed(0)
    mlp = MLP()
    x = torch.randn(3, 6)
    w1, b1 = mlp.up_proj.weight.detach().clone(), mlp.up_proj.bias.detach().clone()
    w2, b2 = mlp.down_proj.weight.detach().clone(), mlp.down_proj.bias.detach().clone()
    dt.attach(mlp, dt.IA3Config(targets=["down_proj"], feedforward=["down_proj"]))
    set_scales(mlp)
    l_ff = delta_layers(mlp)["down_proj"].deltas["default"].scale.detach()
    assert l_ff.shape == (10,)  # d_ff, the hidden width
    hidden = F.gelu(x @ w1.T + b1)
    expected = (l_ff * hidden) @ w2.T + b2
    torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=1e-5)
    dt.merge(mlp)
    torch.testing.assert_close(mlp.down_proj.weight, w2 * l_ff[None, :], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-5)
    dt.unmerge(mlp)
    assert torch.equal(mlp.down_proj.base.weight, w2)


def test_l_k_and_l_v_scale_the_projection_output():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("k_proj", nn.Linear(8, 5))
    w, b = model.k_proj.weight.detach().clone(), model.k_proj.bias.detach().clone()
    dt.attach(model, dt.IA3Config(targets=["k_proj"]))
    set_scales(model)
    l_k = delta_layers(model)["k_proj"].deltas["default"].scale.detach()
    x = torch.randn(4, 8)
    expected = l_k * (x @ w.T + b)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-5)
    dt.merge(model)
    torch.testing.assert_close(model.k_proj.weight, l_k[:, None] * w, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.k_proj.bias, l_k * b, atol=1e-6, rtol=1e-6)
    dt.unmerge(model)
    assert torch.equal(model.k_proj.base.weight, w) and torch.equal(model.k_proj.base.bias, b)


def test_parameter_count_is_d_k_plus_d_v_plus_d_ff_per_block():
    model = tiny_model("llama")
    dt.attach(model, dt.IA3Config())
    c = model.config
    d_kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    assert dt.count_parameters(model)[0] == c.num_hidden_layers * (2 * d_kv + c.intermediate_size)
    roles = {p.rsplit(".", 1)[-1] for p in dt.deltas(model)["default"].paths}
    assert roles == {"k_proj", "v_proj", "down_proj"}


def test_fused_qkv_is_scaled_whole():
    model = tiny_model("gpt2")
    dt.attach(model, dt.IA3Config())
    layer = delta_layers(model)["transformer.h.0.attn.c_attn"]
    assert layer.deltas["default"].scale.shape == (3 * model.config.n_embd,)
    assert not layer.deltas["default"].scale_input
    assert delta_layers(model)["transformer.h.0.mlp.c_proj"].deltas["default"].scale_input


def test_half_precision_base_keeps_fp32_vectors_and_computes_in_bf16():
    model = tiny_model("llama").to(torch.bfloat16)
    inputs = tiny_inputs("llama", model)
    before = model(**inputs).logits
    dt.attach(model, dt.IA3Config())
    assert all(p.dtype == torch.float32 for p in dt.trainable_parameters(model))
    out = model(**inputs).logits
    assert out.dtype == torch.bfloat16 and torch.equal(out, before)


def test_bad_options():
    with pytest.raises(dt.ConfigError, match="param_dtype"):
        dt.IA3Config(param_dtype="int8")
    with pytest.raises(dt.ConfigError, match="regular expression"):
        dt.IA3Config(feedforward=["re:("])
