"""Prefix tuning and LLaMA-Adapter: their equations, cached generation, padding, checkpointing."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file
from transformers.cache_utils import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import deltatune as dt
from deltatune.layer import delta_layers
from deltatune.upstream import cache_keyword
from zoo import tiny_inputs, tiny_model

TOL = dict(atol=1e-5, rtol=1e-5)


def perturb(model, name="default", seed=1, scale=0.5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in delta_layers(model).values():
            if name in layer.deltas:
                for p in layer.deltas[name].parameters():
                    p.add_(scale * torch.randn(p.shape, generator=gen))


def prefixes_by_layer(model, name="default"):
    """[(keys, values)] per attention layer, each (1, kv_heads, n, head_dim)."""
    found = []
    for layer in delta_layers(model).values():
        delta = layer.deltas[name]
        keys, values = delta.prefixes()
        head_dim = layer.base.head_dim
        shape = lambda t: t.view(t.shape[0], -1, head_dim).transpose(0, 1).unsqueeze(0)  # noqa: E731
        found.append((shape(keys).detach(), shape(values).detach()))
    return found


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefix_equals_attending_to_extra_keys_and_values(arch):
    """softmax(q [P_K; K]ᵀ·s + [0; M]) [P_V; V], computed by transformers itself from a cache that
    holds the prefixes: the same logits. Real tokens keep their positions (given explicitly)."""
    model = tiny_model(arch)
    inputs = tiny_inputs(arch, model, batch=1)
    n = 3
    dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=n))
    perturb(model)
    with torch.no_grad():
        ours = model(**inputs).logits
        cache = DynamicCache()
        for index, (keys, values) in enumerate(prefixes_by_layer(model)):
            cache.update(keys, values, index)
        length = inputs["input_ids"].shape[1]
        with dt.disabled(model):
            reference = model(
                input_ids=inputs["input_ids"],
                attention_mask=torch.ones(1, n + length, dtype=torch.long),
                **{cache_keyword(model.forward): cache},
                position_ids=torch.arange(length)[None],  # not shifted by the prefix
                cache_position=torch.arange(n, n + length),
            ).logits
    torch.testing.assert_close(ours, reference, **TOL)


def test_llama_adapter_equation_on_one_attention_layer():
    """out = Attn(x) + W_o · (g ⊙ softmax(q (T W_K)ᵀ · s) (T W_V)), q the rotated queries."""
    model = tiny_model("llama")
    dt.attach(model, dt.LlamaAdapterConfig(adapter_len=4))
    perturb(model)
    attention = model.model.layers[1].self_attn  # the DeltaLayer
    base = attention.base
    delta = attention.deltas["default"]
    hidden = torch.randn(2, 5, model.config.hidden_size)
    position_ids = torch.arange(5)[None].expand(2, -1)
    cos, sin = model.model.rotary_emb(hidden, position_ids)
    with torch.no_grad():
        ours, _ = attention(hidden, position_embeddings=(cos, sin), attention_mask=None)
        plain, _ = base(hidden, position_embeddings=(cos, sin), attention_mask=None)
        head_dim, heads = base.head_dim, model.config.num_attention_heads
        q = base.q_proj(hidden).view(2, 5, heads, head_dim).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        k = base.k_proj(delta.adaption_prompt).view(4, -1, head_dim).transpose(0, 1)
        v = base.v_proj(delta.adaption_prompt).view(4, -1, head_dim).transpose(0, 1)
        groups = heads // k.shape[0]
        k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
        probs = torch.softmax(q @ k.transpose(-1, -2) / head_dim**0.5, dim=-1)
        extra = delta.gate.view(1, -1, 1, 1) * (probs @ v)
        expected = plain + base.o_proj(extra.transpose(1, 2).reshape(2, 5, -1))
    torch.testing.assert_close(ours, expected, **TOL)


def test_llama_adapter_is_the_identity_until_its_gate_opens():
    model = tiny_model("llama")
    inputs = tiny_inputs("llama", model)
    with torch.no_grad():
        base = model(**inputs).logits
        dt.attach(model, dt.LlamaAdapterConfig(adapter_len=4))
        assert torch.equal(model(**inputs).logits, base)


def test_llama_adapter_size_on_llama_7b_config_is_about_1_2m():
    """K=10 prompts in the top L=30 of LLaMA-7B's 32 layers: 30·10·4096 + 30·32 gates."""
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(tf.LlamaConfig())  # the defaults are LLaMA-7B's sizes
    planned = dt.plan(model, dt.LlamaAdapterConfig())
    assert len(planned.modules) == 30
    assert [m.layer for m in planned.modules] == list(range(2, 32))
    assert planned.delta_params == 30 * 10 * 4096 + 30 * 32 == 1_229_760


