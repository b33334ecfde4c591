"""Multi-task training from the CLI: one delta per task, or one hypernetwork for all tasks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from deltatune.cli.main import app
from deltatune.errors import DataError
from deltatune.train.data import load_examples
from deltatune.train.settings import TrainSettings
from deltatune.train.tasks import split_data, task_names

runner = CliRunner()
WORDS = ["cat", "dog", "sun", "map", "box", "pen", "cup", "hat", "bus", "egg", "fox", "jam", "ink", "owl", "rug", "tea"]
TASKS = {"upper": str.upper, "reverse": lambda w: w[::-1], "double": lambda w: w + w}


def write_task(path, task, with_field=False):
    records = [{"instruction": f"{task}:", "input": w, "output": TASKS[task](w)} | ({"task": task} if with_field else {})
               for w in WORDS]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    return {task: write_task(root / f"{task}.jsonl", task) for task in TASKS}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def train(tiny_dir, out, *extra):
    return invoke("train", "--model", tiny_dir, "-o", out, "--batch-size", 4, "--eval-limit", 2, "--max-new-tokens", 3,
                  "--no-progress", "--eval-fraction", 0.25, *extra)


def summary(run):
    return json.loads((run / "summary.json").read_text())


def test_tasks_come_from_file_names_or_a_task_field(task_files, tmp_path):
    settings = TrainSettings(data=[str(task_files["upper"]), str(task_files["reverse"])], eval_fraction=0.25)
    train_examples, held_out = split_data(settings)
    assert task_names(train_examples) == ["upper", "reverse"]
    # every task holds out its own share
    assert sorted(e.task for e in held_out) == ["reverse"] * 4 + ["upper"] * 4
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(write_task(tmp_path / "a.jsonl", "double", with_field=True).read_text()
                     + write_task(tmp_path / "b.jsonl", "upper", with_field=True).read_text())
    assert task_names(load_examples(mixed)) == ["double", "upper"]
    assert task_names(load_examples(task_files["upper"])) == []


def test_examples_with_and_without_a_task_are_refused(task_files, tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(task_files["upper"].read_text() + write_task(tmp_path / "d.jsonl", "double", True).read_text())
    with pytest.raises(DataError, match="mixed.jsonl line 1 has no task but mixed.jsonl line 17 has task 'double'"):
        task_names(load_examples(mixed))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "output": "y", "task": 3}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl line 1: field 'task' must name a task"):
        load_examples(bad)


def test_one_lora_per_task_trained_together_and_evaluated_per_task(tiny_dir, task_files, tmp_path):
    run = tmp_path / "run"
    result = train(tiny_dir, run, "--data", task_files["upper"], "--data", task_files["reverse"], "--max-steps", 4,
                   "--r", 4, "--lr", 0.02)
    assert result.exit_code == 0, result.output
    assert "upper: exact match" in result.output and "reverse: loss" in result.output
    report = summary(run)
    assert len(report["train_losses"]) == 4 and all(loss > 0 for loss in report["train_losses"])
    assert set(report["after"]["per_task"]) == {"upper", "reverse"}
    assert {s["task"] for s in report["after"]["samples"]} == {"upper", "reverse"}
    losses = report["after"]["per_task"]
    assert report["after"]["loss"] == pytest.approx((losses["upper"]["loss"] + losses["reverse"]["loss"]) / 2)
    # both deltas learned: each task's held-out loss fell
    for task in ("upper", "reverse"):
        assert losses[task]["loss"] < report["before"]["per_task"][task]["loss"]
    assert sorted(p.name for p in (run / "delta").iterdir()) == ["reverse", "upper"]
    assert json.loads((run / "delta" / "upper" / "delta_config.json").read_text())["name"] == "upper"


def test_one_hypernetwork_for_all_tasks_then_a_new_task_trains_only_its_embedding(tiny_dir, task_files, tmp_path):
    mixed = tmp_path / "two.jsonl"
    mixed.write_text(write_task(tmp_path / "u.jsonl", "upper", True).read_text()
                     + write_task(tmp_path / "r.jsonl", "reverse", True).read_text())
    run = tmp_path / "hyper"
    result = train(tiny_dir, run, "--data", mixed, "--method", "hyperformer", "--max-steps", 4, "--lr", 0.01,
                   "--set", "bottleneck=4", "--set", "embedding_dim=8", "--set", "projected_dim=8")
    assert result.exit_code == 0, result.output
    report = summary(run)
    assert set(report["after"]["per_task"]) == {"upper", "reverse"}
    config = json.loads((run / "delta" / "delta_config.json").read_text())["config"]
    assert config["method"] == "hyperformer" and config["tasks"] == ["upper", "reverse"]
    trained = load_file(run / "delta" / "delta.safetensors")

    new = tmp_path / "new"
    result = train(tiny_dir, new, "--data", write_task(tmp_path / "double.jsonl", "double", True),
                   "--method", "hyperformer", "--from-delta", run / "delta", "--max-steps", 3, "--lr", 0.05)
    assert result.exit_code == 0, result.output
    assert "training only their task embeddings" in result.output
    assert "trainable params: 8 " in result.output
    assert set(summary(new)["after"]["per_task"]) == {"double"}
    extended = load_file(new / "delta" / "delta.safetensors")
    new_key = next(k for k in extended if k.endswith("task_embeddings.2"))  # tasks in config order
    assert set(extended) == set(trained) | {new_key}
    for key, value in trained.items():
        assert torch.equal(extended[key], value), key
    start = torch.stack([v for k, v in trained.items() if ".task_embeddings." in k]).mean(0)
    assert not torch.equal(extended[new_key], start)
    config = json.loads((new / "delta" / "delta_config.json").read_text())["config"]
    assert config["tasks"] == ["upper", "reverse", "double"]


def test_held_out_tasks_must_be_training_tasks(tiny_dir, task_files, tmp_path):
    result = train(tiny_dir, tmp_path / "run", "--data", task_files["upper"], "--data", task_files["reverse"],
                   "--eval-data", task_files["double"], "--eval-data", task_files["upper"], "--max-steps", 1)
    assert result.exit_code != 0
    assert "held-out data has tasks ['double']" in result.output


def test_from_delta_without_a_delta_for_a_task_is_refused(tiny_dir, task_files, tmp_path):
    run = tmp_path / "one"
    assert train(tiny_dir, run, "--data", task_files["upper"], "--data", task_files["reverse"], "--max-steps", 1,
                 "--r", 2).exit_code == 0
    result = train(tiny_dir, tmp_path / "two", "--data", task_files["upper"], "--data", task_files["double"],
                   "--from-delta", run / "delta", "--max-steps", 1)
    assert result.exit_code != 0
    assert "has no delta for tasks ['double']" in result.output



def test_a_single_file_is_one_task_named_like_the_file_for_a_hypernetwork(task_files, tmp_path):
    held_out = write_task(tmp_path / "held.jsonl", "upper")
    settings = TrainSettings(data=str(task_files["upper"]), eval_data=str(held_out), method="hyperformer")
    train_examples, held = split_data(settings)
    assert task_names(train_examples) == task_names(held) == ["upper"]
    # other methods: a single file has no task
    assert task_names(split_data(TrainSettings(data=str(task_files["upper"]), eval_data=str(held_out)))[0]) == []
