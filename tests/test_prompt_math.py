"""Prompt tuning and P-tuning checked against their equations, with caches, padding and routing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.layer import delta_layers
from deltatune.methods.prompt import PromptDelta
from zoo import FFN_SIZE, HIDDEN_SIZE, NUM_HEADS, NUM_LAYERS, VOCAB_SIZE, randomize_delta, tiny_inputs, tiny_model

TOL = dict(atol=1e-5, rtol=1e-5)  # fp32, the same operations in another order at most


def randomize(model, name="default", seed=0, scale=0.5):
    randomize_delta(model, name, seed, scale)


def prompt_delta(model, name="default") -> PromptDelta:
    (delta,) = [l.deltas[name] for l in delta_layers(model).values()
                if name in l.deltas and isinstance(l.deltas[name], PromptDelta)]
    return delta


def manual_prompts(delta: PromptDelta) -> torch.Tensor:
    """P from the delta's parameters, written out: the plain P, or MLP(BiLSTM(H)) / MLP(H)."""
    if delta.folded:
        return delta.prompt_embeddings
    enc = delta.encoder
    h = enc.embeddings
    if enc.lstm is not None:
        h = enc.lstm(h[None])[0][0]
    linears = [m for m in enc.mlp if isinstance(m, nn.Linear)]
    for i, lin in enumerate(linears):
        h = F.linear(h, lin.weight, lin.bias)
        if i < len(linears) - 1:
            h = F.relu(h)
    return h


def prompted_base_logits(model, input_ids, attention_mask, prompts, **kwargs):
    """The base model run on inputs_embeds = [P; E(x)], mask [1; m], the first n outputs dropped."""
    n = prompts.shape[0]
    with dt.disabled(model), torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids)
        batch = embeds.shape[0]
        embeds = torch.cat([prompts[None].expand(batch, -1, -1).to(embeds.dtype), embeds], 1)
        mask = torch.cat([torch.ones(batch, n, dtype=attention_mask.dtype), attention_mask], 1)
        return model(inputs_embeds=embeds, attention_mask=mask, **kwargs).logits[:, n:]


CONFIGS = {
    "prompt": lambda: dt.PromptTuningConfig(num_virtual_tokens=4),
    "ptuning-lstm": lambda: dt.PTuningConfig(num_virtual_tokens=4, encoder="lstm", encoder_hidden_size=8),
    "ptuning-mlp": lambda: dt.PTuningConfig(num_virtual_tokens=4, encoder="mlp", encoder_hidden_size=8),
}


# (a) the equation ------------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(CONFIGS))
def test_logits_equal_base_on_prompt_then_tokens(method):
    model = tiny_model("llama")
    inputs = tiny_inputs("llama", model)
    dt.attach(model, CONFIGS[method]())
    randomize(model)
    delta = prompt_delta(model)
    with torch.no_grad():
        got = model(**inputs).logits
        prompts = manual_prompts(delta)
    assert got.shape[1] == inputs["input_ids"].shape[1]  # aligned with the user's tokens
    expected = prompted_base_logits(model, inputs["input_ids"], inputs["attention_mask"], prompts)
    torch.testing.assert_close(got, expected, **TOL)


def test_attach_places_the_prompt_on_the_body_and_a_mask_companion_on_the_decoder():
    paths = {}
    for arch in ("llama", "gpt2", "opt", "bert", "distilbert", "t5", "bart"):
        model = tiny_model(arch)
        dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=2))
        paths[arch] = {p: type(l.deltas["default"]).__name__ for p, l in delta_layers(model).items()}
    assert paths["llama"] == {"model": "PromptDelta"}
    assert paths["gpt2"] == {"transformer": "PromptDelta"}
    assert paths["opt"] == {"model.decoder": "PromptDelta"}
    assert paths["bert"] == {"bert": "PromptDelta"}
    assert paths["distilbert"] == {"distilbert": "PromptDelta"}
    assert paths["t5"] == {"encoder": "PromptDelta", "decoder": "EncoderPromptMask"}
    assert paths["bart"] == {"model.encoder": "PromptDelta", "model.decoder": "EncoderPromptMask"}


