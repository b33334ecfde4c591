"""PEFT's prompt-learning adapters <-> deltatune, with the same numbers (deltatune.peft_format.prompts).

Each round trip builds the adapter with PEFT on a tiny zoo model, gives every trainable tensor
random non-zero values, saves it, loads it with ``dt.load`` into a fresh copy of the model and
compares logits with PEFT's; then writes it back with ``dt.save(format="peft")``, loads that with
``PeftModel.from_pretrained`` into another fresh copy and compares again.

Like with like: for prompt tuning and P-tuning, PEFT's CAUSAL_LM and FEATURE_EXTRACTION models
run the base model on [P; x] and return logits for all n + T positions; deltatune drops the n
virtual positions, so PEFT's last T are compared. SEQ_2_SEQ_LM logits are the decoder's (T in
both), SEQ_CLS logits are per sequence, and prefix tuning and the adaption prompt add no positions.

Tolerance: ``assert_close`` with atol = rtol = 1e-5 (float32). Prompt tuning and P-tuning agree
bit for bit; prefix keys rotated by ∓n and the adaption gate applied after instead of before the
value product differ from PEFT by float rounding (~1e-7).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import deltatune as dt
from deltatune.errors import CheckpointError
from deltatune.peft_format import CONFIG_FILE, PeftFormatNote
from zoo import tiny_inputs, tiny_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ARCHS = ("llama", "gpt2", "opt", "bert", "t5")
#: the PEFT task type per zoo architecture; the zoo's bert is BertForMaskedLM, which only
#: FEATURE_EXTRACTION runs with the prompt (SEQ_CLS is tested on BertForSequenceClassification)
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "opt": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION", "t5": "SEQ_2_SEQ_LM"}
N = 3
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small run fastest on one thread; on a busy machine a second one spends most
    of each matmul waiting for the other (10x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def peft_config(method: str, task: str, **extra):
    if method == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=N, task_type=task, **extra)
    if method in ("ptuning_mlp", "ptuning_lstm"):
        return peft.PromptEncoderConfig(
            num_virtual_tokens=N, task_type=task, encoder_hidden_size=8,
            encoder_reparameterization_type=method.removeprefix("ptuning_").upper(), **extra,
        )
    if method in ("prefix", "prefix_projection"):
        return peft.PrefixTuningConfig(
            num_virtual_tokens=N, task_type=task, prefix_projection=method == "prefix_projection",
            encoder_hidden_size=8, **extra,
        )
    return peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=1, task_type=task, **extra)


def peft_model(model, config):
    """PEFT's adapter on ``model`` with every trainable tensor random (modules_to_save copies moved
    off their base values a little), in eval mode."""
    wrapped = peft.get_peft_model(model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator)
            if "modules_to_save" in name:
                param.add_(0.02 * noise)
            else:
                param.copy_(0.5 * noise)
    return wrapped.eval()


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def like_deltatune(peft_logits, config):
    """PEFT's logits without the virtual positions its prompt-learning models return."""
    prepends = config.peft_type in ("PROMPT_TUNING", "P_TUNING") and config.task_type in ("CAUSAL_LM", "FEATURE_EXTRACTION")
    return peft_logits[:, config.num_virtual_tokens:] if prepends else peft_logits


def assert_round_trip(build, config, arch, tmp_path):
    """PEFT -> deltatune -> PEFT on fresh models from ``build``, with PEFT's logits each time."""
    theirs = peft_model(build(), config)
    inputs = tiny_inputs(arch, theirs.get_base_model())
    expected = like_deltatune(logits(theirs, inputs), theirs.peft_config["default"])
    theirs.save_pretrained(tmp_path / "peft")

    ours = build()
    assert dt.load(ours, tmp_path / "peft") == ["default"]
    got = logits(ours, inputs)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, **TOLERANCE)

    dt.save(ours, tmp_path / "back", format="peft")
    again = peft.PeftModel.from_pretrained(build(), tmp_path / "back").eval()
    torch.testing.assert_close(like_deltatune(logits(again, inputs), again.peft_config["default"]), got, **TOLERANCE)


