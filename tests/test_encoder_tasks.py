"""Encoder tasks end to end through ``deltatune train --task``: classification, multi-label,
regression and tagging on a tiny random BERT (and a decoder used as a classifier), each
saving a delta with its head that reloads onto a fresh base with identical predictions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.main import app
from deltatune.models import load_model_and_tokenizer
from deltatune.train.labelled import LabelledCollator, evaluate_task, load_labelled, tokenize_labelled
from deltatune.train.objectives import encoder_data_path
from tiny_hub import save_tiny_encoder

TASKS = ("classify", "multilabel", "regression", "tag")
METRICS = {
    "classify": {"accuracy", "macro_f1", "mcc", "majority_baseline"},
    "multilabel": {"micro_f1", "macro_f1", "subset_accuracy"},
    "regression": {"pearson", "spearman", "mse"},
    "tag": {"span_f1", "span_precision", "span_recall", "token_accuracy"},
}
#: learning rates at which the tiny random encoder learns each task within 40 steps
LEARNING_RATES = {"classify": 1e-2, "multilabel": 3e-3, "regression": 3e-3, "tag": 1e-2}
runner = CliRunner()


def _records(task: str, split: str) -> list[dict]:
    return [json.loads(line) for line in encoder_data_path(task, split).read_text().splitlines()]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    words = set()
    for task in TASKS:
        for split in ("train", "test"):
            for record in _records(task, split):
                text = " ".join(record["tokens"]) if task == "tag" else record["text"] + " " + record.get("text_pair", "")
                words.update(re.findall(r"\w+|[^\w\s]", text))
    return save_tiny_encoder(tmp_path_factory.mktemp("encoder") / "model", words)


def _subset(task: str, split: str, count: int, directory: Path) -> Path:
    path = directory / f"{task}-{split}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(task, split)[:count]))
    return path


def _train(model_dir, task: str, tmp_path: Path, *extra) -> dict:
    run = tmp_path / "run"
    args = ["train", "--task", task, "--model", model_dir, "--data", _subset(task, "train", 160, tmp_path),
            "--eval-data", _subset(task, "test", 48, tmp_path), "--max-steps", 40, "--batch-size", 16,
            "--lr", LEARNING_RATES[task], "-o", run, "--no-progress", *extra]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("task", TASKS)
def test_task_trains_saves_and_reloads_with_identical_predictions(task, encoder_dir, tmp_path):
    summary = _train(encoder_dir, task, tmp_path)
    losses = summary["train_losses"]
    assert len(losses) == 40
    assert sum(losses[-8:]) < sum(losses[:8]), losses
    assert summary["after"]["loss"] < summary["before"]["loss"]
    assert set(summary["after"]["metrics"]) == METRICS[task]
    assert all(isinstance(v, float) for v in summary["after"]["metrics"].values())

    # the saved delta and head, on a freshly loaded base whose own head has another width
    kind = "token-classification" if task == "tag" else "sequence-classification"
    model, tokenizer = load_model_and_tokenizer(encoder_dir, task=kind, num_labels=9)
    dt.load(model, tmp_path / "run" / "delta")
    head = dt.deltas(model)["default"].config.task_head
    assert head.task == task and head.module == "classifier"
    examples = load_labelled(tmp_path / f"{task}-test.jsonl", task)
    features = tokenize_labelled(tokenizer, head, examples, 256)
    again = evaluate_task(model, head, features, LabelledCollator(tokenizer.pad_token_id, task))
    assert again.loss == pytest.approx(summary["after"]["loss"], abs=1e-6)
    expected = {k: v for k, v in summary["after"]["metrics"].items() if k != "majority_baseline"}
    assert again.metrics == pytest.approx(expected, abs=1e-9)


def test_a_decoder_trains_as_a_classifier(tiny_dir, tmp_path):
    summary = _train(tiny_dir, "classify", tmp_path, "--method", "bitfit", "--set", "add_missing=true")
    assert summary["after"]["loss"] < summary["before"]["loss"]
    config = json.loads((tmp_path / "run" / "delta" / "delta_config.json").read_text())["config"]
    assert config["task_head"]["module"] == "score"
    assert config["task_head"]["labels"] == ["account", "billing", "returns", "shipping", "technical"]


def _fails_with(message: str, *args) -> None:
    result = runner.invoke(app, ["train", "--no-progress", *[str(a) for a in args]])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output


def test_clear_errors_for_bad_task_data(encoder_dir, tmp_path):
    train = _subset("classify", "train", 40, tmp_path)
    common = ("--model", encoder_dir, "--data", train)
    _fails_with("one task per run", "--task", "classify", *common, "--data", train, "-o", tmp_path / "a")
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"text": "where is my parcel", "label": "weather"}) + "\n")
    _fails_with("label 'weather' of the held-out data is not among the head's labels",
                "--task", "classify", *common, "--eval-data", odd, "-o", tmp_path / "b")
    _fails_with("classify-train.jsonl line 1: field 'label' must be a number, got 'returns'",
                "--task", "regression", *common, "-o", tmp_path / "c")
    _fails_with("no field 'grade' for a classify task; its fields are ['label', 'text']",
                "--task", "classify", *common, "--label-field", "grade", "-o", tmp_path / "e")
    _fails_with("task='sentiment' is not valid; allowed: classify, multilabel, regression, tag",
                "--task", "sentiment", "-o", tmp_path / "d")


def test_the_bundled_encoder_and_data_are_the_defaults(tmp_path):
    """`deltatune train --task tag` alone: all-MiniLM-L6-v2 from its package, the bundled data."""
    result = runner.invoke(app, ["train", "--task", "tag", "--max-steps", "2", "--eval-limit", "16",
                                 "-o", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "loading model all-minilm-l6-v2 (bundled)" in result.output
    assert "data: 640 training examples, 200 held out" in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["after"]["metrics"]) == METRICS["tag"]
