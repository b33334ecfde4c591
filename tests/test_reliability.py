"""Nothing lost, nothing silently wrong: each case is a fault or a bad output location and its
expected outcome (exit code 2 with a one-line message naming the fix, or the correct result).

Faults are injected the way they happen: Ctrl-C (KeyboardInterrupt) raised in a given phase,
a writer that fails with ENOSPC, a free-space reading of a nearly full disk, a directory the
probe cannot write into, and a second run holding the output directory's lock.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import deltatune as dt
import deltatune.io as dt_io
import deltatune.outputs as outputs
import deltatune.train.trainer as trainer
from deltatune.cli.main import app
from deltatune.models import load_model_and_tokenizer

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def train(tiny_dir, data_file, out, *extra, steps=2):
    return invoke("train", "--model", tiny_dir, "--data", data_file, "-o", out, "--batch-size", 4, "--lr", 0.02,
                  "--eval-limit", 2, "--max-new-tokens", 2, "--no-progress", "--max-steps", steps, *extra)


def assert_clear_error(result, *fragments):
    """Exit code 2, one line starting 'error:' that names every fragment, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in " ".join(result.output.split()), result.output


@pytest.fixture(scope="module")
def finished_run(tiny_dir, data_file, tmp_path_factory):
    """One completed run, copied by the cases that need an earlier run's directory."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = train(tiny_dir, data_file, out, "--save-every", 1)
    assert result.exit_code == 0, result.output
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


# output locations checked before any work -------------------------------------------------------

def test_output_is_a_file(tiny_dir, data_file, tmp_path):
    target = tmp_path / "taken"
    target.write_text("someone's notes")
    assert_clear_error(train(tiny_dir, data_file, target), "is a file")
    assert target.read_text() == "someone's notes"


def test_output_holds_an_earlier_run(tiny_dir, data_file, tmp_path, finished_run):
    run = copy_of(finished_run, tmp_path)
    before = (run / "delta" / "delta.safetensors").read_bytes(), (run / "summary.json").read_text()
    assert_clear_error(train(tiny_dir, data_file, run), "holds an earlier run", "--resume", "--overwrite")
    assert ((run / "delta" / "delta.safetensors").read_bytes(), (run / "summary.json").read_text()) == before


def test_overwrite_replaces_an_earlier_run_and_its_checkpoints(tiny_dir, data_file, tmp_path, finished_run):
    run = copy_of(finished_run, tmp_path)
    result = train(tiny_dir, data_file, run, "--overwrite", "--r", 2, steps=1)
    assert result.exit_code == 0, result.output
    assert json.loads((run / "summary.json").read_text())["steps"] == 1
    assert not (run / "checkpoints").exists()  # the earlier run's checkpoints went with it


def test_output_not_writable(tiny_dir, data_file, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(outputs.tempfile, "NamedTemporaryFile", refuse)
    assert_clear_error(train(tiny_dir, data_file, tmp_path / "ro"), "is not writable", "Permission denied")


def test_disk_too_full_for_the_run(tiny_dir, data_file, tmp_path, monkeypatch):
    real = outputs.shutil.disk_usage
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
    result = train(tiny_dir, data_file, tmp_path / "full")
    assert_clear_error(result, "has 1.0 KiB free", "free some space")
    assert not (tmp_path / "full" / "checkpoints").exists()


def test_run_in_progress_holds_the_directory(tiny_dir, data_file, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    with outputs.RunLock(out):
        assert_clear_error(train(tiny_dir, data_file, out), "in use by another deltatune run (pid", "another --output-dir")
    assert train(tiny_dir, data_file, out).exit_code == 0  # the lock goes with its holder


def test_merge_onto_the_base_model_itself(tiny_dir, data_file, tmp_path, finished_run):
    weights = {p.name: p.read_bytes() for p in Path(tiny_dir).iterdir() if p.is_file()}
    result = invoke("merge", "--model", tiny_dir, "--delta", finished_run / "delta", "-o", tiny_dir)
    assert_clear_error(result, "is the base model being read")
    assert {p.name: p.read_bytes() for p in Path(tiny_dir).iterdir() if p.is_file()} == weights


def test_export_onto_the_delta_itself(tiny_dir, data_file, tmp_path, finished_run):
    run = copy_of(finished_run, tmp_path)
    assert_clear_error(invoke("export", "--model", tiny_dir, "--delta", run / "delta", "-o", run / "delta"),
                       "is the delta being read")


def test_export_to_a_file(tiny_dir, tmp_path, finished_run):
    target = tmp_path / "file.bin"
    target.write_bytes(b"keep")
    assert_clear_error(invoke("export", "--model", tiny_dir, "--delta", finished_run / "delta", "-o", target), "is a file")
    assert target.read_bytes() == b"keep"


# interruptions in every phase ------------------------------------------------------------------

def _interrupt_evaluation(monkeypatch, which: int):
    real, calls = trainer.LanguageModeling.evaluate, []

    def evaluate(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == which:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(trainer.LanguageModeling, "evaluate", evaluate)


def test_interrupt_before_training_says_nothing_was_trained(tiny_dir, data_file, tmp_path, monkeypatch):
    _interrupt_evaluation(monkeypatch, 1)
    result = train(tiny_dir, data_file, tmp_path / "run")
    assert result.exit_code != 0
    assert "interrupted during the evaluation before training; nothing was trained yet" in result.output


def test_interrupt_after_training_keeps_the_trained_delta(tiny_dir, data_file, tmp_path, monkeypatch):
    _interrupt_evaluation(monkeypatch, 2)
    result = train(tiny_dir, data_file, tmp_path / "run")
    assert result.exit_code != 0
    assert "interrupted during the evaluation after training; the trained delta is saved in" in result.output
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    assert dt.load(model, tmp_path / "run" / "delta") == ["default"]


def test_final_save_on_a_full_disk_rescues_the_delta(tiny_dir, data_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = dt_io.save_file

    def full_disk_in_output(tensors, filename, metadata=None):
        if Path(filename).parent == out / "delta":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(dt_io, "save_file", full_disk_in_output)
    result = train(tiny_dir, data_file, out)
    assert_clear_error(result, "no space left on the device", "it is safe in")
    rescued = Path(" ".join(result.output.split()).split("it is safe in ")[1].strip())
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    assert dt.load(model, rescued) == ["default"]
    assert not list((out / "delta").glob(".delta.safetensors.*"))  # no half-written file left


# resume checks what it resumes -----------------------------------------------------------------

@pytest.mark.parametrize("changed", [("--r", 3), ("--alpha", 3.0), ("--lr", 0.5), ("--seed", 7)])
def test_resume_with_other_settings_is_refused(tiny_dir, data_file, tmp_path, finished_run, changed):
    run = copy_of(finished_run, tmp_path)
    result = train(tiny_dir, data_file, run, "--resume", *changed, "--save-every", 1, steps=3)
    assert_clear_error(result, "was trained with other settings", "resume with the same ones")


def test_resume_with_other_data_is_refused(tiny_dir, data_file, tmp_path, finished_run):
    other = tmp_path / "other.jsonl"
    other.write_text(data_file.read_text())
    run = copy_of(finished_run, tmp_path)
    result = invoke("train", "--model", tiny_dir, "--data", other, "-o", run, "--batch-size", 4, "--lr", 0.02,
                    "--eval-limit", 2, "--max-new-tokens", 2, "--no-progress", "--max-steps", 3, "--resume",
                    "--save-every", 1)
    assert_clear_error(result, "other settings", "data:")


def test_resumed_run_scores_the_base_before_training(tiny_dir, data_file, tmp_path, finished_run):
    run = copy_of(finished_run, tmp_path)
    first_before = json.loads((run / "summary.json").read_text())["before"]
    result = train(tiny_dir, data_file, run, "--resume", "--save-every", 1, steps=3)
    assert result.exit_code == 0, result.output
    assert json.loads((run / "summary.json").read_text())["before"] == first_before


def test_rotation_keeps_the_checkpoint_just_written(tiny_dir, data_file, tmp_path):
    out = tmp_path / "run"
    for step in (99, 100):  # an older run's, with higher step numbers
        (out / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
    run = trainer.Trainer(trainer.TrainSettings(model=str(tiny_dir), data=str(data_file), output_dir=str(out)))
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    dt.attach(model, dt.LoRAConfig(r=2))
    run.names = ["default"]
    import torch

    optimizer = torch.optim.AdamW(dt.trainable_parameters(model), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    written = run._checkpoint(model, optimizer, scheduler, 3)
    assert written.is_dir() and written.name == "step-000003"
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000003", "step-000100"]


# saves are whole or refused --------------------------------------------------------------------

def test_save_interrupted_between_tensors_and_config_is_refused_on_load(tiny_dir, data_file, tmp_path, monkeypatch):
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    dt.attach(model, dt.LoRAConfig(r=2))
    dt.save(model, tmp_path / "d")
    for parameter in dt.trainable_parameters(model):
        parameter.data += 1

    def crash(path, text):
        raise KeyboardInterrupt

    monkeypatch.setattr(dt_io, "write_text_atomically", crash)
    with pytest.raises(KeyboardInterrupt):
        dt.save(model, tmp_path / "d")
    fresh, _ = load_model_and_tokenizer(str(tiny_dir))
    with pytest.raises(dt.CheckpointError, match="is not the file delta_config.json was saved with"):
        dt.load(fresh, tmp_path / "d")


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_damaged_delta_file_is_a_clear_error(tiny_dir, data_file, tmp_path, finished_run, damage):
    run = copy_of(finished_run, tmp_path)
    weights = run / "delta" / "delta.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00" * 64}[damage])
    result = invoke("eval", "--model", tiny_dir, "--delta", run / "delta", "--data", data_file, "--max-new-tokens", 2)
    assert_clear_error(result, "delta.safetensors")