def _cases():
    for method in ("prompt", "ptuning_mlp", "ptuning_lstm", "prefix", "prefix_projection", "adaption"):
        for arch in ARCHS:
            reason = None
            if method.startswith("prefix") and arch != "llama":
                reason = "PEFT's cached prefixes shift this model's positions: refused, see test_prefix_is_refused..."
            elif method == "adaption" and arch == "gpt2":
                reason = "deltatune's llama_adapter needs separate k/v projections: refused, see test_adaption_prompt_is..."
            elif method == "adaption" and arch != "llama":
                reason = "PEFT's adaption prompt supports llama, mistral and gpt2 only"
            marks = pytest.mark.skip(reason=reason) if reason else ()
            yield pytest.param(method, arch, marks=marks, id=f"{method}-{arch}")


@pytest.mark.parametrize("method, arch", list(_cases()))
def test_peft_adapter_round_trips_with_the_same_logits(method, arch, tmp_path):
    assert_round_trip(lambda: tiny_model(arch), peft_config(method, TASKS[arch]), arch, tmp_path)


def bert_classifier():
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(tiny_model("bert").config).eval()


@pytest.mark.parametrize("method", ["prompt", "ptuning_mlp"])
def test_sequence_classification_round_trips_with_its_trained_classifier(method, tmp_path):
    # PEFT's SEQ_CLS model trains the classifier as modules_to_save ("classifier" and "score",
    # of which BERT has the first); its pooled output reads the first virtual token
    config = peft_config(method, "SEQ_CLS")
    assert_round_trip(bert_classifier, config, "bert", tmp_path)
    saved = json.loads((tmp_path / "back" / CONFIG_FILE).read_text())
    assert saved["modules_to_save"] == ["classifier"]


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_modules_to_save_round_trip(method, tmp_path):
    config = peft_config(method, "CAUSAL_LM", modules_to_save=["lm_head"])
    assert_round_trip(lambda: tiny_model("llama"), config, "llama", tmp_path)


@pytest.mark.parametrize("method", ["prompt", "prefix", "adaption"])
def test_greedy_generation_matches_peft(method, tmp_path):
    # cached decoding: prefixes outside the cache and rotated back by n still match PEFT's. PEFT's
    # side is greedy decoding by its forward: from transformers 5.24 on, PEFT's own generate
    # passes its prefixes as `past_key_values` beside generate's `cache`, and transformers
    # ignores them ("Both `past_key_values` and `cache` are set")
    theirs = peft_model(tiny_model("llama"), peft_config(method, "CAUSAL_LM"))
    theirs.save_pretrained(tmp_path)
    ours = tiny_model("llama")
    dt.load(ours, tmp_path)
    inputs = tiny_inputs("llama", ours)
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(greedy_by_forward(theirs, inputs, settings["max_new_tokens"]), ours.generate(**inputs, **settings))