def test_encoder_decoder_keeps_the_prompt_in_the_encoder_output():
    model = tiny_model("t5")
    inputs = tiny_inputs("t5", model)
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=3))
    randomize(model)
    prompts = prompt_delta(model).prompt_embeddings.detach()
    with torch.no_grad():
        out = model(**inputs)
    assert out.encoder_last_hidden_state.shape[1] == 3 + inputs["input_ids"].shape[1]
    with dt.disabled(model), torch.no_grad():
        embeds = model.get_encoder().embed_tokens(inputs["input_ids"])
        embeds = torch.cat([prompts[None].expand(2, -1, -1), embeds], 1)
        mask = torch.cat([torch.ones(2, 3, dtype=torch.long), inputs["attention_mask"]], 1)
        expected = model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=inputs["decoder_input_ids"]).logits
    torch.testing.assert_close(out.logits, expected, **TOL)


def test_two_active_prompts_concatenate_the_later_first():
    model = tiny_model("llama")
    inputs = tiny_inputs("llama", model)
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=2), "a")
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=3), "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    dt.activate(model, ["a", "b"])
    with torch.no_grad():
        got = model(**inputs).logits
    both = torch.cat([prompt_delta(model, "b").prompt_embeddings, prompt_delta(model, "a").prompt_embeddings]).detach()
    expected = prompted_base_logits(model, inputs["input_ids"], inputs["attention_mask"], both)
    torch.testing.assert_close(got, expected, **TOL)


# (b) generation with and without the KV cache ----------------------------------------------------

@pytest.mark.parametrize("arch,method", [(a, m) for m in ("prompt", "ptuning-lstm") for a in ("llama", "gpt2", "t5")])
def test_greedy_generation_is_the_same_with_and_without_cache(arch, method):
    model = tiny_model(arch)
    inputs = {k: v for k, v in tiny_inputs(arch, model).items() if not k.startswith("decoder_")}
    dt.attach(model, CONFIGS[method]())
    randomize(model)
    kwargs = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        cached = model.generate(**inputs, **kwargs, use_cache=True)
        uncached = model.generate(**inputs, **kwargs, use_cache=False)
        with dt.disabled(model):
            plain = model.generate(**inputs, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), **TOL)
    assert (cached.logits[0] - plain.logits[0]).abs().max() > 1e-3  # the prompt matters


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "bloom", "t5"])
def test_routed_generation_with_different_prompt_lengths(arch):
    model = tiny_model(arch)
    inputs = {k: v for k, v in tiny_inputs(arch, model, batch=3).items() if not k.startswith("decoder_")}
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=2), "a")
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=5), "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    kwargs = dict(max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        separate = {}
        for name in ("a", "b"):
            dt.activate(model, name)
            separate[name] = model.generate(**inputs, **kwargs)
        with dt.disabled(model):
            separate[None] = model.generate(**inputs, **kwargs)
        order = ["b", None, "a"]
        with dt.route(model, order):
            cached = model.generate(**inputs, **kwargs)
            uncached = model.generate(**inputs, **kwargs, use_cache=False)
    assert torch.equal(cached, uncached)
    for row, name in enumerate(order):
        assert torch.equal(cached[row], separate[name][row]), (row, name)


# (c) padding ----------------------------------------------------------------------------------

def _ragged(seed=0, lengths=(8, 5, 3)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB_SIZE, (n,), generator=gen) for n in lengths]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_left_padded_batch_equals_single_runs(arch):
    model = tiny_model(arch)
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=3))
    randomize(model)
    seqs = _ragged()
    width = max(len(s) for s in seqs)
    ids = torch.stack([F.pad(s, (width - len(s), 0), value=0) for s in seqs])
    mask = torch.stack([F.pad(torch.ones(len(s), dtype=torch.long), (width - len(s), 0)) for s in seqs])
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate makes them
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        for row, s in enumerate(seqs):
            single = model(input_ids=s[None]).logits[0]
            torch.testing.assert_close(batched[row, width - len(s):], single, **TOL)
        # and through generate
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        for row, s in enumerate(seqs):
            alone = model.generate(input_ids=s[None], max_new_tokens=4, do_sample=False)
            assert torch.equal(out[row, width - len(s):], alone[0])


