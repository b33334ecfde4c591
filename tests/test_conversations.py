"""Whole conversations (train/data.py): the loss mask covers exactly the assistant turns on the
chat templates of six model families, tool calls included; ShareGPT records; templates that refuse
a turn or render history differently later on; conversations cut at a turn boundary; packing."""

from __future__ import annotations

import json
import logging
import string

import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import deltatune as dt
import chat_templates
from deltatune.errors import DataError, ModelLoadError
from deltatune.models import bundled_model_dir
from deltatune.train.data import (
    IGNORE_INDEX,
    Example,
    PadCollator,
    answer_spans,
    encode_prompt,
    load_examples,
    tokenize_example,
    tokenize_examples,
)
from deltatune.train.objectives import causal_lm_loss
from deltatune.train.packing import PackedCollator
from tiny_hub import tiny_tokenizer
from zoo import randomize_delta

QUESTIONS = ["What is the capital of France?", "And of Italy?", "Spell it, please."]
ANSWERS = ["Paris.", "Rome, of course.", "R-O-M-E"]

# name: (template, special tokens, bos, eos, the text closing each answer, pre-tokenizer, system role)
TEMPLATES = {
    "llama3": (chat_templates.LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", "byte-level", True),
    "mistral": (chat_templates.MISTRAL, ["<s>", "</s>"], "<s>", "</s>", "</s>", "metaspace", False),
    "gemma": (chat_templates.GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
              "<bos>", "<eos>", "<end_of_turn>", "metaspace", False),
    "phi3": (chat_templates.PHI3, ["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
             "<s>", "<|endoftext|>", "<|end|>", "metaspace", True),
    "qwen2.5": (chat_templates.QWEN2_5, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                None, "<|im_end|>", "<|im_end|>", "byte-level", True),
}


def conversation(system: bool) -> list[dict]:
    turns = [{"role": "system", "content": "You answer briefly."}] if system else []
    for question, answer in zip(QUESTIONS, ANSWERS):
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return turns


def as_example(turns: list[dict], **fields) -> Example:
    last = turns[-1]
    return Example(prompt=tuple(turns[:-1]), completion=last["content"], tool_calls=tuple(last.get("tool_calls", ())),
                   **fields)


def trained_tokenizer(template: str, specials: list[str], bos: str | None, eos: str, style: str, system: bool):
    """A small BPE tokenizer learnt from conversations rendered with ``template``: merges that cross
    the template's own text are there to be found, as in a real tokenizer, and its turn markers are
    special tokens. ``metaspace`` tokenizes like SentencePiece (Llama 2, Mistral, Gemma, Phi-3)."""
    core = Tokenizer(models.BPE(unk_token=None if style == "byte-level" else "<unk>"))
    if style == "byte-level":
        core.pre_tokenizer, core.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        core.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        core.decoder = decoders.Metaspace(prepend_scheme="first")
        alphabet = list(string.printable) + ["▁"]
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos,
                                           unk_token=None if style == "byte-level" else "<unk>")
    tokenizer.chat_template = template
    corpus = [tokenizer.apply_chat_template(conversation(system), tokenize=False)] * 3
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[*specials, "<unk>"], initial_alphabet=alphabet,
                                  show_progress=False)
    core.train_from_iterator(corpus, trainer=trainer)
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos,
                                           unk_token=None if style == "byte-level" else "<unk>",
                                           additional_special_tokens=[t for t in specials if t not in (bos, eos)])
    tokenizer.chat_template = template
    return tokenizer


def template_case(name: str):
    """(tokenizer, the text closing each answer, whether it has a system role) for a template name."""
    if name == "smollm2":
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(bundled_model_dir())
        except ModelLoadError as exc:
            pytest.skip(f"bundled model unavailable: {exc}")
        return tokenizer, "<|im_end|>", True
    template, specials, bos, eos, closing, style, system = TEMPLATES[name]
    return trained_tokenizer(template, specials, bos, eos, style, system), closing, system


