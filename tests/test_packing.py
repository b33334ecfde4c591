"""Packed batches (train/packing.py): the same loss and gradients as padded ones on every
decoder family that packs, with and without a shared prompt prefix, within a sliding window;
the layout itself; and every case that must train padded says why."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.main import app
from deltatune.train.data import IGNORE_INDEX, PadCollator
from deltatune.train.objectives import causal_lm_loss
from deltatune.train.packing import PADDING, PREFIX, PackedCollator, attention_bias, packing_blocker, shared_prefix_length
from zoo import randomize_delta, tiny_model

PACKING_ARCHITECTURES = ["llama", "qwen2", "gpt2", "opt", "mistral", "gemma", "gpt_neox", "falcon", "phi"]


def features(count: int, prefix: list[int], seed: int = 0, prompt: int = 3) -> list[dict]:
    """``count`` examples of different lengths starting with ``prefix``; the first ``prompt``
    tokens after it are prompt (label -100), the rest answer."""
    generator = torch.Generator().manual_seed(seed)
    made = []
    for i in range(count):
        ids = prefix + torch.randint(4, 128, (6 + (3 * i) % 7,), generator=generator).tolist()
        start = len(prefix) + prompt
        made.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * start + ids[start:]})
    return made


def loss_and_gradients(model, batch):
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, batch, subset=True)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in dt.trainable_parameters(model)]


def sliding_mistral(window: int) -> torch.nn.Module:
    config = tf.MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              sliding_window=window)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return tf.MistralForCausalLM(config).eval()


@pytest.mark.parametrize("shared", [False, True], ids=["no-shared-prefix", "shared-prefix"])
@pytest.mark.parametrize("arch", [*PACKING_ARCHITECTURES, "mistral-window-4"])
def test_packed_loss_and_gradients_equal_the_padded_ones(arch, shared):
    model = sliding_mistral(4) if arch == "mistral-window-4" else tiny_model(arch)
    dt.attach(model, dt.LoRAConfig(r=4))
    randomize_delta(model)
    examples = features(5, [5, 6, 7, 8, 9] if shared else [])
    packed = PackedCollator(0, budget=24)(examples)
    assert packed["input_ids"].shape[0] > 1  # several rows: padding between rows is exercised too
    assert int((packed["segment_ids"][0] == PREFIX).sum()) == (5 if shared else 0)
    padded_loss, padded_grads = loss_and_gradients(model, PadCollator(0)(examples))
    packed_loss, packed_grads = loss_and_gradients(model, packed)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    for got, want in zip(packed_grads, padded_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_window_shorter_than_the_examples_is_applied_inside_each():
    """Packed with the window dropped, the window-4 Mistral's loss differs: the window matters."""
    model = sliding_mistral(4)
    examples = features(3, [])
    batch = PackedCollator(0, budget=64)(examples)
    with torch.no_grad():
        windowed = causal_lm_loss(model, batch, subset=True)
        model.config.sliding_window = None
        full = causal_lm_loss(model, batch, subset=True)
    assert abs(float(windowed) - float(full)) > 1e-3


def test_the_layout_of_a_packed_batch():
    examples = features(4, [5, 6], prompt=2)
    batch = PackedCollator(0, budget=1000)(examples)
    assert batch["input_ids"].shape[0] == 1
    ids, positions, labels, segments = (batch[k][0].tolist() for k in ("input_ids", "position_ids", "labels", "segment_ids"))
    assert ids[:2] == [5, 6] and segments[:2] == [PREFIX, PREFIX] and positions[:2] == [0, 1]
    start = 2
    for number, example in enumerate(examples, start=1):
        own = example["input_ids"][2:]
        end = start + len(own)
        assert ids[start:end] == own
        assert positions[start:end] == list(range(2, 2 + len(own)))  # after the prefix, as unpacked
        assert segments[start:end] == [number] * len(own)
        assert labels[start] == IGNORE_INDEX and labels[start + 1:end] == example["labels"][3:]
        start = end
    # the answers' labels are all there, each once
    assert sum(label != IGNORE_INDEX for label in labels) == sum(
        sum(label != IGNORE_INDEX for label in e["labels"]) for e in examples)


