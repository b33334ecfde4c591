"""`deltatune train` on the bundled SmolLM2 model and data, for a handful of steps."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from deltatune.cli.main import app
from deltatune.errors import ModelLoadError
from deltatune.models import bundled_model_dir


@pytest.mark.slow
def test_train_with_no_model_or_data_arguments(tmp_path):
    try:
        bundled_model_dir()  # converts once; later runs read the cache
    except ModelLoadError as exc:
        pytest.fail(f"the bundled model must be available to the test suite: {exc}")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "-o", str(out), "--max-steps", "3", "--eval-limit", "6",
                                      "--no-progress", "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    assert summary["after"]["loss"] < summary["before"]["loss"], "three steps on the demo task lower the held-out loss"
    assert summary["before"]["exact_match"] is not None and len(summary["after"]["samples"]) == 3
    assert (out / "delta" / "delta.safetensors").is_file()
    assert "trainable params:" in result.output and "held-out evaluation" in result.output
