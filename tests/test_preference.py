"""Preference tuning (train/preference.py): the DPO, ORPO and SimPO losses against their papers'
equations on numbers worked by hand, the reference from the same model with its deltas off, the
record forms, and ``deltatune train --objective ...`` end to end on a tiny model (checkpoints and
resume, several tasks routed, a 4-bit base)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.main import app
from deltatune.errors import ConfigError, DataError
from deltatune.train.preference import PairCollator, PreferenceLoss, add_reference_logps, load_pairs, pair_logps, tokenize_pairs
from deltatune.train.settings import TrainSettings
from tiny_hub import tiny_tokenizer
from zoo import randomize_delta


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def tensors(*values):
    return [torch.tensor([v], dtype=torch.float64) for v in values]


def test_dpo_loss_is_equation_7_of_rafailov_2023():
    # log pi(y_w) = -2, log pi(y_l) = -3, log pi_ref(y_w) = log pi_ref(y_l) = -2.5, beta = 0.1:
    # rewards 0.1 * 0.5 and 0.1 * -0.5, so L = -log sigma(0.1)
    loss, reward_chosen, reward_rejected = PreferenceLoss.of("dpo")(*tensors(-2.0, -3.0, 4, 5, -2.5, -2.5))
    assert float(loss) == pytest.approx(-log_sigmoid(0.1), rel=1e-12)
    assert (float(reward_chosen), float(reward_rejected)) == pytest.approx((0.05, -0.05))
    loss, _, _ = PreferenceLoss.of("dpo", beta=0.5)(*tensors(-2.0, -3.0, 4, 5, -1.0, -4.0))
    assert float(loss) == pytest.approx(-log_sigmoid(0.5 * (-1.0) - 0.5 * 1.0), rel=1e-12)


def test_orpo_loss_is_equations_4_6_and_7_of_hong_2024():
    # chosen: log-prob -1 over 2 tokens (P = e^-0.5), rejected: -3 over 3 tokens (P = e^-1), lambda = 0.1
    log_odds = lambda p: math.log(p / (1 - p))  # noqa: E731
    expected = 0.5 - 0.1 * log_sigmoid(log_odds(math.exp(-0.5)) - log_odds(math.exp(-1.0)))
    loss, reward_chosen, reward_rejected = PreferenceLoss.of("orpo")(*tensors(-1.0, -3.0, 2, 3))
    assert float(loss) == pytest.approx(expected, rel=1e-10)
    assert (float(reward_chosen), float(reward_rejected)) == pytest.approx((-0.05, -0.1))
    # a mean log-prob of 0 (P = 1) still gives finite odds
    assert math.isfinite(float(PreferenceLoss.of("orpo")(*tensors(0.0, -3.0, 2, 3))[0]))


def test_simpo_loss_is_equation_6_of_meng_2024():
    # beta = 2, gamma = 1: 2 * (-1/2) - 2 * (-3/3) - 1 = 0, so L = log 2
    loss, reward_chosen, reward_rejected = PreferenceLoss.of("simpo")(*tensors(-1.0, -3.0, 2, 3))
    assert float(loss) == pytest.approx(math.log(2), rel=1e-12)
    assert (float(reward_chosen), float(reward_rejected)) == pytest.approx((-1.0, -2.0))
    loss, _, _ = PreferenceLoss.of("simpo", beta=1.0, reward_margin=0.0)(*tensors(-4.0, -1.0, 4, 1))
    assert float(loss) == pytest.approx(-log_sigmoid(-1.0 + 1.0), rel=1e-12)


def test_the_nll_anchor_adds_the_chosen_answers_mean_nll_to_dpo_and_simpo():
    # alpha = 0.5, log pi(y_w) = -2 over 4 tokens: + 0.5 * 0.5
    loss, _, _ = PreferenceLoss.of("dpo", chosen_nll_weight=0.5)(*tensors(-2.0, -3.0, 4, 5, -2.5, -2.5))
    assert float(loss) == pytest.approx(-log_sigmoid(0.1) + 0.25, rel=1e-12)
    loss, _, _ = PreferenceLoss.of("simpo", chosen_nll_weight=0.5)(*tensors(-1.0, -3.0, 2, 3))
    assert float(loss) == pytest.approx(math.log(2) + 0.25, rel=1e-12)
    with pytest.raises(ConfigError, match="ORPO's loss already holds the chosen answer's NLL"):
        PreferenceLoss.of("orpo", chosen_nll_weight=1.0)
    with pytest.raises(ConfigError, match="chosen_nll_weight must be >= 0, got -1"):
        PreferenceLoss.of("dpo", chosen_nll_weight=-1)


def test_hyperparameters_are_checked_when_set():
    with pytest.raises(ConfigError, match="beta must be positive, got -1"):
        PreferenceLoss.of("dpo", beta=-1)
    with pytest.raises(ConfigError, match="objective='ppo' is not valid; allowed: sft, dpo, orpo, simpo"):
        TrainSettings(objective="ppo")
    with pytest.raises(ConfigError, match="beta set, but they belong to a preference objective"):
        TrainSettings(beta=0.2)
    with pytest.raises(ConfigError, match="does not combine with --task classify"):
        TrainSettings(objective="dpo", task="classify")


def test_the_reference_is_the_model_with_its_deltas_off():
    tokenizer = tiny_tokenizer()
    pairs = [load_pairs_from([{"prompt": [{"role": "user", "content": f"word {w}"}], "chosen": w.upper(), "rejected": w}])[0]
             for w in ("cat", "dog", "sun")]
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval()
    features = tokenize_pairs(tokenizer, pairs, max_length=128)
    collate = PairCollator(tokenizer.pad_token_id)
    with torch.no_grad():
        base = pair_logps(model, collate(features), subset=False)
    dt.attach(model, dt.LoRAConfig(r=4))
    randomize_delta(model)
    with torch.no_grad():
        tuned = pair_logps(model, collate(features), subset=False)
    assert not torch.allclose(tuned[0], base[0])  # the delta changes the log-probs...
    add_reference_logps(model, features, collate, subset=True)
    reference = torch.tensor([f["reference"] for f in features])
    torch.testing.assert_close(reference[:, 0], base[0], rtol=1e-5, atol=1e-5)  # ...the reference is the base's
    torch.testing.assert_close(reference[:, 1], base[1], rtol=1e-5, atol=1e-5)
    assert dt.deltas(model)["default"].active  # and the delta is on again


def load_pairs_from(records):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_pairs(path)


def test_the_record_forms():
    user = [{"role": "user", "content": "2+2?"}]
    text, chat, messages, implicit = (load_pairs_from([record])[0] for record in (
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
        {"prompt": user, "chosen": "4", "rejected": "5"},
        {"prompt": user, "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]},
        {"chosen": user + [{"role": "assistant", "content": "4"}], "rejected": user + [{"role": "assistant", "content": "5"}]},
    ))
    assert (text.prompt, text.chosen, text.rejected) == ("2+2=", "4", "5")
    assert chat == messages == implicit
    assert (chat.prompt, chat.chosen, chat.rejected) == (tuple(user), "4", "5")
    with pytest.raises(DataError, match=r"pairs.jsonl line 1: a preference record needs fields 'chosen' and 'rejected'.*missing \['rejected'\]"):
        load_pairs_from([{"prompt": "x", "chosen": "y"}])
    with pytest.raises(DataError, match="must be the assistant's answer"):
        load_pairs_from([{"prompt": user, "chosen": user, "rejected": "5"}])


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    """Upper-case a word (preferred) or repeat it (rejected): one file per task."""
    root = tmp_path_factory.mktemp("pairs")
    words = ["cat", "dog", "sun", "map", "box", "pen", "cup", "hat", "bus", "egg", "fox", "jam"]
    for task, words_of in (("upper", words), ("lower", [w.upper() for w in words])):
        (root / f"{task}.jsonl").write_text("".join(
            json.dumps({"prompt": [{"role": "user", "content": f"{task}: {w}"}],
                        "chosen": w.upper() if task == "upper" else w.lower(), "rejected": w}) + "\n" for w in words_of))
    return root


def train(tiny_dir, out, *extra):
    return CliRunner().invoke(app, [str(a) for a in ["train", "--model", tiny_dir, "-o", out, "--batch-size", 4, "--lr", 0.02,
                                                      "--eval-limit", 2, "--max-new-tokens", 2, "--no-progress", *extra]],
                              catch_exceptions=False)


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo"])
def test_a_preference_run_reports_reward_accuracy_before_and_after_and_resumes(objective, tiny_dir, pair_files, tmp_path):
    first = train(tiny_dir, tmp_path / "run", "--data", pair_files / "upper.jsonl", "--objective", objective,
                  "--max-steps", 2, "--save-every", 2, "--eval-fraction", 0.25)
    assert first.exit_code == 0, first.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["settings"]["objective"] == objective
    for when in ("before", "after"):
        assert set(summary[when]["metrics"]) == {"reward_accuracy", "reward_margin", "exact_match_with_chosen"}
    if objective == "dpo":  # before training the delta is zero: policy and reference agree on every pair
        assert summary["before"]["metrics"]["reward_margin"] == pytest.approx(0.0, abs=1e-2)
    assert "reward accuracy" in first.output
    resumed = train(tiny_dir, tmp_path / "run", "--data", pair_files / "upper.jsonl", "--objective", objective,
                    "--max-steps", 4, "--save-every", 2, "--eval-fraction", 0.25, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from step 2" in resumed.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4


def test_dpo_routes_each_task_to_its_delta_and_trains_on_a_4_bit_base(tiny_dir, pair_files, tmp_path):
    result = train(tiny_dir, tmp_path / "tasks", "--data", pair_files / "upper.jsonl", "--data", pair_files / "lower.jsonl",
                   "--objective", "dpo", "--max-steps", 2, "--eval-fraction", 0.25, "--quantize", "nf4")
    assert result.exit_code == 0, result.output
    assert "tasks: upper, lower: one lora delta each" in " ".join(result.output.split())
    summary = json.loads((tmp_path / "tasks" / "summary.json").read_text())
    assert set(summary["after"]["per_task"]) == {"upper", "lower"}
    assert summary["train_losses"] and all(math.isfinite(loss) for loss in summary["train_losses"])