def test_rows_are_filled_evenly_within_the_budget_and_padded_to_the_longest():
    examples = features(6, [])
    batch = PackedCollator(0, budget=20)(examples)
    real = (batch["segment_ids"] != PADDING).sum(dim=1)
    assert batch["input_ids"].shape[0] == -(-int(real.sum()) // 20)
    assert int(real.max()) <= 20 + 12
    assert int(real.max() - real.min()) <= 12  # the longest example: spread, not first-fit
    assert int(real.sum()) == sum(len(e["input_ids"]) for e in examples)


def test_the_shared_prefix_stops_before_any_predicted_label_and_leaves_each_example_a_token():
    # the second example's answer starts right after two common tokens: position 1 predicts it
    made = [{"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX] * 3 + [8]},
            {"input_ids": [5, 6, 7, 9], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 9]}]
    assert shared_prefix_length(made) == 1
    same = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX] * 3}] * 2
    assert shared_prefix_length(same) == 2
    text = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}] * 2  # every token trained: nothing shared
    assert shared_prefix_length(text) == 0


def test_the_mask_confines_attention_to_each_example_and_the_prefix():
    segments = torch.tensor([[PREFIX, 1, 1, 2, PADDING]])
    positions = torch.tensor([[0, 1, 2, 1, 0]])
    visible = attention_bias(segments, positions, torch.float32, None)[0, 0] == 0
    assert visible.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [True, True, True, False, False],
        [True, False, False, True, False],   # example 2 sees the prefix and itself, not example 1
        [False, False, False, False, True],  # padding sees only itself (no empty softmax row)
    ]
    windowed = attention_bias(segments, positions, torch.float32, 2)[0, 0] == 0
    assert not windowed[2, 0] and windowed[2, 1]  # position 2 - 0 is outside a window of 2


def test_models_that_compute_packed_batches_differently_train_padded_and_say_why():
    model = tiny_model("bloom")  # ALiBi: BLOOM builds its own attention bias
    dt.attach(model, dt.LoRAConfig(r=4))
    examples = features(3, [5, 6])
    reason = packing_blocker(model, examples, PackedCollator(0, budget=64), 0,
                             lambda m, b: causal_lm_loss(m, b, subset=True), torch.device("cpu"))
    assert reason is not None and "attention mask" in reason


def test_a_model_that_ignores_positions_is_caught_by_the_comparison(monkeypatch):
    # GPT-2's learned absolute positions (with rotary ones only differences count, so a shift
    # inside an example's own attention changes nothing)
    model = tiny_model("gpt2")
    dt.attach(model, dt.LoRAConfig(r=4))
    randomize_delta(model)
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda **kw: forward(**{k: v for k, v in kw.items() if k != "position_ids"}))
    reason = packing_blocker(model, features(3, []), PackedCollator(0, budget=64), 0,
                             lambda m, b: causal_lm_loss(m, b, subset=True), torch.device("cpu"))
    assert reason is not None and "differently" in reason


def _train(tiny_dir, data_file, out, *extra):
    return CliRunner().invoke(app, [str(a) for a in ["train", "--model", tiny_dir, "--data", data_file, "-o", out,
                                                      "--batch-size", 4, "--lr", 0.02, "--eval-limit", 2,
                                                      "--max-new-tokens", 2, "--no-progress", "--max-steps", 4, *extra]],
                              catch_exceptions=False)


def test_a_run_packs_by_default_and_trains_as_a_padded_one(tiny_dir, data_file, tmp_path):
    packed = _train(tiny_dir, data_file, tmp_path / "packed")
    padded = _train(tiny_dir, data_file, tmp_path / "padded", "--no-packing")
    assert packed.exit_code == 0 and padded.exit_code == 0, packed.output + padded.output
    assert "batches: packed, a shared prompt prefix of" in " ".join(packed.output.split())
    assert "batches: padded (--no-packing)" in padded.output
    one, other = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("packed", "padded"))
    assert one["packing"].startswith("packed") and other["packing"] == "padded (--no-packing)"
    assert one["train_losses"] == pytest.approx(other["train_losses"], rel=1e-4)


def test_methods_that_add_tokens_per_sequence_train_padded_and_say_why(tiny_dir, data_file, tmp_path):
    result = _train(tiny_dir, data_file, tmp_path / "run", "--method", "prompt")
    assert result.exit_code == 0, result.output
    assert "batches: padded (prompt adds its own tokens or attention to every sequence)" in " ".join(result.output.split())


@pytest.mark.slow
def test_compiled_blocks_train_with_the_losses_of_eager_ones(tiny_dir, data_file, tmp_path):
    eager = _train(tiny_dir, data_file, tmp_path / "eager", "--precision", "fp32")
    compiled = _train(tiny_dir, data_file, tmp_path / "compiled", "--precision", "fp32", "--compile")
    assert eager.exit_code == 0 and compiled.exit_code == 0, eager.output + compiled.output
    assert "compiled 2 transformer blocks with torch.compile" in compiled.output
    one, other = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("eager", "compiled"))
    assert other["train_losses"] == pytest.approx(one["train_losses"], rel=1e-4)
