"""Quantized bases (QLoRA): the NF4 + double-quantization storage equation, deltas training on
4-bit layers exactly as on their dequantized weights, merging, requantizing, preparing for
k-bit training, optimizers by name, and the memory table; bitsandbytes' CPU-packed 4-bit layout
(forced on or off whatever the CPU, see ``zoo.cpu_packing``) read, converted back and merged
right. The invariant suite (test_invariants.py) runs every supporting method on quantized tiny
models too, in both layouts."""

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
from zoo import (cpu_packing, is_cpu_packed, packed_weight, randomize_delta, reference_packed_product, tiny_inputs,
                 tiny_model)

bnb = pytest.importorskip("bitsandbytes")

# Table of NF4 levels from the QLoRA paper (Dettmers et al. 2023, appendix E), 4 decimals
NF4_LEVELS = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
              0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]


def quantized_models(arch="llama", scheme="nf4"):
    """A quantized tiny model and a float twin whose linear layers hold exactly its dequantized
    weights, in the standard 4-bit layout."""
    model = tiny_model(f"{arch}+{scheme}")
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


# bitsandbytes' CPU-packed 4-bit layout ----------------------------------------------------
# On a CPU with AVX512-BF16, bitsandbytes converts a Linear4bit at its first forward without
# gradient; zoo.cpu_packing forces that choice either way. Where the CPU lacks the kernel,
# conftest computes the packed product by reference (zoo.reference_packed_product), so these
# tests read the packed storage on any machine; test_reference_packed_product_matches_the_kernel
# checks the reference where the kernel exists. The packed kernel rounds its inputs and weights
# to bf16 (8 significant bits): its outputs are compared to 2^-6 of their largest value.
LAYOUTS = ["standard", "cpu-packed"]
SCHEMES_4BIT = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


def evaluated_layer(scheme, double_quant, layout, shape=(96, 256)):
    """A 4-bit layer of random weights after one forward without gradient in eval mode (which
    converts it where ``layout`` is cpu-packed), its standard dense weight from before, and the
    input and output of that forward. 96 rows of 4 blocks: a shape the conversion fits."""
    torch.manual_seed(0)
    with cpu_packing(layout == "cpu-packed"):
        layer = quantized_linear(torch.randn(shape) * 0.05, torch.randn(shape[0]) * 0.1, scheme,
                                 double_quant=double_quant).eval()
    standard = backend_for(layer).dense_weight()
    x = torch.randn(4, shape[1])
    with torch.no_grad():
        y = layer(x)
    assert backend_for(layer).cpu_packed == (layout == "cpu-packed")
    return layer, standard, x, y


def assert_bf16_close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=2**-6 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scheme,double_quant", SCHEMES_4BIT)
def test_4bit_weight_reads_as_the_layer_computes_in_both_layouts(scheme, double_quant, layout):
    layer, standard, x, y = evaluated_layer(scheme, double_quant, layout)
    weight = backend_for(layer).dense_weight()
    if layout == "standard":
        assert torch.equal(weight, standard)
        torch.testing.assert_close(y, x @ weight.T + layer.bias, atol=1e-5, rtol=1e-5)
        return
    # what the packed layout holds, decoded from its definition, not by deltatune
    assert torch.equal(weight, packed_weight(layer.weight.data, layer.weight.quant_state))
    # the standard weight with its block constants rounded to bf16 (relative 2^-9)
    torch.testing.assert_close(weight, standard, rtol=2**-8, atol=0)
    assert_bf16_close(y, x @ weight.T + layer.bias)