def trained_runs(tokenizer, feature: dict) -> list[str]:
    """The trained stretches of a feature (consecutive labelled tokens), decoded."""
    runs, current = [], []
    for token, label in zip(feature["input_ids"], feature["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


@pytest.mark.parametrize("name", ["smollm2", *TEMPLATES])
def test_the_mask_covers_exactly_every_assistant_turn(name):
    tokenizer, closing, system = template_case(name)
    example = as_example(conversation(system))
    feature = tokenize_example(tokenizer, example, max_length=512)
    assert trained_runs(tokenizer, feature) == [answer + closing for answer in ANSWERS]
    last = tokenize_example(tokenizer, example, max_length=512, train_on="last")
    assert trained_runs(tokenizer, last) == [ANSWERS[-1] + closing]
    rendered = tokenizer.apply_chat_template(conversation(system), tokenize=False)
    if TEMPLATES.get(name, (None,) * 6)[5] == "metaspace":
        # a SentencePiece-style tokenizer merges across "[/INST]Paris", so the pieces between the
        # answers' bounds are read one by one: the text is the template's, spaces aside (its own)
        assert tokenizer.decode(feature["input_ids"]).replace(" ", "") == rendered.replace(" ", "")[: len(
            tokenizer.decode(feature["input_ids"]).replace(" ", ""))]
    else:
        # every answer starts and ends between two tokens: the ids are the template's text as the
        # tokenizer reads it whole, cut after the last answer, whichever answers train
        assert feature["input_ids"] == encode_prompt(tokenizer, rendered)[: len(feature["input_ids"])]
        assert last["input_ids"] == feature["input_ids"]
    everything = tokenize_example(tokenizer, example, max_length=512, train_on="all")
    assert everything["labels"] == everything["input_ids"]


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}


def test_tool_calls_train_and_tool_answers_do_not(tmp_path):
    tokenizer, closing, _ = template_case("qwen2.5")
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": CALL}]},
        {"role": "tool", "name": "get_weather", "content": "18 C, sunny"},
        {"role": "assistant", "content": "It is 18 C and sunny."},
    ]
    sharegpt = [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps(CALL)},
        {"from": "observation", "value": "18 C, sunny"},
        {"from": "gpt", "value": "It is 18 C and sunny."},
    ]
    (tmp_path / "messages.jsonl").write_text(json.dumps({"messages": messages, "tools": [WEATHER_TOOL]}) + "\n")
    (tmp_path / "sharegpt.jsonl").write_text(json.dumps({"conversations": sharegpt, "tools": json.dumps([WEATHER_TOOL])}) + "\n")
    (openai_style,), (share_style,) = (load_examples(tmp_path / name) for name in ("messages.jsonl", "sharegpt.jsonl"))
    feature = tokenize_example(tokenizer, openai_style, max_length=1024)
    call_text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert trained_runs(tokenizer, feature) == [call_text + closing, "It is 18 C and sunny." + closing]
    assert "# Tools" in tokenizer.decode(feature["input_ids"])  # the schemas reached the template
    assert tokenize_example(tokenizer, share_style, max_length=1024) == feature


