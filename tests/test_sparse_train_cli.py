"""Diff Pruning, FISH Mask and Intrinsic SAID through ``deltatune train`` on a tiny local model,
and ``deltatune analyze intrinsic-dim`` on a tiny encoder: the trainer's calibration, L0
penalty and pruning step reach them, and what they save is what their methods say."""

from __future__ import annotations

import json
import re

from safetensors.torch import load_file
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.main import app
from deltatune.models import load_model_and_tokenizer
from deltatune.train.objectives import encoder_data_path
from tiny_hub import save_tiny_encoder

runner = CliRunner()


def train(tiny_dir, data_file, out, method, *extra):
    args = ["train", "--model", tiny_dir, "--data", data_file, "-o", out, "--batch-size", 4, "--max-steps", 6,
            "--eval-limit", 2, "--max-new-tokens", 4, "--no-progress", "--method", method, *extra]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output, load_file(out / "delta" / "delta.safetensors")


def test_fish_mask_trains_after_calibrating_and_saves_its_k_entries(tiny_dir, data_file, tmp_path):
    output, tensors = train(tiny_dir, data_file, tmp_path / "run", "fish_mask", "--set", "count=500")
    assert re.search(r"calibrated \d+ modules on 4 batches", output)
    assert sum(t.numel() for k, t in tensors.items() if k.endswith("kept_values")) == 500
    assert {k.rsplit(".", 1)[1] for k in tensors} == {"kept_values", "index_low", "index_blocks"}
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    assert dt.load(model, tmp_path / "run" / "delta") == ["default"]


def test_diff_pruning_trains_prunes_and_saves_the_kept_share(tiny_dir, data_file, tmp_path):
    _, tensors = train(tiny_dir, data_file, tmp_path / "run", "diff_pruning", "--set", "share=0.01")
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    plan = dt.plan(model, dt.DiffPruningConfig())
    kept = sum(t.numel() for k, t in tensors.items() if k.endswith("kept_values"))
    assert kept == round(0.01 * plan.delta_params / 2)  # pruned at step 3 of 6, the mask fixed since
    assert not any(k.endswith("log_alpha") or k.endswith(".w") for k in tensors)


def test_intrinsic_said_saves_theta_and_one_scale_per_layer(tiny_dir, data_file, tmp_path):
    _, tensors = train(tiny_dir, data_file, tmp_path / "run", "intrinsic_said", "--set", "dimension=32")
    thetas = [t for k, t in tensors.items() if k.endswith(".theta")]
    assert len(thetas) == 1 and thetas[0].numel() == 32 and thetas[0].abs().sum() > 0
    assert sum(k.endswith(".scale") for k in tensors) == len(tensors) - 1


def test_analyze_intrinsic_dim_prints_d90_and_writes_the_plot(tmp_path):
    words = set()
    records = [json.loads(line) for line in encoder_data_path("classify", "train").read_text().splitlines()]
    for record in records:
        words.update(re.findall(r"\w+|[^\w\s]", record["text"]))
    model_dir = save_tiny_encoder(tmp_path / "encoder", words)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records[:64]))
    out = tmp_path / "id"
    result = runner.invoke(app, [str(a) for a in [
        "analyze", "intrinsic-dim", "--model", model_dir, "--data", data, "--dimensions", "4,256",
        "--steps", 4, "--lr", 0.05, "-o", out, "--no-progress"]])
    assert result.exit_code == 0, result.output + repr(result.exception)
    numbers = json.loads((out / "intrinsic_dim.json").read_text())
    assert [p["dimension"] for p in numbers["points"]] == [4, 256] and numbers["metric"] == "accuracy"
    line = f"d90 = {numbers['d90']}" if numbers["d90"] is not None else "d90 not reached"
    assert line in result.output
    assert (out / "intrinsic_dim.png").stat().st_size > 0
    bad = runner.invoke(app, ["analyze", "intrinsic-dim", "--dimensions", "10,ten", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--dimensions must be comma-separated integers" in bad.output
