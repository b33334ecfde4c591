"""Quantized bases (QLoRA): the NF4 + double-quantization storage equation, deltas training on
4-bit layers exactly as on their dequantized weights, merging, requantizing, preparing for
k-bit training, optimizers by name, and the memory table. The invariant suite
(test_invariants.py) runs every supporting method on quantized tiny models too."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.analysis.memory import weight_memory
from deltatune.backends import backend_for
from deltatune.layer import delta_layers
from deltatune.quant import expected_bits, is_quantized, quantized_linear
from deltatune.train.optim import OptimizerFallbackWarning, make_optimizer
from zoo import tiny_inputs, tiny_model

bnb = pytest.importorskip("bitsandbytes")

# Table of NF4 levels from the QLoRA paper (Dettmers et al. 2023, appendix E), 4 decimals
NF4_LEVELS = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
              0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]


def quantized_models(arch="llama", scheme="nf4"):
    """A quantized tiny model and a float twin whose linear layers hold exactly its dequantized
    weights."""
    model = dt.quantize(tiny_model(arch), scheme)
    dense = copy.deepcopy(model)
    for path, module in list(dense.named_modules()):
        if is_quantized(module):
            parent, _, child = path.rpartition(".")
            setattr(dense.get_submodule(parent), child, backend_for(module).dequantized_module())
    return model, dense


def test_nf4_double_quant_storage_equals_the_paper_equation():
    torch.manual_seed(0)
    weight = torch.randn(96, 256) * 0.05
    layer = quantized_linear(weight, None, "nf4", double_quant=True)
    state = layer.weight.quant_state
    torch.testing.assert_close(state.code, torch.tensor(NF4_LEVELS), atol=1e-4, rtol=0)
    packed = layer.weight.data.flatten()
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).flatten().long()  # first value in the high nibble
    # c_b ≈ c2_B · F8[k_b] + μ  for blocks of 256 constants
    constants = state.state2.code[state.absmax.long()] * state.state2.absmax.repeat_interleave(256)[: state.absmax.numel()]
    constants = constants + state.offset
    by_hand = state.code[codes] * constants.repeat_interleave(64)
    torch.testing.assert_close(by_hand.view(96, 256), backend_for(layer).dense_weight(), atol=0, rtol=0)
    # each block's largest value is kept up to the 8-bit rounding of its constant
    blocks = weight.flatten().view(-1, 64).abs().amax(dim=1)
    torch.testing.assert_close(constants, blocks, rtol=2e-2, atol=0)
    assert (by_hand.view(96, 256) - weight).abs().max() <= 0.2 * blocks.max()


@pytest.mark.parametrize("double_quant,bits", [(True, 4.127), (False, 4.5)])
def test_bits_per_weight_measured_from_tensors(double_quant, bits):
    model = nn.Sequential(nn.Linear(1024, 1024, bias=False))
    dt.quantize(model, "nf4", double_quant=double_quant, skip=())
    storage = dt.quantized_storage(model)
    assert storage.parameters == 1024 * 1024 and storage.layers == 1
    assert expected_bits("nf4", double_quant=double_quant) == pytest.approx(bits, abs=5e-4)
    assert storage.bits_per_parameter == pytest.approx(bits, rel=0.01)


def test_weight_memory_table_matches_measured_storage():
    model = tiny_model("llama")
    table = weight_memory(model)
    quantized = dt.quantize(tiny_model("llama"), "nf4")
    measured = dt.quantized_storage(quantized)
    nf4_dq = table.formats.index("nf4+dq")
    linear, constants = table.rows[0][1][nf4_dq], table.rows[1][1][nf4_dq]
    assert linear == measured.code_bytes
    assert constants == measured.constant_bytes  # level tables and offset included, per layer
    assert table.rows[0][1][0] == 4 * measured.parameters


@pytest.mark.parametrize("arch,scheme", [("llama", "nf4"), ("gpt2", "nf4"), ("llama", "fp4"), ("bert", "int8")])
def test_quantize_replaces_linear_layers_but_not_the_head_or_tied_weights(arch, scheme):
    model = tiny_model(arch)
    head = model.get_output_embeddings()
    dt.quantize(model, scheme)
    kinds = {type(m).__name__ for m in model.modules() if is_quantized(m)}
    assert kinds == {"Linear8bitLt" if scheme == "int8" else "Linear4bit"}
    assert model.get_output_embeddings() is head and not is_quantized(head)


def test_quantize_skip_patterns_and_models_float_modules():
    model = dt.quantize(tiny_model("llama"), "nf4", skip=("ffn",))
    assert not is_quantized(model.model.layers[0].mlp.down_proj)
    assert is_quantized(model.model.layers[0].self_attn.q_proj)
    t5 = dt.quantize(tiny_model("t5"), "nf4")
    assert not is_quantized(t5.encoder.block[0].layer[1].DenseReluDense.wo)  # its code needs a float weight
    assert is_quantized(t5.encoder.block[0].layer[1].DenseReluDense.wi_0)


def test_quantize_errors_name_the_bad_value():
    with pytest.raises(dt.ConfigError, match="'nf3' is not valid; allowed: nf4, fp4, int8"):
        dt.quantize(tiny_model("llama"), "nf3")
    with pytest.raises(dt.ConfigError, match="blocksize"):
        dt.quantize(tiny_model("llama"), "nf4", blocksize=48)
    model = dt.attach(tiny_model("llama"), dt.LoRAConfig())
    with pytest.raises(dt.ConfigError, match="before attaching"):
        dt.quantize(model, "nf4")


@pytest.mark.parametrize("config", [dt.LoRAConfig(r=4), dt.LoRAConfig(r=4, dora=True), dt.IA3Config(),
                                    dt.HoulsbyConfig(), dt.KronAConfig()], ids=["lora", "dora", "ia3", "houlsby", "krona"])
def test_delta_on_4bit_base_equals_delta_on_its_dequantized_weights(config):
    """QLoRA eq. 6: Y = X·dequant(W) + s·X·L1·L2, and the gradient reaches the delta through the
    dequantized weight."""
    model, dense = quantized_models()
    inputs = tiny_inputs("llama", model)
    for m in (model, dense):
        torch.manual_seed(3)
        dt.attach(m, config)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in dt.trainable_parameters(m):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    outputs = [m(**inputs).logits for m in (model, dense)]
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    for out in outputs:
        out.pow(2).mean().backward()
    for p, q in zip(dt.trainable_parameters(model), dt.trainable_parameters(dense)):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)


def test_merge_onto_4bit_is_exact_and_unmerge_restores_the_quantized_layer():
    model, _ = quantized_models()
    inputs = tiny_inputs("llama", model)
    q_proj = model.model.layers[0].self_attn.q_proj
    dt.attach(model, dt.LoRAConfig(r=4))
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(0.1 * torch.randn_like(p))
        expected = model(**inputs).logits
        dt.merge(model)
        layer = delta_layers(model)["model.layers.0.self_attn.q_proj"]
        assert type(layer.base) is nn.Linear and layer.attached_base is q_proj
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
        dt.unmerge(model)
        assert layer.base is q_proj
        torch.testing.assert_close(model(**inputs).logits, expected, atol=0, rtol=0)
        dt.merge_and_detach(model)
        assert not delta_layers(model) and not any(is_quantized(m) for m in model.modules())
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-5, rtol=1e-5)


def test_requantizing_a_merge_reports_the_error_it_introduced():
    model, _ = quantized_models()
    dt.attach(model, dt.LoRAConfig(r=4))
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(0.1 * torch.randn_like(p))
    exact = dt.merge_and_detach(copy.deepcopy(model))
    probe = tiny_inputs("llama", model)
    report = dt.merge_and_requantize(model, probe=probe)
    assert report.layers == 14
    assert sum(is_quantized(m) for m in model.modules()) == 14 and not delta_layers(model)
    with torch.no_grad():
        difference = (model(**probe).logits - exact(**probe).logits).abs()
    assert report.max_abs == pytest.approx(difference.max().item(), rel=1e-5)
    assert report.mean_abs == pytest.approx(difference.mean().item(), rel=1e-5)
    assert 0 < report.mean_abs < report.max_abs
    assert "max |Δ|" in str(report)


def test_prepare_for_kbit_training_upcasts_float_parts_and_checkpoints_with_same_grads():
    model = tiny_model("llama").to(torch.bfloat16)
    dt.quantize(model, "nf4")
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16
    inputs = tiny_inputs("llama", model)
    reference = copy.deepcopy(model)
    dt.prepare_for_kbit_training(model, gradient_checkpointing=True)
    dt.prepare_for_kbit_training(reference)
    assert model.model.norm.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    assert model.is_gradient_checkpointing and not reference.is_gradient_checkpointing
    grads = []
    for m in (model, reference):
        torch.manual_seed(0)
        dt.attach(m, dt.LoRAConfig(r=4, init="gaussian"))
        with torch.no_grad():
            for p in dt.trainable_parameters(m):
                p.add_(0.05)
        m.train()
        m(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append([p.grad for p in dt.trainable_parameters(m)])
    assert all(g is not None for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name,used,kind", [
    ("adamw", "adamw", torch.optim.AdamW),
    ("adamw_8bit", "adamw_8bit", "AdamW8bit"),
])
def test_optimizers_by_name(name, used, kind):
    weight = nn.Parameter(torch.full((512, 512), 2.0))
    optimizer, actual = make_optimizer(name, [weight], lr=0.05)
    assert actual == used
    assert isinstance(optimizer, kind) if isinstance(kind, type) else type(optimizer).__name__ == kind
    for _ in range(5):
        weight.pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert weight.abs().max() < 2.0


@pytest.mark.parametrize("name,fallback", [("paged_adamw", "adamw"), ("paged_adamw_8bit", "adamw_8bit")])
def test_paged_optimizer_without_cuda_says_it_runs_unpaged(name, fallback):
    weight = nn.Parameter(torch.zeros(4, 4))
    with pytest.warns(OptimizerFallbackWarning, match=f"not on a CUDA device; using {fallback}"):
        _, used = make_optimizer(name, [weight], lr=1e-3)
    assert used == fallback
    with pytest.raises(dt.ConfigError, match="allowed: adamw, adamw_8bit, paged_adamw, paged_adamw_8bit"):
        make_optimizer("sgd", [weight], lr=1e-3)


def test_delta_trained_on_4bit_base_loads_on_the_float_model(tmp_path):
    model = dt.quantize(tiny_model("llama"), "nf4")
    dt.attach(model, dt.LoRAConfig(r=4))
    dt.save(model, tmp_path / "delta")
    assert dt.load(tiny_model("llama"), tmp_path / "delta") == ["default"]


@pytest.mark.slow
def test_bundled_model_nf4_storage_is_4_127_bits_per_weight():
    from deltatune.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(quantize="nf4")
    storage = dt.quantized_storage(model)
    assert storage.layers == 30 * 7 and storage.parameters == 106_168_320
    assert storage.bits_per_parameter == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), rel=0.01)