def greedy_by_forward(model, inputs, new_tokens):
    """Greedy decoding as the definition has it: the whole sequence through the forward, each step."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(new_tokens):
        chosen = model(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, chosen], 1), torch.cat([mask, torch.ones_like(chosen)], 1)
    return ids


DELTATUNE_DELTAS = {
    "prompt": lambda: dt.PromptTuningConfig(num_virtual_tokens=N),
    # the encoder is exported as the prompts it produces (PEFT's inference mode reads just those)
    "ptuning_lstm": lambda: dt.PTuningConfig(num_virtual_tokens=N, encoder="lstm", encoder_hidden_size=8),
    # the MLP is exported as the prefixes it produces, without PEFT's prefix_projection
    "prefix_reparameterized": lambda: dt.PrefixTuningConfig(num_virtual_tokens=N, init="random", reparameterize=True,
                                                            encoder_embed_dim=8, encoder_hidden_size=8),
    "llama_adapter": lambda: dt.LlamaAdapterConfig(adapter_len=4, adapter_layers=2),
}


@pytest.mark.parametrize("kind", list(DELTATUNE_DELTAS))
def test_a_delta_made_by_deltatune_exports_with_the_same_logits(kind, tmp_path):
    ours = dt.attach(tiny_model("llama"), DELTATUNE_DELTAS[kind]())
    if kind == "llama_adapter":
        gates = [p for n, p in ours.named_parameters() if n.endswith(".gate")]
        with torch.no_grad():  # one non-zero gate per layer, the same for all its heads
            for layer, gate in enumerate(gates):
                gate.fill_(0.3 + 0.2 * layer)
    inputs = tiny_inputs("llama", ours)
    got = logits(ours, inputs)
    dt.save(ours, tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    torch.testing.assert_close(like_deltatune(logits(theirs, inputs), theirs.peft_config["default"]), got, **TOLERANCE)


@pytest.mark.parametrize("arch", ["gpt2", "opt", "bert", "t5"])
def test_prefix_is_refused_where_positions_differ(arch, tmp_path):
    # PEFT's prefixes are a KV cache that moves the real tokens n positions on; with learned
    # position tables (gpt2, opt, bert) or T5's decoder-only cache that cannot be matched
    theirs = peft_model(tiny_model(arch), peft_config("prefix", TASKS[arch]))
    theirs.save_pretrained(tmp_path / "peft")
    with pytest.raises(CheckpointError, match="positions"):
        dt.load(tiny_model(arch), tmp_path / "peft")

    ours = dt.attach(tiny_model(arch), dt.PrefixTuningConfig(num_virtual_tokens=N, init="random"))
    with pytest.raises(CheckpointError, match="positions"):
        dt.save(ours, tmp_path / "back", format="peft")


def test_adaption_prompt_is_refused_on_gpt2(tmp_path):
    peft_model(tiny_model("gpt2"), peft_config("adaption", "CAUSAL_LM")).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="'gpt2'"):
        dt.load(tiny_model("gpt2"), tmp_path)


def test_llama_adapter_exports_only_equal_head_gates(tmp_path):
    ours = dt.attach(tiny_model("llama"), dt.LlamaAdapterConfig(adapter_len=4, adapter_layers=1))
    with torch.no_grad():
        next(p for n, p in ours.named_parameters() if n.endswith("gate")).copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    with pytest.raises(CheckpointError, match="head gates .* differ"):
        dt.save(ours, tmp_path, format="peft")


def test_llama_adapter_exports_only_the_top_layers(tmp_path):
    # PEFT adapts the top adapter_layers attention modules, nothing else
    ours = dt.attach(tiny_model("llama"), dt.LlamaAdapterConfig(adapter_len=4, layers=[0]))
    with pytest.raises(CheckpointError, match="top adapter_layers"):
        dt.save(ours, tmp_path, format="peft")


def test_adaption_prompt_is_refused_when_o_proj_has_a_bias(tmp_path):
    # PEFT runs o_proj on the prompt term separately, adding its bias twice
    def biased_llama():
        config = tiny_model("llama").config
        config.attention_bias = True
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval()

    peft_model(biased_llama(), peft_config("adaption", "CAUSAL_LM")).save_pretrained(tmp_path / "peft")
    with pytest.raises(CheckpointError, match="o_proj has a bias"):
        dt.load(biased_llama(), tmp_path / "peft")
    ours = dt.attach(biased_llama(), dt.LlamaAdapterConfig(adapter_len=4, adapter_layers=1))
    with pytest.raises(CheckpointError, match="o_proj has a bias"):
        dt.save(ours, tmp_path / "back", format="peft")


def test_prefix_export_needs_every_layer(tmp_path):
    # a layer without a prefix is not one with a zero prefix: zero keys still take attention
    ours = dt.attach(tiny_model("llama"), dt.PrefixTuningConfig(num_virtual_tokens=N, init="random", layers=[1]))
    with pytest.raises(CheckpointError, match="no prefix on model.layers.0.self_attn"):
        dt.save(ours, tmp_path, format="peft")


@pytest.mark.parametrize(
    "method, field, value",
    [
        ("prompt", "num_transformer_submodules", 2),      # PEFT would prepend 2n rows to a decoder
        ("prompt", "task_type", None),                    # PEFT's plain PeftModel ignores the prompt
        ("prefix", "num_attention_heads", 4),             # heads of 4 where the model's are 8 wide
        ("prefix", "num_layers", 1),
        ("prefix", "num_transformer_submodules", 2),      # PEFT's encoder-decoder cache layout
        ("adaption", "adapter_layers", 2),                # PEFT would adapt a layer the file lacks
    ],
)
def test_a_numerics_changing_value_is_refused_naming_the_field(method, field, value, tmp_path):
    peft_model(tiny_model("llama"), peft_config(method, "CAUSAL_LM")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    config[field] = value
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=re.escape(f"{field}={value!r}")):
        dt.load(tiny_model("llama"), tmp_path)


def test_unknown_and_training_only_fields(tmp_path):
    peft_model(tiny_model("llama"), peft_config("ptuning_mlp", "CAUSAL_LM", encoder_dropout=0.3)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    config["a_future_field"] = 1
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.warns(PeftFormatNote, match="a_future_field") as notes:
        dt.load(tiny_model("llama"), tmp_path)
    assert not any("encoder_dropout" in str(n.message) for n in notes)