@pytest.mark.parametrize("arch", ["bert", "roberta", "t5"])
def test_right_padded_batch_equals_single_runs(arch):
    model = tiny_model(arch)
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=3))
    randomize(model)
    seqs = _ragged()
    width = max(len(s) for s in seqs)
    ids = torch.stack([F.pad(s, (0, width - len(s)), value=0) for s in seqs])
    mask = torch.stack([F.pad(torch.ones(len(s), dtype=torch.long), (0, width - len(s))) for s in seqs])
    extra = {}
    if arch == "t5":
        extra["decoder_input_ids"] = torch.randint(4, VOCAB_SIZE, (3, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, **extra).logits
        for row, s in enumerate(seqs):
            single_extra = {k: v[row : row + 1] for k, v in extra.items()}
            single = model(input_ids=s[None], **single_extra).logits[0]
            got = batched[row] if arch == "t5" else batched[row, : len(s)]
            torch.testing.assert_close(got, single, **TOL)


# mixed batches with prompts of different lengths -------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "bloom", "bert", "roberta", "t5", "bart"])
def test_routed_rows_equal_separate_runs_with_different_lengths(arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(arch, model, batch=3)
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=2), "a")
    dt.attach(model, dt.PTuningConfig(num_virtual_tokens=5, encoder="mlp", encoder_hidden_size=8), "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    with torch.no_grad():
        separate = {}
        for name in ("a", "b"):
            dt.activate(model, name)
            separate[name] = model(**inputs).logits
        with dt.disabled(model):
            separate[None] = model(**inputs).logits
        for order in (["b", None, "a"], ["a", "b", None]):
            with dt.route(model, order):
                mixed = model(**inputs).logits
            for row, name in enumerate(order):
                # positions the user masked out compute nothing defined (a query whose keys are all
                # masked attends uniformly to every key of its row, and the slots add keys)
                keep = inputs["attention_mask"][row].bool() if "decoder_input_ids" not in inputs else slice(None)
                torch.testing.assert_close(mixed[row][keep], separate[name][row][keep], **TOL)


# (d) gradient checkpointing ---------------------------------------------------------------------

@pytest.mark.parametrize("method", list(CONFIGS))
def test_gradient_checkpointing_gives_the_same_gradients(method):
    def grads(checkpointing: bool):
        model = tiny_model("llama")
        inputs = tiny_inputs("llama", model)
        dt.attach(model, CONFIGS[method]())
        randomize(model)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()  # the tiny Llama has no dropout
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain and set(plain) == set(checkpointed)
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], plain[name], **TOL)


# (e) labels and the loss -----------------------------------------------------------------------

def test_causal_lm_loss_ignores_the_virtual_positions():
    model = tiny_model("llama")
    inputs = tiny_inputs("llama", model)
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=4))
    randomize(model)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
    logits = prompted_base_logits(model, inputs["input_ids"], inputs["attention_mask"], prompt_delta(model).prompt_embeddings)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB_SIZE), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected, **TOL)


def test_masked_lm_loss_ignores_the_virtual_positions():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert", model)
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=4))
    randomize(model)
    labels = inputs["input_ids"].clone()
    labels[:, ::2] = -100
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
    logits = prompted_base_logits(model, inputs["input_ids"], inputs["attention_mask"], prompt_delta(model).prompt_embeddings)
    expected = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected, **TOL)


# (f) P-tuning: folding, and what a checkpoint holds ----------------------------------------------

