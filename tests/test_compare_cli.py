"""`deltatune compare` on a tiny local model: the report's files, progress, and resuming."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

import deltatune as dt
from deltatune.analysis.compare import DEFAULT_METHODS, MethodRun
from deltatune.cli.main import app

runner = CliRunner()


def compare(tiny_dir, data_file, out, *extra):
    args = ["compare", "--model", tiny_dir, "--data", data_file, "-o", out, "--steps", 2, "--batch-size", 4,
            "--eval-limit", 1, "--no-progress", *extra]
    return runner.invoke(app, [str(a) for a in args])


def test_compare_writes_the_report_and_resumes(tiny_dir, data_file, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "cmp"
    result = compare(tiny_dir, data_file, out, "--methods", "lora,ia3")
    assert result.exit_code == 0, result.output
    assert "[1/2] lora: 2 steps of batch 4" in result.output and "[2/2] ia3" in result.output
    for name in ("report.md", "report.html", "results.json", "loss_curves.png", "metric_vs_trainable.png"):
        assert (out / name).is_file(), name
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and not re.search(r"(src|href)=\"(?!data:)", page)
    results = json.loads((out / "results.json").read_text())["runs"]
    assert [r["method"] for r in results] == ["lora", "ia3"]
    assert all(len(r["train_losses"]) == 2 and r["peak_memory_mib"] > 0 and r["tokens_per_second"] > 0 for r in results)
    markdown = (out / "report.md").read_text()
    assert "| `lora` |" in markdown and "trainable %" in markdown

    # a second run with one more method trains only that one
    again = compare(tiny_dir, data_file, out, "--methods", "lora,ia3,bitfit")
    assert again.exit_code == 0, again.output
    assert "lora: finished earlier" in again.output and "ia3: finished earlier" in again.output
    assert "[3/3] bitfit: 2 steps" in again.output
    # other settings are another run: lora retrains
    changed = compare(tiny_dir, data_file, out, "--methods", "lora", "--seed", 1)
    assert changed.exit_code == 0 and "finished earlier" not in changed.output


def test_method_run_reads_a_run_directory(tiny_dir, data_file, tmp_path):
    """Prefix tuning initialises from a data batch first: only the training steps' losses count."""
    out = tmp_path / "cmp"
    assert compare(tiny_dir, data_file, out, "--methods", "prefix").exit_code == 0
    run = MethodRun.from_run_dir(out / "prefix")
    assert run.method == "prefix" and 0 < run.trainable_percent <= 100 and run.steps == 2
    assert len(run.train_losses) == 2 and run.final_train_loss == pytest.approx(sum(run.train_losses) / 2)


def test_defaults_cover_one_method_per_family():
    assert set(DEFAULT_METHODS) == {"lora", "ia3", "prompt", "prefix", "houlsby", "bitfit", "top_layers"}
    assert set(DEFAULT_METHODS) <= set(dt.methods())


def test_unknown_method_is_a_clear_error(tiny_dir, data_file, tmp_path):
    result = compare(tiny_dir, data_file, tmp_path / "cmp", "--methods", "lora,lorra")
    assert result.exit_code == 2 and "unknown method(s) ['lorra']; allowed:" in result.output