@pytest.mark.parametrize("scheme,double_quant", SCHEMES_4BIT)
def test_packed_4bit_layer_converts_back_to_what_it_held(scheme, double_quant):
    """Saving a state dict converts the layer back (bitsandbytes misorders the constants of a
    layer without double quantization; deltatune orders them). Without double quantization the
    bf16 constants come back exactly; with it they are quantized to 8 bits again (within 1% of
    the largest weight)."""
    layer, _, x, _ = evaluated_layer(scheme, double_quant, "cpu-packed")
    packed = backend_for(layer).dense_weight()
    layer.state_dict()
    assert not backend_for(layer).cpu_packed
    weight = backend_for(layer).dense_weight()
    torch.testing.assert_close(weight, packed, atol=0.01 * packed.abs().max().item() if double_quant else 0, rtol=0)
    layer.train()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ weight.T + layer.bias, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradient_reaches_the_input_of_an_evaluated_4bit_layer(layout):
    """bitsandbytes' packed kernel has no gradient: an input's gradient through a layer packed by
    an evaluation would vanish silently; the layer goes back to the standard layout instead."""
    layer, _, x, _ = evaluated_layer("nf4", True, layout)
    layer.train()
    x.requires_grad_(True)
    layer(x).pow(2).sum().backward()
    assert not backend_for(layer).cpu_packed
    weight = backend_for(layer).dense_weight()
    torch.testing.assert_close(x.grad, 2 * (x.detach() @ weight.T + layer.bias) @ weight, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bits_per_weight_tell_the_layout(layout):
    model = nn.Sequential(nn.Linear(1024, 1024, bias=False))
    with cpu_packing(layout == "cpu-packed"):
        dt.quantize(model, "nf4", skip=())
    with torch.no_grad():
        model.eval()(torch.randn(2, 1024))
    storage = dt.quantized_storage(model)
    packed = layout == "cpu-packed"
    assert storage.schemes == (("nf4 cpu-packed",) if packed else ("nf4+dq",))
    assert expected_bits("nf4", cpu_packed=True) == 4.25
    assert storage.bits_per_parameter == pytest.approx(expected_bits("nf4", cpu_packed=packed), rel=0.01)
    model.state_dict()  # converts back, double-quantizing the constants again
    assert dt.quantized_storage(model).schemes == ("nf4+dq",)
    assert dt.quantized_storage(model).bits_per_parameter == pytest.approx(expected_bits("nf4"), rel=0.01)


def test_layers_the_packed_layout_does_not_fit_stay_standard():
    """The tiny Llama's rows of 32 values are shorter than a 64-value block, and its key/value
    projections have 16 rows, fewer than the conversion's blocks of 32: bitsandbytes' conversion
    raised on them at the first evaluation. Only `down_proj` (32 rows of 64) converts; the model
    then evaluates and trains (the sequence of test_only_delta_parameters_train)."""
    model = tiny_model("llama+nf4:cpu-packed")
    inputs = tiny_inputs("llama", model)
    with torch.no_grad():
        model(**inputs)
    packed = {path for path, m in model.named_modules() if is_quantized(m) and backend_for(m).cpu_packed}
    assert packed == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    dt.attach(model, dt.LoRAConfig(r=4, targets=["all-linear"]))
    model.train()
    model(**inputs).logits.pow(2).mean().backward()
    assert all(p.grad is not None for p in dt.trainable_parameters(model))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layers_transformers_made_are_guarded_when_loaded_or_attached(tiny_dir, layout):
    """4-bit layers made by transformers' BitsAndBytesConfig: through deltatune's loader, and
    loaded by the user, then given a delta."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from deltatune.models import load_model_and_tokenizer

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    with cpu_packing(layout == "cpu-packed"):
        loaded, _ = load_model_and_tokenizer(tiny_dir, quantize="nf4")
        users = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=config, device_map={"": "cpu"})
    dt.attach(users, dt.LoRAConfig(r=4, targets=["attn.q"]))
    for model in (loaded, users):
        inputs = tiny_inputs("llama", model)
        with torch.no_grad():
            model.eval()(**inputs)
        packed = {path.rpartition(".")[2] for path, m in model.named_modules() if is_quantized(m) and backend_for(m).cpu_packed}
        assert packed == ({"down_proj"} if layout == "cpu-packed" else set())


@pytest.mark.parametrize("arch", ["llama-wide+nf4", "llama-wide+nf4:cpu-packed"])
def test_merge_unmerge_and_requantize_in_both_layouts(arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(arch, model)
    with torch.no_grad():
        model(**inputs)  # converts every layer of the cpu-packed one
    dt.attach(model, dt.LoRAConfig(r=4, targets=["all-linear"]))
    randomize_delta(model, scale=0.1)
    layers = delta_layers(model)
    assert all(layer.backend.cpu_packed == is_cpu_packed(arch) for layer in layers.values())
    held = {path: layer.backend.dense_weight() for path, layer in layers.items()}
    with torch.no_grad():
        unmerged = model(**inputs).logits
        dt.merge(model)
        for path, layer in layers.items():  # the weight the layer held, plus ΔW
            torch.testing.assert_close(layer.base.weight, held[path] + layer.deltas["default"].delta_weight(),
                                       atol=1e-6, rtol=0)
        merged = model(**inputs).logits
        if is_cpu_packed(arch):
            assert_bf16_close(merged, unmerged)
        else:
            torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
        dt.unmerge(model)
        torch.testing.assert_close(model(**inputs).logits, unmerged, atol=0, rtol=0)
        exact = dt.merge_and_detach(copy.deepcopy(model))
        report = dt.merge_and_requantize(model, probe=inputs)
        difference = (model(**inputs).logits - exact(**inputs).logits).abs()
    assert report.layers == len(layers) == 14
    assert report.max_abs == pytest.approx(difference.max().item(), rel=1e-5)
    assert 0 < report.mean_abs < report.max_abs


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="the CPU has no kernel for the packed layout")
@pytest.mark.parametrize("scheme", ["nf4", "fp4"])
def test_reference_packed_product_matches_the_kernel(scheme):
    """The reference that stands in for the packed kernel where a CPU lacks it, checked here
    against the kernel (one bf16 rounding of the output apart)."""
    layer, _, x, _ = evaluated_layer(scheme, True, "cpu-packed")
    state = layer.weight.quant_state
    kernel = bnb.functional.gemv_4bit(x, layer.weight, state=state)
    reference = reference_packed_product(x, layer.weight.data, state)
    torch.testing.assert_close(reference, kernel, atol=2**-8 * kernel.abs().max().item(), rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bundled_model_merges_right_after_an_evaluation(layout):
    """The bundled SmolLM2-135M in NF4 with a non-zero LoRA: one evaluation without gradient
    converts all 210 layers where the layout is cpu-packed. Merging then reads the packed
    weights (exactly as the layout defines them); the unmerged model runs the bf16 kernel through
    30 blocks, ~1.5 (max) and 0.13 (mean) from the fp32 merged one on logits of mean size 13,
    where misreading the layout moved them by up to 36.5."""
    from deltatune.models import load_model_and_tokenizer

    with cpu_packing(layout == "cpu-packed"):
        model, _ = load_model_and_tokenizer(quantize="nf4")
    dt.attach(model, dt.LoRAConfig(r=8))
    randomize_delta(model, scale=0.02)
    ids = torch.randint(100, 40000, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        layers = delta_layers(model).values()
        assert all(layer.backend.cpu_packed == (layout == "cpu-packed") for layer in layers)
        if layout == "cpu-packed":
            assert all(torch.equal(layer.backend.dense_weight(), packed_weight(layer.base.weight.data, layer.base.weight.quant_state))
                       for layer in layers)
        storage = dt.quantized_storage(model)
        assert storage.schemes == (("nf4 cpu-packed",) if layout == "cpu-packed" else ("nf4+dq",))
        assert storage.bits_per_parameter == pytest.approx(expected_bits("nf4", cpu_packed=layout == "cpu-packed"), rel=0.01)
        dt.merge(model)
        difference = (model(input_ids=ids).logits - unmerged).abs()
        dt.unmerge(model)
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, atol=0, rtol=0)
    if layout == "cpu-packed":
        assert difference.max() < 3 and difference.mean() < 0.3
    else:
        assert difference.max() < 1e-3
    report = dt.merge_and_requantize(model, probe=ids)
    assert report.layers == 210 and not delta_layers(model)
    assert 0 < report.mean_abs < report.max_abs