@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_fold_keeps_outputs_and_saves_only_plain_prompts(encoder, tmp_path):
    model = tiny_model("gpt2")
    inputs = tiny_inputs("gpt2", model)
    dt.attach(model, dt.PTuningConfig(num_virtual_tokens=4, encoder=encoder, encoder_hidden_size=8))
    randomize(model)
    delta = prompt_delta(model)
    trained_params = sum(p.numel() for p in delta.parameters())
    with torch.no_grad():
        before = model(**inputs).logits
    dt.save(model, tmp_path / "unfolded")
    assert dt.fold(model) == 1 and delta.folded
    assert sum(p.numel() for p in delta.parameters()) == 4 * HIDDEN_SIZE < trained_params
    with torch.no_grad():
        after = model(**inputs).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)

    saved = load_file(str(tmp_path / "unfolded" / "delta.safetensors"))
    assert list(saved) == ["transformer.prompt_embeddings"]
    assert saved["transformer.prompt_embeddings"].shape == (4, HIDDEN_SIZE)
    fresh = tiny_model("gpt2")
    dt.load(fresh, tmp_path / "unfolded")
    assert prompt_delta(fresh).folded
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, before, atol=0, rtol=0)


def test_ptuning_checkpoint_is_as_small_as_a_prompt_tuning_one(tmp_path):
    sizes = {}
    for name, config in (("prompt", dt.PromptTuningConfig(num_virtual_tokens=6)),
                         ("ptuning", dt.PTuningConfig(num_virtual_tokens=6, encoder_hidden_size=32))):
        model = tiny_model("t5")
        dt.attach(model, config)
        dt.save(model, tmp_path / name)
        sizes[name] = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / name / "delta.safetensors")).items()}
    assert sizes["prompt"] == sizes["ptuning"] == {"encoder.prompt_embeddings": (6, HIDDEN_SIZE)}


# (g) initialisation ----------------------------------------------------------------------------

def test_vocab_init_is_the_embeddings_of_sampled_tokens():
    model = tiny_model("llama")
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=6, init="vocab", init_seed=7))
    ids = torch.randint(0, VOCAB_SIZE, (6,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model.get_input_embeddings()(ids)
    torch.testing.assert_close(prompt_delta(model).prompt_embeddings, expected, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "bart"])
def test_token_id_init_repeats_and_cuts_to_n(arch):
    model = tiny_model(arch)
    if arch == "bart":  # a scaled embedding module: the init reads its output
        model = tf.BartForConditionalGeneration(tf.BartConfig(**{**model.config.to_dict(), "scale_embedding": True})).eval()
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=5, init="text", init_token_ids=[9, 10]))
    body = model.get_encoder() if arch == "bart" else model.model
    with torch.no_grad():
        expected = body.get_input_embeddings()(torch.tensor([9, 10, 9, 10, 9]))
    if arch == "bart":
        assert not torch.allclose(expected, body.get_input_embeddings().weight[[9, 10, 9, 10, 9]])
    torch.testing.assert_close(prompt_delta(model).prompt_embeddings, expected, atol=0, rtol=0)


def test_ptuning_init_sets_the_encoder_input():
    model = tiny_model("llama")
    dt.attach(model, dt.PTuningConfig(num_virtual_tokens=3, init="text", init_token_ids=[5, 6, 7], encoder="mlp"))
    with torch.no_grad():
        expected = model.get_input_embeddings()(torch.tensor([5, 6, 7]))
    torch.testing.assert_close(prompt_delta(model).encoder.embeddings, expected, atol=0, rtol=0)


def test_random_init_matches_the_scale_of_the_embeddings():
    model = tiny_model("llama")
    torch.manual_seed(0)
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=200))
    std = float(prompt_delta(model).prompt_embeddings.detach().std())
    target = float(model.get_input_embeddings().weight.std())
    assert 0.8 * target < std < 1.2 * target