#: the architectures every attention method must work on, and those LLaMA-Adapter applies to
#: (causal decoders with their own key and value projections)
ATTENTION_ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2", "opt", "bert", "t5")
LLAMA_ADAPTER_ARCHITECTURES = ("llama", "mistral", "qwen2", "opt")
ATTENTION_CASES = [
    *((m, a) for m in ("prefix", "mam", "unipelt") for a in ATTENTION_ARCHITECTURES),
    ("prefix-reparameterized", "llama"), *(("llama_adapter", a) for a in LLAMA_ADAPTER_ARCHITECTURES),
]
#: generation needs a decoder: every case but the encoder's
CACHE_CASES = [(m, a) for m, a in ATTENTION_CASES if a != "bert"]


def make(method):
    if method == "prefix":
        return dt.PrefixTuningConfig(num_virtual_tokens=3)
    if method == "prefix-reparameterized":
        return dt.PrefixTuningConfig(num_virtual_tokens=3, reparameterize=True, encoder_embed_dim=8, encoder_hidden_size=8)
    if method == "unipelt":
        return dt.UniPELTConfig(r=2, num_virtual_tokens=3, bottleneck=4)
    if method == "mam":
        return dt.MAMConfig(num_virtual_tokens=3, bottleneck=4)
    return dt.LlamaAdapterConfig(adapter_len=3)


@pytest.mark.parametrize("method,arch", ATTENTION_CASES, ids=[f"{m}-{a}" for m, a in ATTENTION_CASES])
def test_every_attention_method_attaches_and_changes_the_logits(method, arch):
    """Whether an attention module computes through transformers' attention functions is seen
    by calling it, so a decorated or refactored forward upstream changes nothing."""
    model = tiny_model(arch)
    inputs = tiny_inputs(arch, model)
    with torch.no_grad():
        base = model(**inputs).logits
    dt.attach(model, make(method))
    perturb(model)
    with torch.no_grad():
        adapted = model(**inputs).logits
    assert (adapted - base).abs().max() > 1e-3


@pytest.mark.parametrize("method,arch", CACHE_CASES, ids=[f"{m}-{a}" for m, a in CACHE_CASES])
def test_greedy_generation_is_the_same_with_and_without_the_cache(method, arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(arch, model)
    inputs.pop("decoder_input_ids", None)
    dt.attach(model, make(method))
    perturb(model)
    settings = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, **settings)
        uncached = model.generate(**inputs, use_cache=False, **settings)
        with dt.disabled(model):
            plain = model.generate(**inputs, use_cache=True, **settings)
    assert torch.equal(cached.sequences, uncached.sequences)
    for with_cache, without in zip(cached.scores, uncached.scores):
        # the cache changes summation order; T5's logits are unscaled (tens), hence atol 2e-4
        torch.testing.assert_close(with_cache, without, atol=2e-4, rtol=1e-5)
    assert (cached.scores[0] - plain.scores[0]).abs().max() > 1e-3, "the delta should change the scores"


@pytest.mark.parametrize("method", ["prefix", "llama_adapter", "mam", "unipelt"])
def test_left_padded_generation_matches_each_prompt_alone(method):
    model = tiny_model("llama")
    dt.attach(model, make(method))
    perturb(model)
    prompts = [torch.tensor([5, 6, 7, 8, 9, 10]), torch.tensor([11, 12, 13])]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), torch.ones(len(p), dtype=torch.long)]) for p in prompts])
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        for row, prompt in enumerate(prompts):
            alone = model.generate(input_ids=prompt[None], max_new_tokens=5, do_sample=False, pad_token_id=0)
            assert torch.equal(batched[row, width:], alone[0, len(prompt):])