def test_sharegpt_records_and_their_mistakes(tmp_path):
    path = tmp_path / "share.jsonl"
    path.write_text(json.dumps({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                                                  {"from": "gpt", "value": "hello"}]}) + "\n")
    (example,) = load_examples(path)
    assert example.conversation == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "hello"})
    path.write_text(json.dumps({"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"share.jsonl line 1: field 'conversations\[0\].from' is 'robot'; allowed: system, human"):
        load_examples(path)


def test_a_template_that_refuses_a_turn_says_why():
    tokenizer, _, _ = template_case("gemma")
    with pytest.raises(DataError, match=r"d.jsonl line 2: the tokenizer's chat template refuses it \(System role not supported\)"):
        tokenize_example(tokenizer, as_example(conversation(system=True), source="d.jsonl line 2"), max_length=512)


# Mistral-7B-Instruct-v0.3's placement of the system prompt, reduced to that: it goes into the last
# user turn, so a conversation's earlier turns render differently once later turns follow.
SYSTEM_IN_LAST_USER_TURN = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- set last_user = (loop_messages | selectattr('role', 'equalto', 'user') | list | last) %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if message is sameas last_user and system is defined %}{{- '[INST] ' + system + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)


def test_a_template_that_renders_history_differently_trains_each_turn_as_it_prompts_it(caplog):
    _, specials, bos, eos, _, _, _ = TEMPLATES["mistral"]
    tokenizer = trained_tokenizer(SYSTEM_IN_LAST_USER_TURN, specials, bos, eos, "byte-level", system=True)
    example = as_example(conversation(system=True), source="c.jsonl line 1")
    with caplog.at_level(logging.WARNING, logger="deltatune.train.data"):
        features = tokenize_examples(tokenizer, [example], max_length=512)
    assert "1 conversation(s) train as one example per assistant turn (first: c.jsonl line 1)" in caplog.text
    assert [trained_runs(tokenizer, f) for f in features] == [[" " + answer + "</s>"] for answer in ANSWERS]
    for feature, turns in zip(features, (3, 5, 7)):  # each prompted as the template prompts that turn
        prompt = tokenizer.apply_chat_template(conversation(system=True)[:turns], tokenize=False, add_generation_prompt=True)
        assert tokenizer.decode(feature["input_ids"]).startswith(prompt)


def test_a_long_conversation_is_cut_after_the_last_whole_answer_that_fits(caplog):
    tokenizer, closing, _ = template_case("qwen2.5")
    example = as_example(conversation(system=True), source="long.jsonl line 1")
    text, spans = answer_spans(tokenizer, example)
    whole = tokenize_example(tokenizer, example, max_length=1024)
    two_answers = len(tokenizer(text[: spans[1][1]], add_special_tokens=False)["input_ids"])
    with caplog.at_level(logging.WARNING, logger="deltatune.train.data"):
        (cut,) = tokenize_examples(tokenizer, [example], max_length=len(whole["input_ids"]) - 1)
    assert cut["input_ids"] == whole["input_ids"][:two_answers]
    assert trained_runs(tokenizer, cut) == [answer + closing for answer in ANSWERS[:2]]
    assert "cut 1 conversation(s) longer than max_length" in caplog.text and "dropping 2 turn(s) in all" in caplog.text
    # not even the first answer fits: cut inside it, as a single answer would be
    first_answer = next(i for i, label in enumerate(whole["labels"]) if label != IGNORE_INDEX)
    inside = tokenize_example(tokenizer, example, max_length=first_answer + 1)
    assert inside["input_ids"] == whole["input_ids"][: first_answer + 1] and "dropped_turns" not in inside


def test_multi_turn_masks_pack_with_the_loss_of_padded_batches():
    tokenizer = tiny_tokenizer()
    conversations = [conversation(system=i % 2 == 0)[: 2 * (1 + i % 3) + (i % 2 == 0)] for i in range(5)]
    features = [tokenize_example(tokenizer, as_example(turns), max_length=512) for turns in conversations]
    assert sum(len(trained_runs(tokenizer, f)) for f in features) > len(features)  # several answers per example
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval()
    dt.attach(model, dt.LoRAConfig(r=4))
    randomize_delta(model)
    packed = PackedCollator(tokenizer.pad_token_id, budget=400)(features)
    assert packed["input_ids"].shape[0] > 1
    padded = PadCollator(tokenizer.pad_token_id)(features)
    torch.testing.assert_close(causal_lm_loss(model, packed, subset=True), causal_lm_loss(model, padded, subset=True),
                               atol=1e-5, rtol=1e-5)


def test_per_turn_evaluation_prompts_each_answer_with_the_reference_history():
    example = as_example(conversation(system=True), source="t.jsonl line 3")
    turns = example.turns()
    assert [t.completion for t in turns] == ANSWERS
    assert [len(t.prompt) for t in turns] == [2, 4, 6]
    assert [t.source for t in turns] == ["t.jsonl line 3 turn 3", "t.jsonl line 3 turn 5", "t.jsonl line 3"]


@pytest.mark.parametrize("script, folder", [("make_chat_data.py", "chat"), ("make_preference_data.py", "preference")])
def test_the_bundled_chat_and_preference_data_are_what_their_seeded_generators_write(script, folder, tmp_path):
    from importlib import resources
    from pathlib import Path
    import subprocess
    import sys

    scripts = Path(__file__).resolve().parent.parent / "scripts"
    subprocess.run([sys.executable, str(scripts / script), "--out", str(tmp_path)], check=True, capture_output=True)
    bundled = Path(str(resources.files("deltatune") / "data" / folder))
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (bundled / f"{split}.jsonl").read_bytes()
    iso_date = (lambda r: r["messages"][1]["content"]) if folder == "chat" else (lambda r: r["chosen"][0]["content"])
    train_dates, test_dates = ({iso_date(json.loads(line)) for line in (bundled / f"{split}.jsonl").read_text().splitlines()}
                               for split in ("train", "test"))
    assert len(train_dates) == 400 - 100 * (folder == "chat") and len(test_dates) == (60 if folder == "chat" else 100)
    assert not train_dates & test_dates  # no date in both splits