def test_text_init_uses_the_model_tokenizer(tmp_path):
    from tiny_hub import save_tiny_model

    directory = save_tiny_model(tmp_path / "tiny")
    model = tf.AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = tf.AutoTokenizer.from_pretrained(directory)
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=4, init="text", init_text="hi!"))
    ids = tokenizer("hi!", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3
    with torch.no_grad():
        expected = model.get_input_embeddings()(torch.tensor((ids * 2)[:4]))
    torch.testing.assert_close(prompt_delta(model).prompt_embeddings, expected, atol=0, rtol=0)


def test_text_init_without_a_local_tokenizer_says_to_pass_token_ids():
    model = tiny_model("llama")
    with pytest.raises(dt.ConfigError, match="init_token_ids"):
        dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=4, init="text", init_text="hello"))
    assert not delta_layers(model)


# (h) configuration errors ----------------------------------------------------------------------

@pytest.mark.parametrize("make,words", [
    (lambda: dt.PromptTuningConfig(init="zeros"), ["'zeros'", "random, vocab, text"]),
    (lambda: dt.PTuningConfig(encoder="gru"), ["'gru'", "lstm, mlp"]),
    (lambda: dt.PromptTuningConfig(num_virtual_tokens=0), ["num_virtual_tokens", "0"]),
    (lambda: dt.PTuningConfig(encoder_hidden_size=-3), ["encoder_hidden_size", "-3"]),
    (lambda: dt.PromptTuningConfig(init="text"), ["init_token_ids", "init_text"]),
    (lambda: dt.PromptTuningConfig(init_token_ids=[1, 2]), ["init_token_ids", "init='text'", "'random'"]),
    (lambda: dt.PromptTuningConfig(init="text", init_token_ids=[1, -2]), ["init_token_ids", "-2"]),
    (lambda: dt.PromptTuningConfig(layers=[0]), ["layers", "(0,)"]),
])
def test_config_errors_name_the_bad_value_and_the_allowed_ones(make, words):
    with pytest.raises(dt.ConfigError) as info:
        make()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_token_ids_outside_the_vocabulary_are_refused_at_attach():
    model = tiny_model("llama")
    with pytest.raises(dt.ConfigError, match=f"{VOCAB_SIZE + 5}.*{VOCAB_SIZE} tokens"):
        dt.attach(model, dt.PromptTuningConfig(init="text", init_token_ids=[3, VOCAB_SIZE + 5]))


def test_config_round_trips_through_json():
    config = dt.PTuningConfig(num_virtual_tokens=7, init="text", init_token_ids=[3, 4], encoder="mlp")
    assert dt.DeltaConfig.from_dict(config.to_dict()) == config
    assert dt.config("prompt", num_virtual_tokens=3) == dt.PromptTuningConfig(num_virtual_tokens=3)


def test_models_without_a_body_are_refused():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    with pytest.raises(dt.TargetError, match="not supported"):
        dt.attach(model, dt.PromptTuningConfig())
    assert not delta_layers(model)


def test_plan_counts_the_prompt_only():
    model = tiny_model("t5")
    plan = dt.plan(model, dt.PromptTuningConfig(num_virtual_tokens=10))
    assert plan.paths == ["encoder", "decoder"]
    assert plan.delta_params == 10 * HIDDEN_SIZE


# (i) a classifier trains ------------------------------------------------------------------------

def test_sequence_classifier_trains_with_prompt_tuning():
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, intermediate_size=FFN_SIZE,
        num_hidden_layers=NUM_LAYERS, num_attention_heads=NUM_HEADS, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = tf.BertForSequenceClassification(config)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB_SIZE, (16, 6), generator=gen)
    labels = (ids[:, 0] < VOCAB_SIZE // 2).long()
    mask = torch.ones_like(ids)
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=4))
    optimizer = torch.optim.AdamW(dt.trainable_parameters(model), lr=dt.PromptTuningConfig.default_lr)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    # the classifier head stays frozen (train it with a second delta for real use), so the prompt
    # moves the loss only as far as the random head allows; it must move it steadily
    assert losses[1] < losses[0] and losses[-1] < losses[0] - 0.01, losses
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".deltas." not in n)