@pytest.mark.parametrize("method", ["prefix", "mam", "unipelt"])
@pytest.mark.parametrize("arch", ["bert", "t5", "llama"])
def test_right_padded_batch_matches_each_sample_alone(arch, method):
    model = tiny_model(arch)
    dt.attach(model, make(method))
    perturb(model)
    lengths = [7, 4]
    ids = torch.randint(4, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    extra = {"decoder_input_ids": torch.tensor([[0, 5, 6]] * 2)} if arch == "t5" else {}
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, **extra).logits
        for row, length in enumerate(lengths):
            alone_extra = {k: v[row : row + 1] for k, v in extra.items()}
            alone = model(input_ids=ids[row : row + 1, :length], **alone_extra).logits
            positions = alone.shape[1]
            torch.testing.assert_close(batched[row, :positions], alone[0], **TOL)


@pytest.mark.parametrize("method", ["prefix", "prefix-reparameterized", "llama_adapter", "mam", "unipelt"])
def test_gradient_checkpointing_gives_the_same_gradients(method):
    def gradients(checkpointing):
        model = tiny_model("llama")
        dt.attach(model, make(method))
        perturb(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        inputs = tiny_inputs("llama", model)
        model(**inputs, labels=inputs["input_ids"], use_cache=False).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], plain[name], **TOL)


def test_fold_keeps_the_outputs_and_saves_only_plain_prefixes(tmp_path):
    model = tiny_model("gpt2")
    inputs = tiny_inputs("gpt2", model)
    dt.attach(model, make("prefix-reparameterized"))
    perturb(model)
    with torch.no_grad():
        before = model(**inputs).logits
    trained = dt.summary(model).trainable
    dt.save(model, tmp_path / "delta")
    saved = load_file(str(tmp_path / "delta" / "delta.safetensors"))
    assert sorted(saved) == [f"transformer.h.{i}.attn.{k}" for i in range(2) for k in ("prefix_keys", "prefix_values")]
    assert dt.fold(model) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, before, **TOL)
    assert dt.summary(model).trainable == sum(t.numel() for t in saved.values()) < trained
    fresh = tiny_model("gpt2")
    dt.load(fresh, tmp_path / "delta")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, before, **TOL)


def test_other_deltas_inside_the_attention_module_still_apply():
    model = tiny_model("llama")
    inputs = tiny_inputs("llama", model)
    dt.attach(model, dt.LoRAConfig(r=2, targets=["attn.q", "attn.v"]), "lora")
    perturb(model, "lora")
    dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=2), "prefix")
    with torch.no_grad():
        both = model(**inputs).logits
        dt.activate(model, "prefix")
        prefix_only = model(**inputs).logits
        dt.activate(model, ["lora", "prefix"])
        assert torch.equal(model(**inputs).logits, both)
    assert not torch.allclose(both, prefix_only)
    assert sorted(dt.deltas(model)) == ["lora", "prefix"]
    assert "model.layers.0.self_attn.q_proj" in dt.deltas(model)["lora"].paths
    dt.detach(model, "prefix")
    assert "model.layers.0.self_attn.q_proj" in delta_layers(model)


def test_attention_in_the_models_own_code_is_refused_with_the_reason():
    model = tiny_model("bloom")
    with pytest.raises(dt.TargetError, match="not supported.*BloomAttention computes attention in its own code"):
        dt.attach(model, dt.PrefixTuningConfig())


def test_unsupported_attention_implementation_is_named():
    model = tiny_model("llama")
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(dt.TargetError, match="flash_attention_2.*'sdpa' or 'eager'"):
        dt.attach(model, dt.PrefixTuningConfig())


