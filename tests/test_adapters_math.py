"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) checked against their equations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.layer import delta_layers
from zoo import randomize_delta, tiny_inputs, tiny_model


def randomize(model, name="default", seed=0):
    randomize_delta(model, name, seed, scale=0.3)


def bottleneck_of(delta):
    a = delta.adapter
    return a.down.weight, a.down.bias, a.up.weight, a.up.bias


def test_serial_adapter_equation():
    torch.manual_seed(0)
    proj = nn.Linear(10, 12)
    model = nn.Sequential()
    model.add_module("o_proj", proj)
    w0, b0 = proj.weight.detach().clone(), proj.bias.detach().clone()
    dt.attach(model, dt.HoulsbyConfig(bottleneck=3, activation="gelu", targets=["o_proj"]))
    randomize(model)
    wd, bd, wu, bu = bottleneck_of(delta_layers(model)["o_proj"].deltas["default"])
    x = torch.randn(4, 10)
    h = x @ w0.T + b0
    expected = h + F.gelu(h @ wd.T + bd) @ wu.T + bu
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-5)


def test_layer_norm_option_normalises_the_adapter_input():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("o_proj", nn.Linear(6, 8))
    dt.attach(model, dt.PfeifferConfig(bottleneck=2, layer_norm=True, targets=["o_proj"]))
    randomize(model)
    delta = delta_layers(model)["o_proj"].deltas["default"]
    wd, bd, wu, bu = bottleneck_of(delta)
    x = torch.randn(3, 6)
    with dt.disabled(model):
        h = model(x)
    z = F.layer_norm(h, (8,), delta.adapter.norm.weight, delta.adapter.norm.bias)
    torch.testing.assert_close(model(x), h + F.relu(z @ wd.T + bd) @ wu.T + bu, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_parameter_count_is_2md_plus_d_plus_m(layer_norm):
    model = tiny_model("llama")
    d, m = model.config.hidden_size, 5
    dt.attach(model, dt.HoulsbyConfig(bottleneck=m, layer_norm=layer_norm))
    per_adapter = 2 * m * d + d + m + (2 * d if layer_norm else 0)
    adapters = 2 * model.config.num_hidden_layers  # after attention and after the FFN, per block
    assert dt.count_parameters(model)[0] == adapters * per_adapter
    info = dt.deltas(model)["default"]
    assert sorted({p.rsplit(".", 1)[-1] for p in info.paths}) == ["down_proj", "o_proj"]


def test_pfeiffer_sits_after_the_ffn_only_and_reduction_factor_sizes_it():
    model = tiny_model("bert")
    dt.attach(model, dt.PfeifferConfig(reduction_factor=8))
    paths = dt.deltas(model)["default"].paths
    assert paths == [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]
    delta = delta_layers(model)[paths[0]].deltas["default"]
    assert delta.adapter.down.weight.shape == (32 // 8, 32)


def test_houlsby_on_post_ln_bert_wraps_the_attention_and_ffn_output_projections():
    model = tiny_model("bert")
    dt.attach(model, dt.HoulsbyConfig(bottleneck=4))
    assert dt.deltas(model)["default"].paths == [
        "bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.output.dense",
    ]


def test_near_identity_init_is_truncated_normal_and_zero_up_is_exact():
    model = tiny_model("llama")
    dt.attach(model, dt.HoulsbyConfig(bottleneck=16), "near")
    weights = torch.cat([
        torch.cat([d.adapter.down.weight.flatten(), d.adapter.up.weight.flatten()])
        for layer in delta_layers(model).values() for d in [layer.deltas["near"]]
    ])
    assert weights.abs().max() <= 2e-2 and 0.5e-2 < weights.std() < 1e-2
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias") and ".deltas." in n]
    assert biases and all(torch.count_nonzero(b) == 0 for b in biases)

    model = tiny_model("llama")
    inputs = tiny_inputs("llama", model)
    before = model(**inputs).logits
    dt.attach(model, dt.HoulsbyConfig(bottleneck=16, init="zero_up"))
    torch.testing.assert_close(model(**inputs).logits, before, atol=0, rtol=0)


def capture(module, store, key, output=False):
    def hook(_module, args, result):
        store[key] = (result if output else args[0]).detach()
    return module.register_forward_hook(hook)


@pytest.mark.parametrize("arch,reader,writer", [
    ("llama", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"),
    ("bert", "bert.encoder.layer.1.intermediate.dense", "bert.encoder.layer.1.output.dense"),
    ("bart", "model.decoder.layers.0.encoder_attn.q_proj", "model.decoder.layers.0.encoder_attn.out_proj"),
])
def test_parallel_adapter_adds_s_times_adapter_of_the_sublayer_input(arch, reader, writer):
    model = tiny_model(arch)
    inputs = tiny_inputs(arch, model)
    targets = ["attn.o"] if arch == "bart" else ["ffn.down"]
    dt.attach(model, dt.ParallelAdapterConfig(bottleneck=3, scale=2.5, targets=targets))
    assert reader in dt.deltas(model)["default"].paths  # the input tap came with the writer
    randomize(model)
    seen = {}
    layers = delta_layers(model)
    hooks = [capture(layers[reader], seen, "x"), capture(layers[writer], seen, "writer_in"),
             capture(layers[writer], seen, "out", output=True)]
    model(**inputs)
    for h in hooks:
        h.remove()
    delta = layers[writer].deltas["default"]
    wd, bd, wu, bu = bottleneck_of(delta)
    base_out = layers[writer].base(seen["writer_in"])
    expected = base_out + 2.5 * (F.relu(seen["x"] @ wd.T + bd) @ wu.T + bu)
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-5)


def test_learned_scale_trains():
    model = tiny_model("gpt2")
    inputs = tiny_inputs("gpt2", model)
    dt.attach(model, dt.ParallelAdapterConfig(bottleneck=4, learn_scale=True))
    randomize(model)
    scales = [p for n, p in model.named_parameters() if n.endswith(".scale")]
    assert len(scales) == 2 and all(p.requires_grad for p in scales)
    model(**inputs).logits.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs() > 0 for p in scales)


def test_gradient_checkpointing_re_runs_the_hand_over():
    model = tiny_model("llama").train()
    inputs = tiny_inputs("llama", model)
    dt.attach(model, dt.ParallelAdapterConfig(bottleneck=4))
    randomize(model)
    model(**inputs).logits.pow(2).mean().backward()
    expected = [p.grad.clone() for p in dt.trainable_parameters(model)]
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(**inputs).logits.pow(2).mean().backward()
    for grad, p in zip(expected, dt.trainable_parameters(model)):
        torch.testing.assert_close(p.grad, grad, atol=1e-6, rtol=1e-5)


def test_adapters_are_not_mergeable():
    model = tiny_model("llama")
    dt.attach(model, dt.PfeifferConfig(bottleneck=4))
    with pytest.raises(dt.ConfigError, match="cannot be merged"):
        dt.merge(model)


@pytest.mark.parametrize("options,message", [
    (dict(bottleneck=4, reduction_factor=8), "not both"),
    (dict(bottleneck=0), "positive integer"),
    (dict(reduction_factor=0.5), "reduction_factor"),
    (dict(activation="softplus"), "allowed: relu, gelu, silu, tanh"),
    (dict(init="xavier"), "near_identity, zero_up"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(dt.ConfigError, match=message):
        dt.HoulsbyConfig(**options)


def test_parallel_needs_an_output_projection():
    model = tiny_model("llama")
    with pytest.raises(dt.TargetError, match="attn.o or ffn.down"):
        dt.attach(model, dt.ParallelAdapterConfig(targets=["attn.q"]))
    with pytest.raises(dt.ConfigError, match="scale"):
        dt.ParallelAdapterConfig(scale=0)