def test_sdpa_attention_gives_the_eager_result():
    model = tiny_model("llama")
    inputs = tiny_inputs("llama", model)
    dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=3))
    perturb(model)
    with torch.no_grad():
        eager = model(**inputs).logits
        model.config._attn_implementation_internal = "sdpa"
        sdpa = model(**inputs).logits
    torch.testing.assert_close(sdpa, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "make_config,message",
    [
        (lambda: dt.PrefixTuningConfig(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer"),
        (lambda: dt.PrefixTuningConfig(reparameterize="yes"), "reparameterize must be true or false"),
        (lambda: dt.LlamaAdapterConfig(adapter_len=-1), "adapter_len must be a positive integer"),
        (lambda: dt.LlamaAdapterConfig(param_dtype="fp8"), "param_dtype='fp8' is not valid; allowed: auto"),
    ],
)
def test_bad_options_name_the_value(make_config, message):
    with pytest.raises(dt.ConfigError, match=message):
        make_config()


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_mam_is_prefix_tuning_plus_a_parallel_ffn_adapter(arch):
    """One MAM delta == a prefix delta and a parallel adapter with the same tensors."""
    mam_model, parts_model = tiny_model(arch), tiny_model(arch)
    inputs = tiny_inputs(arch, mam_model)
    dt.attach(mam_model, dt.MAMConfig(num_virtual_tokens=2, bottleneck=4))
    perturb(mam_model)
    dt.attach(parts_model, dt.PrefixTuningConfig(num_virtual_tokens=2), "prefix")
    dt.attach(parts_model, dt.ParallelAdapterConfig(bottleneck=4, scale=4.0), "parallel")
    mam = {(p, k): v for p, layer in delta_layers(mam_model).items() for k, v in layer.deltas["default"].state_dict().items()}
    with torch.no_grad():
        for path, layer in delta_layers(parts_model).items():
            for name, delta in layer.deltas.items():
                for key, value in delta.state_dict().items():
                    value.copy_(mam[(path, key)])
        torch.testing.assert_close(mam_model(**inputs).logits, parts_model(**inputs).logits, atol=0, rtol=0)
    assert dt.deltas(mam_model)["default"].config.method == "mam"
    assert len(mam) == sum(len(layer.deltas[n].state_dict()) for layer in delta_layers(parts_model).values() for n in layer.deltas)


def _unipelt_llama():
    model = tiny_model("llama")
    dt.attach(model, dt.UniPELTConfig(r=2, num_virtual_tokens=3, bottleneck=4))
    perturb(model)
    return model


def test_unipelt_gated_lora_and_adapter_equations():
    """LoRA: W0 x + σ(w·x + b)·s·B A x.  Adapter: h + σ(w·h + b)·W_up f(W_down h)."""
    model = _unipelt_llama()
    q = model.model.layers[0].self_attn.base.q_proj
    lora = q.deltas["default"]
    x = torch.randn(2, 5, model.config.hidden_size)
    with torch.no_grad():
        gate = torch.sigmoid(x @ lora.gate.weight.T + lora.gate.bias)
        expected = q.base(x) + gate * lora.scale * (x @ lora.A.T @ lora.B.T)
        torch.testing.assert_close(q(x), expected, **TOL)
        down = model.model.layers[0].mlp.down_proj
        adapter = down.deltas["default"]
        z = torch.randn(2, 5, model.config.intermediate_size)
        h = down.base(z)
        inner = adapter.adapter
        bottleneck = inner.up(torch.relu(inner.down(h)))
        expected = h + torch.sigmoid(h @ adapter.gate.weight.T + adapter.gate.bias) * bottleneck
        torch.testing.assert_close(down(z), expected, **TOL)


@pytest.mark.parametrize("gate_bias,share", [(-60.0, 0.0), (0.0, 0.5), (60.0, 1.0)])
def test_unipelt_prefix_gate_interpolates_between_without_and_with_the_prefix(gate_bias, share):
    """o = o₀ + G·(o_P − o₀) at one attention module, for G = 0, ½ and 1."""
    model = _unipelt_llama()
    attention = model.model.layers[1].self_attn
    gated = attention.deltas["default"]
    plain_prefix = tiny_model("llama")
    dt.attach(plain_prefix, dt.PrefixTuningConfig(num_virtual_tokens=3))
    reference = plain_prefix.model.layers[1].self_attn
    with torch.no_grad():
        for projection in (attention.base.q_proj, attention.base.v_proj):  # only the prefix acts
            projection.deltas["default"].B.zero_()
        gated.gate.weight.zero_()
        gated.gate.bias.fill_(gate_bias)
        reference.deltas["default"].prefix_keys.copy_(gated.prefix_keys)
        reference.deltas["default"].prefix_values.copy_(gated.prefix_values)
        hidden = torch.randn(2, 5, model.config.hidden_size)
        cos, sin = model.model.rotary_emb(hidden, torch.arange(5)[None].expand(2, -1))
        call = dict(position_embeddings=(cos, sin), attention_mask=None)
        ours, _ = attention(hidden, **call)
        with dt.disabled(model):
            without, _ = attention(hidden, **call)
        with_prefix, _ = reference(hidden, **call)
    torch.testing.assert_close(ours, without + share * (with_prefix - without), **TOL)


@pytest.mark.parametrize("method", ["prefix", "mam", "unipelt"])
def test_sequence_classification_encoder_trains(method):
    """A BERT classifier (fresh head trained alongside, as a task needs) learns with each method."""
    config = tf.BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=66, num_labels=2,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(config)
    dt.attach(model, make(method))
    model.classifier.weight.requires_grad_(True)
    model.classifier.bias.requires_grad_(True)
    ids = torch.randint(4, 128, (8, 6), generator=torch.Generator().manual_seed(0))
    labels = (ids[:, 0] % 2).long()
    params = dt.trainable_parameters(model) + list(model.classifier.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-2)
    model.train()
    losses = []
    for _ in range(40):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_calibration_initialises_prefixes_from_the_models_own_keys_and_values():
    """Li & Liang's init from activations of real words: layer l's prefixes are the keys and
    values the base model computes at layer l for the first n tokens of the first sample."""
    model = tiny_model("llama")
    inputs = tiny_inputs("llama", model, batch=2)
    n = 3
    recorded = []
    with torch.no_grad():  # the base model's own keys and values, from its cache
        cache = DynamicCache()
        model(**inputs, **{cache_keyword(model.forward): cache}, use_cache=True)
        for index in range(len(model.model.layers)):
            keys, values = cache.layers[index].keys, cache.layers[index].values  # (batch, kv_heads, seq, dim)
            flat = lambda t: t[0, :, :n].transpose(0, 1).reshape(n, -1)  # noqa: E731
            recorded.append((flat(keys), flat(values)))
    dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=n))
    assert dt.calibrate(model, [inputs], loss_fn=lambda m, b: m(**b).logits.sum()) == 2
    for (keys, values), layer in zip(recorded, delta_layers(model).values()):
        delta = layer.deltas["default"]
        torch.testing.assert_close(delta.prefix_keys, keys, atol=0, rtol=0)
        torch.testing.assert_close(delta.prefix_values, values, atol=0, rtol=0)
        assert not delta.needs_calibration
    assert dt.calibrate(model, [inputs]) == 0, "calibrated once, trained after"


CLASSIFIER_METHODS = {
    "prompt": lambda: dt.PromptTuningConfig(num_virtual_tokens=3),
    "ptuning": lambda: dt.PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8),
    "prefix": lambda: make("prefix"),
    "mam": lambda: make("mam"),
    "unipelt": lambda: make("unipelt"),
}


def _classifier():
    config = tf.BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=66, num_labels=3)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return tf.BertForSequenceClassification(config).eval()


@pytest.mark.parametrize("method", list(CLASSIFIER_METHODS))
def test_invariants_on_a_sequence_classification_encoder(method, tmp_path):
    """The invariant suite's checks on BertForSequenceClassification (the zoo's encoders are
    masked LMs): detach restores it, only delta parameters get gradients, save/load is exact,
    disabled is the base, and a mixed batch equals separate runs."""
    model = _classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(4, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 6])
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    for i, name in enumerate(("a", "b")):
        dt.attach(model, CLASSIFIER_METHODS[method](), name)
        perturb(model, name, seed=i + 1)
    model.train()
    dt.activate(model, "a")
    model(input_ids=ids, attention_mask=mask).logits.pow(2).sum().backward()
    delta_params = {id(p) for p in dt.trainable_parameters(model, "a")}
    assert all((p.grad is not None) == (id(p) in delta_params) for p in model.parameters())
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        separate = {}
        for name in ("a", "b"):
            dt.activate(model, name)
            separate[name] = model(input_ids=ids, attention_mask=mask).logits
        with dt.disabled(model):
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, base, atol=0, rtol=0)
        with dt.route(model, ["b", None, "a"]):
            mixed = model(input_ids=ids, attention_mask=mask).logits
        for row, name in enumerate(["b", None, "a"]):
            torch.testing.assert_close(mixed[row], (base if name is None else separate[name])[row], **TOL)
        dt.save(model, tmp_path / "delta", "a")
        fresh = _classifier()
        dt.load(fresh, tmp_path / "delta")
        torch.testing.assert_close(fresh(input_ids=ids, attention_mask=mask).logits, separate["a"], atol=0, rtol=0)
    dt.detach(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_llama_adapter_is_refused_on_a_sequence_classification_encoder():
    with pytest.raises(dt.TargetError, match="not supported.*causal self-attention of decoder-only models"):
        dt.attach(_classifier(), dt.LlamaAdapterConfig())
