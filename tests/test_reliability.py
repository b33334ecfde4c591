"""Nothing lost, nothing silently wrong: each case is a fault or a bad output location and its
expected outcome (exit code 2 with a one-line message naming the fix, or the correct result).

Faults are injected the way they happen: Ctrl-C (KeyboardInterrupt) raised in a given phase,
a writer that fails with ENOSPC, a free-space reading of a nearly full disk, a directory the
probe cannot write into, and a second run holding the output directory's lock.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

import deltatune as dt
import deltatune.io as dt_io
import deltatune.outputs as outputs
import deltatune.train.objectives as objectives
import deltatune.train.trainer as trainer
from deltatune.cli.main import app
from deltatune.models import load_model_and_tokenizer

runner = CliRunner()


def invoke(*args):
    """Run the CLI in-process. An exception the CLI does not turn into an exit code is what a
    user would see as a traceback: it propagates here and fails the case."""
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


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


def _fault(kind: str):
    """The issue-19 fault class a case belongs to, as a marker (``pytest -m fault_lost``)."""
    return getattr(pytest.mark, f"fault_{kind}")


# output locations checked before any work -------------------------------------------------------

@_fault("lost")
def test_output_is_a_file(tiny_dir, data_file, tmp_path):
    target = tmp_path / "taken"
    target.write_text("someone's notes")
    assert_clear_error(train(tiny_dir, data_file, target), "is a file")
    assert target.read_text() == "someone's notes"


@_fault("lost")
def test_output_holds_an_earlier_run(tiny_dir, data_file, tmp_path, finished_run):
    run = copy_of(finished_run, tmp_path)
    before = (run / "delta" / "delta.safetensors").read_bytes(), (run / "summary.json").read_text()
    assert_clear_error(train(tiny_dir, data_file, run), "holds an earlier run", "--resume", "--overwrite")
    assert ((run / "delta" / "delta.safetensors").read_bytes(), (run / "summary.json").read_text()) == before


@_fault("lost")
def test_overwrite_replaces_an_earlier_run_and_its_checkpoints(tiny_dir, data_file, tmp_path, finished_run):
    run = copy_of(finished_run, tmp_path)
    result = train(tiny_dir, data_file, run, "--overwrite", "--r", 2, steps=1)
    assert result.exit_code == 0, result.output
    assert json.loads((run / "summary.json").read_text())["steps"] == 1
    assert not (run / "checkpoints").exists()  # the earlier run's checkpoints went with it


@_fault("lost")
def test_output_not_writable(tiny_dir, data_file, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(outputs.tempfile, "NamedTemporaryFile", refuse)
    assert_clear_error(train(tiny_dir, data_file, tmp_path / "ro"), "is not writable", "Permission denied")


@_fault("lost")
def test_disk_too_full_for_the_run(tiny_dir, data_file, tmp_path, monkeypatch):
    real = outputs.shutil.disk_usage
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
    result = train(tiny_dir, data_file, tmp_path / "full")
    assert_clear_error(result, "has 1.0 KiB free", "free some space")
    assert not (tmp_path / "full" / "checkpoints").exists()


@_fault("lost")
def test_run_in_progress_holds_the_directory(tiny_dir, data_file, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    with outputs.RunLock(out):
        assert_clear_error(train(tiny_dir, data_file, out), "in use by another deltatune run (pid", "another --output-dir")
    assert train(tiny_dir, data_file, out).exit_code == 0  # the lock goes with its holder


@_fault("lost")
def test_merge_onto_the_base_model_itself(tiny_dir, data_file, tmp_path, finished_run):
    weights = {p.name: p.read_bytes() for p in Path(tiny_dir).iterdir() if p.is_file()}
    result = invoke("merge", "--model", tiny_dir, "--delta", finished_run / "delta", "-o", tiny_dir)
    assert_clear_error(result, "is the base model being read")
    assert {p.name: p.read_bytes() for p in Path(tiny_dir).iterdir() if p.is_file()} == weights


@_fault("lost")
def test_export_onto_the_delta_itself(tiny_dir, data_file, tmp_path, finished_run):
    run = copy_of(finished_run, tmp_path)
    assert_clear_error(invoke("export", "--model", tiny_dir, "--delta", run / "delta", "-o", run / "delta"),
                       "is the delta being read")


@_fault("traceback")
def test_export_to_a_file(tiny_dir, tmp_path, finished_run):
    target = tmp_path / "file.bin"
    target.write_bytes(b"keep")
    assert_clear_error(invoke("export", "--model", tiny_dir, "--delta", finished_run / "delta", "-o", target), "is a file")
    assert target.read_bytes() == b"keep"


# interruptions in every phase ------------------------------------------------------------------

def _interrupt_evaluation(monkeypatch, which: int):
    real, calls = objectives.LanguageModeling.evaluate, []

    def evaluate(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == which:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(objectives.LanguageModeling, "evaluate", evaluate)


def _sigterm(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler turns it into an interruption here
    raise AssertionError("SIGTERM did not interrupt")


def _saved_delta_loads(tiny_dir, delta_dir):
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    return dt.load(model, delta_dir) == ["default"]


@_fault("lost")
def test_interrupt_while_loading_says_nothing_was_trained(tiny_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setattr(objectives.LanguageModeling, "load", lambda self, *args: (_ for _ in ()).throw(KeyboardInterrupt))
    result = train(tiny_dir, data_file, tmp_path / "run")
    assert result.exit_code == 130
    assert "interrupted while loading; nothing was trained yet, nothing saved" in result.output
    assert not (tmp_path / "run" / "delta").exists()


@_fault("unclear")
def test_interrupt_before_training_says_nothing_was_trained(tiny_dir, data_file, tmp_path, monkeypatch):
    _interrupt_evaluation(monkeypatch, 1)
    result = train(tiny_dir, data_file, tmp_path / "run")
    assert result.exit_code == 130
    assert "interrupted during the evaluation before training; nothing was trained yet" in result.output


@_fault("lost")
def test_interrupt_after_training_keeps_the_trained_delta(tiny_dir, data_file, tmp_path, monkeypatch):
    _interrupt_evaluation(monkeypatch, 2)
    result = train(tiny_dir, data_file, tmp_path / "run")
    assert result.exit_code == 130
    assert "interrupted during the evaluation after training; the trained delta is saved in" in result.output
    assert _saved_delta_loads(tiny_dir, tmp_path / "run" / "delta")


@_fault("lost")
def test_sigterm_after_training_keeps_the_trained_delta(tiny_dir, data_file, tmp_path, monkeypatch):
    real, calls = objectives.LanguageModeling.evaluate, []

    def evaluate(self, *args, **kwargs):
        calls.append(1)
        return _sigterm() if len(calls) == 2 else real(self, *args, **kwargs)

    monkeypatch.setattr(objectives.LanguageModeling, "evaluate", evaluate)
    result = train(tiny_dir, data_file, tmp_path / "run")
    assert result.exit_code == 130
    assert "interrupted during the evaluation after training; the trained delta is saved in" in result.output
    assert _saved_delta_loads(tiny_dir, tmp_path / "run" / "delta")
    assert signal.getsignal(signal.SIGTERM) is not trainer._raise_interrupt  # the run's handler is gone


@_fault("lost")
def test_interrupt_during_the_final_save_finishes_the_save(tiny_dir, data_file, tmp_path, monkeypatch):
    real, calls = trainer.save_delta, []

    def save_delta(model, path, *args, **kwargs):
        calls.append(path)
        if Path(path).name == "delta" and Path(path).parent == tmp_path / "run" and len([c for c in calls if Path(c).parent == tmp_path / "run"]) == 1:
            raise KeyboardInterrupt
        return real(model, path, *args, **kwargs)

    monkeypatch.setattr(trainer, "save_delta", save_delta)
    result = train(tiny_dir, data_file, tmp_path / "run")
    assert result.exit_code == 130
    assert "finishing the save first" in result.output
    assert "interrupted after training; the trained delta is saved in" in " ".join(result.output.split())
    assert _saved_delta_loads(tiny_dir, tmp_path / "run" / "delta")


@_fault("lost")
def test_interrupt_mid_training_checkpoints_and_resumes(tiny_dir, data_file, tmp_path, monkeypatch):
    real, steps = trainer.after_optimizer_step, []

    def step_then_interrupt(*args, **kwargs):
        steps.append(1)
        real(*args, **kwargs)
        if len(steps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "after_optimizer_step", step_then_interrupt)
    result = train(tiny_dir, data_file, tmp_path / "run", steps=4)
    assert result.exit_code == 130
    assert "interrupted at step 2; saved" in result.output and "--resume" in result.output
    monkeypatch.setattr(trainer, "after_optimizer_step", real)
    resumed = train(tiny_dir, data_file, tmp_path / "run", "--resume", steps=4)
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4


@_fault("lost")
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
@_fault("wrong")
def test_resume_with_other_settings_is_refused(tiny_dir, data_file, tmp_path, finished_run, changed):
    run = copy_of(finished_run, tmp_path)
    result = train(tiny_dir, data_file, run, "--resume", *changed, "--save-every", 1, steps=3)
    assert_clear_error(result, "was trained with other settings", "resume with the same ones")


@_fault("wrong")
def test_resume_with_other_data_is_refused(tiny_dir, data_file, tmp_path, finished_run):
    other = tmp_path / "other.jsonl"
    other.write_text(data_file.read_text())
    run = copy_of(finished_run, tmp_path)
    result = invoke("train", "--model", tiny_dir, "--data", other, "-o", run, "--batch-size", 4, "--lr", 0.02,
                    "--eval-limit", 2, "--max-new-tokens", 2, "--no-progress", "--max-steps", 3, "--resume",
                    "--save-every", 1)
    assert_clear_error(result, "other settings", "data:")


@_fault("wrong")
def test_resumed_run_scores_the_base_before_training(tiny_dir, data_file, tmp_path, finished_run):
    run = copy_of(finished_run, tmp_path)
    first_before = json.loads((run / "summary.json").read_text())["before"]
    result = train(tiny_dir, data_file, run, "--resume", "--save-every", 1, steps=3)
    assert result.exit_code == 0, result.output
    assert json.loads((run / "summary.json").read_text())["before"] == first_before


@_fault("lost")
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
    from types import SimpleNamespace

    state = SimpleNamespace(plain_model=model, step=3, optimizer=optimizer, scheduler=scheduler,
                            accelerator=SimpleNamespace(num_processes=1))
    written = run._checkpoint(state)
    assert written.is_dir() and written.name == "step-000003"
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000003", "step-000100"]


# saves are whole or refused --------------------------------------------------------------------

@_fault("wrong")
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
@_fault("traceback")
def test_damaged_delta_file_is_a_clear_error(tiny_dir, data_file, tmp_path, finished_run, damage):
    run = copy_of(finished_run, tmp_path)
    weights = run / "delta" / "delta.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00" * 64}[damage])
    result = invoke("eval", "--model", tiny_dir, "--delta", run / "delta", "--data", data_file, "--max-new-tokens", 2)
    assert_clear_error(result, "delta.safetensors")


# bad input: one line naming the fix, exit 2, never a traceback ----------------------------------

def _yaml(tmp_path, text):
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    return ("--config", path)


def _file(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _lines(tmp_path, name, text):
    return _file(tmp_path, name, text.encode())


#: (fault class, case, extra train arguments made from tmp_path, fragments of the expected one-line error).
#: Classes as issue 19 counts them: a traceback before, a message that did not say what was wrong,
#: a silently wrong result. Later flags win, so a case's --model/--data/--max-steps replace the working ones.
BAD_TRAIN_INPUT = [
    # values of the wrong type or out of range: tracebacks before
    ("traceback", "lr-nan", lambda t: ("--lr", "nan"), ["lr must be a finite number, got nan"]),
    ("traceback", "lr-inf", lambda t: ("--lr", "inf"), ["lr must be a finite number, got inf"]),
    ("traceback", "lr-zero", lambda t: ("--lr", 0), ["lr must be positive, got 0.0"]),
    ("traceback", "lr-negative", lambda t: ("--lr", -1), ["lr must be positive, got -1.0"]),
    ("traceback", "epochs-nan", lambda t: ("--epochs", "nan"), ["epochs must be a finite number"]),
    ("traceback", "epochs-zero", lambda t: ("--epochs", 0), ["epochs must be positive"]),
    ("traceback", "alpha-nan", lambda t: ("--alpha", "nan"), ["alpha must be a finite number"]),
    ("traceback", "rank-zero", lambda t: ("--r", 0), ["r must be a positive integer (the LoRA rank), got 0"]),
    ("traceback", "dropout-above-one", lambda t: ("--dropout", 1.5), ["dropout must be in [0, 1), got 1.5"]),
    ("traceback", "eval-fraction-nan", lambda t: ("--eval-fraction", "nan"), ["eval_fraction must be a finite number"]),
    ("traceback", "max-steps-zero", lambda t: ("--max-steps", 0), ["max_steps must be positive, got 0"]),
    ("traceback", "save-every-negative", lambda t: ("--save-every", -1), ["save_every must be positive, got -1"]),
    ("traceback", "eval-limit-negative", lambda t: ("--eval-limit", -1), ["eval_limit must be positive, got -1"]),
    ("traceback", "grad-accum-zero", lambda t: ("--grad-accum", 0), ["grad_accum must be positive, got 0"]),
    ("traceback", "max-new-tokens-negative", lambda t: ("--max-new-tokens", -1), ["max_new_tokens must be positive"]),
    ("traceback", "set-unparsable", lambda t: ("--set", "r={"), ["--set 'r={': the value is not valid YAML"]),
    ("traceback", "set-fraction-rank", lambda t: ("--set", "r=1.5"), ["r must be an integer, got 1.5"]),
    ("traceback", "set-without-equals", lambda t: ("--set", "r"), ["--set expects key=value, got 'r'"]),
    ("traceback", "set-without-key", lambda t: ("--set", "=3"), ["--set expects key=value, got '=3'"]),
    ("traceback", "set-warmup-above-one", lambda t: ("--set", "warmup_ratio=2"), ["warmup_ratio must be in [0, 1), got 2"]),
    ("traceback", "yaml-fraction-count", lambda t: _yaml(t, "grad_accum: 1.5\n"), ["grad_accum must be an integer, got 1.5"]),
    ("traceback", "yaml-bool-count", lambda t: _yaml(t, "grad_accum: true\n"), ["grad_accum must be an integer, got True"]),
    ("traceback", "yaml-seed-string", lambda t: _yaml(t, "seed: abc\n"), ["seed must be an integer, got 'abc'"]),
    ("traceback", "yaml-decay-word", lambda t: _yaml(t, "weight_decay: abc\n"), ["weight_decay must be a number, got 'abc'"]),
    ("traceback", "yaml-warmup-nan", lambda t: _yaml(t, "warmup_ratio: .nan\n"), ["warmup_ratio must be a finite number, got nan"]),
    ("traceback", "yaml-epochs-list", lambda t: _yaml(t, "epochs: [1]\n"), ["epochs must be a number, got [1]"]),
    ("traceback", "yaml-rank-float", lambda t: _yaml(t, "r: 8.0\n"), ["r must be an integer, got 8.0"]),
    ("traceback", "yaml-method-int", lambda t: _yaml(t, "method: 3\n"), ["unknown method 3"]),
    ("traceback", "yaml-negative-decay", lambda t: _yaml(t, "weight_decay: -0.1\n"), ["weight_decay and max_grad_norm must be >= 0"]),
    ("traceback", "yaml-targets-int", lambda t: _yaml(t, "targets: 5\n"), ["targets must be a pattern or a list of patterns"]),
    ("traceback", "yaml-nested-modules-to-save", lambda t: _yaml(t, "modules_to_save: [[lm_head]]\n"), ["modules_to_save must be a pattern"]),
    ("traceback", "yaml-unparsable", lambda t: _yaml(t, "r: [1,\n"), ["cannot parse", "settings.yaml"]),
    ("traceback", "yaml-a-list", lambda t: _yaml(t, "[1, 2]\n"), ["must hold a mapping of option names to values, got list"]),
    ("traceback", "yaml-a-number", lambda t: _yaml(t, "3\n"), ["must hold a mapping of option names to values, got int"]),
    ("traceback", "yaml-empty", lambda t: _yaml(t, ""), ["must hold a mapping of option names to values, got NoneType"]),
    ("traceback", "yaml-object-tag", lambda t: _yaml(t, "r: !!python/object/apply:os.system ['echo owned']\n"),
     ["could not determine a constructor for the tag"]),
    ("traceback", "json-unparsable", lambda t: ("--config", _lines(t, "c.json", "{bad")), ["cannot parse", "c.json"]),
    ("traceback", "config-not-utf8", lambda t: ("--config", _file(t, "c.yaml", b"r: \xff\xfe\n")), ["is not UTF-8 text"]),
    ("traceback", "data-not-utf8", lambda t: ("--data", _file(t, "d.jsonl", b'{"text": "\xff"}\n')), ["d.jsonl is not UTF-8 text"]),
    ("traceback", "data-name-with-brackets", lambda t: ("--data", t / "[draft] set.jsonl"), ["[draft] set.jsonl", "does not exist"]),
    ("traceback", "data-invalid-json-line", lambda t: ("--data", _lines(t, "d.jsonl", '{"text": "a"}\n{bad\n')),
     ["d.jsonl line 2: invalid JSON"]),
    ("traceback", "data-record-a-list", lambda t: ("--data", _lines(t, "d.jsonl", "[1, 2]\n")),
     ["d.jsonl line 1: expected an object with named fields, got list"]),
    ("traceback", "data-json-an-object", lambda t: ("--data", _lines(t, "d.json", '{"a": 1}')), ["expected a JSON list of records, got dict"]),
    ("traceback", "data-parquet-damaged", lambda t: ("--data", _file(t, "d.parquet", b"not parquet")), ["d.parquet cannot be read as Parquet"]),
    ("traceback", "data-text-a-number", lambda t: ("--data", _lines(t, "d.jsonl", '{"text": 5}\n' * 5)),
     ["field 'text' must be a string, got int"]),
    ("traceback", "data-messages-a-string", lambda t: ("--data", _lines(t, "d.jsonl", '{"messages": "hi"}\n' * 5)),
     ["field 'messages' must be a list of {role, content} objects, got str"]),
    ("traceback", "model-truncated-config", lambda t: ("--model", _lines(t, "m/config.json", "{bad").parent), ["is not a valid JSON file"]),
    # messages that did not say what was wrong, or where
    ("unclear", "config-is-a-directory", lambda t: ("--config", t), ["is a directory"]),
    ("unclear", "config-missing", lambda t: ("--config", t / "none.yaml"), ["config file", "none.yaml' does not exist"]),
    ("unclear", "config-unknown-suffix", lambda t: ("--config", _lines(t, "c.txt", "r: 4\n")), ["unknown format '.txt'", "use .yaml, .yml or .json"]),
    ("unclear", "yaml-unknown-option", lambda t: _yaml(t, "epoch: 1\n"), ["unknown option 'epoch'", "Did you mean 'epochs'"]),
    ("unclear", "data-is-a-directory", lambda t: ("--data", t), ["is a directory"]),
    ("unclear", "data-empty-file", lambda t: ("--data", _lines(t, "d.jsonl", "")), ["d.jsonl: the file holds no records"]),
    ("unclear", "data-unknown-fields", lambda t: ("--data", _lines(t, "d.jsonl", '{"foo": "a"}\n' * 5)),
     ["cannot tell the data layout from fields ['foo']", "supported layouts"]),
    ("unclear", "data-csv-unknown-header", lambda t: ("--data", _lines(t, "d.csv", "a,b\n1,2\n")), ["d.csv line 2: cannot tell the data layout"]),
    ("unclear", "data-unknown-suffix", lambda t: ("--data", _lines(t, "d.txt", "hello\n")), ["unknown data format '.txt'"]),
    ("unclear", "data-one-record", lambda t: ("--data", _lines(t, "d.jsonl", '{"text": "hello"}\n')), ["has 1 example(s): too few"]),
    ("unclear", "data-null-instruction", lambda t: ("--data", _lines(t, "d.jsonl", '{"instruction": null, "output": "x"}\n' * 5)),
     ["d.jsonl line 1: missing field 'instruction'"]),
    ("unclear", "data-unknown-role", lambda t: ("--data", _lines(t, "d.jsonl", '{"messages": [{"role": "alien", "content": "x"}, {"role": "assistant", "content": "y"}]}\n' * 5)),
     ["field 'messages[0].role' is 'alien'; allowed: system, user, assistant, tool"]),
    ("unclear", "eval-data-missing", lambda t: ("--eval-data", t / "none.jsonl"), ["none.jsonl' does not exist"]),
    ("unclear", "method-misspelt", lambda t: ("--method", "lorra"), ["unknown method 'lorra'", "Did you mean 'lora'"]),
    ("unclear", "target-misspelt", lambda t: ("--targets", "q_projj"), ["target 'q_projj' matched no module", "Closest existing names: q_proj"]),
    ("unclear", "layer-out-of-range", lambda t: ("--layers", "99"), ["matched no module (with layers=(99,))"]),
    ("unclear", "layers-unreadable", lambda t: ("--layers", "a-b"), ["layers='a-b' is not a layer selection"]),
    ("unclear", "set-unknown-option", lambda t: ("--set", "epoch=1"), ["unknown option 'epoch'", "Did you mean 'epochs'"]),
    ("unclear", "init-unknown", lambda t: ("--init", "bogus"), ["init='bogus' is not valid; allowed: default, gaussian, pissa"]),
    ("unclear", "bias-unknown", lambda t: ("--bias", "bogus"), ["bias='bogus' is not valid; allowed: none, targets"]),
    ("unclear", "quantize-unknown", lambda t: ("--quantize", "nf5"), ["quantization scheme 'nf5' is not valid; allowed: nf4, fp4, int8"]),
    ("unclear", "optim-unknown", lambda t: ("--optim", "bogus"), ["optim='bogus' is not valid; allowed: adamw"]),
    ("unclear", "eval-fraction-above-one", lambda t: ("--eval-fraction", 1.5), ["eval_fraction must be in (0, 1), got 1.5"]),
    ("unclear", "task-unknown", lambda t: ("--task", "bogus"), ["task='bogus' is not valid; allowed: classify, multilabel, regression, tag"]),
    ("unclear", "resume-without-checkpoints", lambda t: ("--resume",), ["--resume: no checkpoint under"]),
    ("unclear", "model-missing", lambda t: ("--model", t / "nowhere"), ["nowhere'", "no such directory"]),
    ("unclear", "model-without-config", lambda t: ("--model", _file(t, "m/weights.bin", b"").parent), ["no config.json in it", "weights.bin"]),
    ("unclear", "model-empty-folder", lambda t: ("--model", (t / "empty").mkdir() or t / "empty"), ["no config.json in it", "it is empty"]),
    ("unclear", "model-is-a-file", lambda t: ("--model", _file(t, "model.bin", b"x")), ["is a file"]),
    ("unclear", "model-unknown-architecture", lambda t: ("--model", _lines(t, "m/config.json", '{"model_type": "nosuch"}').parent),
     ["model type `nosuch` but Transformers does not recognize this architecture"]),
    ("unclear", "model-without-weights", lambda t: ("--model", _lines(t, "m/config.json", '{"model_type": "llama"}').parent),
     ["no file named model.safetensors"]),
    # silently wrong before: a key given twice took the last value, empty answers trained on nothing
    ("wrong", "yaml-key-twice", lambda t: _yaml(t, "r: 4\nr: 8\n"), ["the key 'r' is given twice"]),
    ("wrong", "data-empty-answers", lambda t: ("--data", _lines(t, "d.jsonl", '{"text": ""}\n' * 5)),
     ["task 'd': the answers of all 4 records are empty (first: d.jsonl line", "nothing to learn"]),
    ("wrong", "data-blank-completions", lambda t: ("--data", _lines(t, "d.jsonl", '{"prompt": "a", "completion": " "}\n' * 5)),
     ["the answers of all 4 records are empty"]),
]


@pytest.mark.parametrize("make, fragments", [pytest.param(m, f, id=c, marks=_fault(k)) for k, c, m, f in BAD_TRAIN_INPUT])
def test_bad_train_input_is_one_clear_line(tiny_dir, data_file, tmp_path, make, fragments):
    (tmp_path / "in").mkdir()
    extra = make(tmp_path / "in")
    result = train(tiny_dir, data_file, tmp_path / "out", *extra)
    assert_clear_error(result, *fragments)


@_fault("wrong")
def test_yaml_numbers_as_people_write_them_are_numbers(tiny_dir, data_file, tmp_path):
    result = train(tiny_dir, data_file, tmp_path / "out", *_yaml(tmp_path, "warmup_ratio: 5e-2\nweight_decay: 1E-2\n"))
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "out" / "summary.json").read_text())["settings"]
    assert settings["warmup_ratio"] == 0.05 and settings["weight_decay"] == 0.01


@_fault("unclear")
def test_csv_with_a_byte_order_mark_reads_its_first_field(tiny_dir, tmp_path):
    rows = "instruction,input,output\n" + "".join(f"Upper-case:,{w},{w.upper()}\n" for w in ["cat", "dog", "sun", "map", "box", "pen"])
    data = _file(tmp_path, "bom.csv", b"\xef\xbb\xbf" + rows.encode())
    result = train(tiny_dir, data, tmp_path / "out")
    assert result.exit_code == 0, result.output


@_fault("traceback")
def test_generate_with_a_negative_token_count_is_a_usage_error(tiny_dir):
    result = invoke("generate", "cat", "--model", tiny_dir, "--max-new-tokens", -5)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Usage:" in result.output and "Error" in result.output


def _truncated_weights(tiny_dir, tmp_path):
    model = tmp_path / "truncated"
    shutil.copytree(tiny_dir, model)
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    return model


@_fault("traceback")
def test_truncated_model_weights_are_a_clear_error(tiny_dir, data_file, tmp_path):
    assert_clear_error(train(tiny_dir, data_file, tmp_path / "out", "--model", _truncated_weights(tiny_dir, tmp_path)),
                       "could not load")


@pytest.mark.parametrize("config_text, fragment", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "is not a deltatune delta config"),
    ('{"format": "deltatune", "config": {"method": "lora", "r": "eight"}}', "r must be an integer"),
], ids=["invalid-json", "a-list", "wrong-type"])
@_fault("traceback")
def test_damaged_delta_config_is_a_clear_error(tiny_dir, data_file, tmp_path, finished_run, config_text, fragment):
    run = copy_of(finished_run, tmp_path)
    (run / "delta" / "delta_config.json").write_text(config_text)
    result = invoke("eval", "--model", tiny_dir, "--delta", run / "delta", "--data", data_file, "--max-new-tokens", 2)
    assert_clear_error(result, fragment)


def _two_loras():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    dt.attach(model, dt.LoRAConfig(targets="0"), "a")
    dt.attach(model, dt.LoRAConfig(targets="0"), "b")
    return model


def _linear():
    import torch

    return torch.nn.Sequential(torch.nn.Linear(4, 4))


#: (fault class, API call, fragment of the DeltatuneError's message): raw exceptions before, or
#: (class "wrong") accepted and a NaN delta saved
API_MISTAKES = [
    ("traceback", lambda: dt.LoRAConfig(targets=5), "targets must be a pattern or a list of patterns"),
    ("traceback", lambda: dt.LoRAConfig(targets=[1]), "targets must be a pattern or a list of patterns (strings), got [1]"),
    ("traceback", lambda: dt.LoRAConfig(exclude=5), "exclude must be a pattern or a list of patterns"),
    ("traceback", lambda: dt.LoRAConfig(layers=["a"]), "layers must be block indices"),
    ("traceback", lambda: dt.LoRAConfig(layers=[1.5]), "layers must be block indices (integers), got [1.5]"),
    ("traceback", lambda: dt.LoRAConfig(r=True), "r must be an integer, got True"),
    ("traceback", lambda: dt.LoRAConfig(r=2.5), "r must be an integer, got 2.5"),
    ("traceback", lambda: dt.LoRAConfig(dropout="0.1"), "dropout must be a number"),
    ("traceback", lambda: dt.LoRAConfig(alpha="x"), "alpha must be a number, got 'x'"),
    ("traceback", lambda: dt.LoRAConfig(rslora="yes"), "rslora must be true or false, got 'yes'"),
    ("traceback", lambda: dt.LoRAConfig(rank_pattern="x"), "rank_pattern must map target patterns to numbers"),
    ("traceback", lambda: dt.LoRAConfig(rank_pattern={"re:(": 4}), "bad regular expression in target 're:('"),
    ("traceback", lambda: dt.IA3Config(targets=3), "targets must be a pattern or a list of patterns"),
    ("traceback", lambda: dt.DeltaConfig.from_dict({"method": "lora", "r": "x"}), "r must be an integer, got 'x'"),
    ("traceback", lambda: dt.attach("model", dt.LoRAConfig()), "attach needs the model as a torch.nn.Module, got str"),
    ("traceback", lambda: dt.attach(_linear(), "lora"), "attach needs a delta config (e.g. deltatune.LoRAConfig(), or deltatune.config('lora')"),
    ("traceback", lambda: dt.attach(_linear(), None), "attach needs a delta config"),
    ("traceback", lambda: dt.attach(_linear(), dt.LoRAConfig(), name=3), "delta name must be letters, digits, '_' or '-', got 3"),
    ("traceback", lambda: dt.plan(_linear(), "lora"), "deltatune.config('lora')"),
    ("traceback", lambda: dt.plan("m", dt.LoRAConfig()), "plan needs the model as a torch.nn.Module, got str"),
    ("traceback", lambda: dt.save("m", "/tmp/x"), "save needs the model as a torch.nn.Module, got str"),
    ("traceback", lambda: dt.load("m", "/tmp/x"), "load needs the model as a torch.nn.Module, got str"),
    ("traceback", lambda: dt.quantize("m", "nf4"), "quantize needs the model as a torch.nn.Module, got str"),
    ("traceback", lambda: dt.summary("m"), "summary needs the model as a torch.nn.Module, got str"),
    ("traceback", lambda: dt.count_parameters("m"), "count_parameters needs the model as a torch.nn.Module"),
    ("traceback", lambda: dt.deltas(None), "deltas needs the model as a torch.nn.Module, got NoneType"),
    ("traceback", lambda: dt.merge("m"), "merge needs the model as a torch.nn.Module"),
    ("traceback", lambda: dt.compare("m"), "compare needs the model as a torch.nn.Module"),
    ("traceback", lambda: dt.compare(_linear(), ["lorra"]), "unknown method 'lorra'"),
    ("traceback", lambda: dt.combine(_two_loras(), {"a": "1", "b": 1.0}, "c"), "the weight of 'a' must be a finite number"),
    ("traceback", lambda: dt.subspace_similarity("a", "b"), "subspace analysis needs 2-D tensors"),
    ("traceback", lambda: dt.advise("m"), "examples must be a positive integer"),
    ("unclear", lambda: dt.HoulsbyConfig(reduction_factor=0), "reduction_factor must be a finite number in [1, inf), got 0"),
    ("unclear", lambda: dt.config("nosuch"), "unknown method 'nosuch'; available methods:"),
    ("unclear", lambda: dt.config("lora", nosuch=1), "unknown option 'nosuch' for method 'lora'; valid options:"),
    ("unclear", lambda: dt.merge(_linear(), "nosuch"), "no delta named 'nosuch' on this model; attached deltas: none"),
    ("unclear", lambda: dt.combine(_two_loras(), {"a": 1.0, "zz": 1.0}, "c"), "no delta named 'zz' on this model; attached deltas: a, b"),
    ("wrong", lambda: dt.LoRAConfig(alpha=float("nan")), "alpha must be a finite number"),
    ("wrong", lambda: dt.LoRAConfig(dropout=float("nan")), "dropout must be a finite number, got nan"),
    ("wrong", lambda: dt.LoRAConfig(alpha_pattern={"q_proj": float("nan")}), "alpha_pattern['q_proj'] must be a finite number"),
    ("wrong", lambda: dt.combine(_two_loras(), {"a": float("nan"), "b": 1.0}, "c"), "the weight of 'a' must be a finite number"),
    ("wrong", lambda: dt.combine(_two_loras(), {"a": float("inf"), "b": 1.0}, "c"), "the weight of 'a' must be a finite number"),
]


@pytest.mark.parametrize("call, fragment", [pytest.param(c, f, id=f"api-{i}", marks=_fault(k)) for i, (k, c, f) in enumerate(API_MISTAKES)])
def test_api_mistakes_raise_an_error_naming_the_value(call, fragment):
    with pytest.raises(dt.DeltatuneError) as raised:
        call()
    assert fragment in str(raised.value)


def _other_commands(tiny, data, run, work):
    """(fault class, case, arguments, fragments) for the commands besides train."""
    delta = run / "delta"
    return [
        ("unclear", "eval-missing-delta", ["eval", "--model", tiny, "--delta", work / "nodelta", "--data", data], ["no saved delta at", "the path does not exist"]),
        ("unclear", "eval-delta-without-config", ["eval", "--model", tiny, "--delta", work, "--data", data], ["holds no delta_config.json"]),
        ("unclear", "eval-missing-data", ["eval", "--model", tiny, "--data", work / "none.jsonl"], ["none.jsonl' does not exist"]),
        ("unclear", "generate-missing-model", ["generate", "hi", "--model", work / "none"], ["no such directory"]),
        ("unclear", "generate-missing-delta", ["generate", "hi", "--model", tiny, "--delta", work / "none"], ["no saved delta at"]),
        ("unclear", "chat-missing-model", ["chat", "--model", work / "none"], ["no such directory"]),
        ("unclear", "merge-missing-delta", ["merge", "--model", tiny, "--delta", work / "none", "-o", work / "merged"], ["no saved delta at"]),
        ("unclear", "export-unknown-format", ["export", "--model", tiny, "--delta", delta, "-o", work / "e", "--format", "bogus"],
         ["format='bogus' is not valid; allowed: deltatune, peft"]),
        ("unclear", "export-missing-delta", ["export", "--model", tiny, "--delta", work / "none", "-o", work / "e"], ["no saved delta at"]),
        ("unclear", "inspect-unknown-method", ["inspect", "--model", tiny, "--method", "lorra"], ["unknown method 'lorra'"]),
        ("unclear", "inspect-missing-model", ["inspect", "--model", work / "none"], ["no such directory"]),
        ("unclear", "inspect-missing-config", ["inspect", "--config", work / "none.json"], ["none.json' does not exist"]),
        ("traceback", "inspect-wrongly-typed-option", ["inspect", "--model", tiny, "--set", "r=x"], ["r must be an integer, got 'x'"]),
        ("unclear", "subspace-missing-delta", ["analyze", "subspace", work / "none", delta], ["holds neither delta.safetensors nor adapter_model.safetensors"]),
        ("traceback", "advise-negative-examples", ["advise", "--examples", -5], ["examples must be a positive integer"]),
        ("unclear", "advise-unreadable-memory", ["advise", "--examples", 100, "--memory", "lots"], ["memory 'lots' is not a size"]),
        ("lost", "merge-into-an-earlier-run", ["merge", "--model", tiny, "--delta", delta, "-o", run], ["already holds files", "--overwrite"]),
        ("lost", "export-into-an-earlier-run", ["export", "--model", tiny, "--delta", delta, "-o", run], ["already holds files", "--overwrite"]),
        ("lost", "merge-into-a-file", ["merge", "--model", tiny, "--delta", delta, "-o", data], ["is a file; choose a directory"]),
    ]


_OTHER_COMMAND_CASES = _other_commands(Path("M"), Path("D"), Path("R"), Path("W"))


@pytest.mark.parametrize("index", [pytest.param(i, id=c[1], marks=_fault(c[0])) for i, c in enumerate(_OTHER_COMMAND_CASES)])
def test_other_commands_bad_input_is_one_clear_line(tiny_dir, data_file, tmp_path, finished_run, index):
    _, _, args, fragments = _other_commands(tiny_dir, data_file, copy_of(finished_run, tmp_path), tmp_path)[index]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert_clear_error(invoke(*args), *fragments)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("args", [["generate", "cat", "--max-new-tokens", 0], ["analyze", "subspace", "only-one"]],
                         ids=["generate-zero-tokens", "subspace-one-delta"])
@_fault("traceback")
def test_usage_mistakes_are_usage_errors(tiny_dir, args):
    """A usage error from the argument parser, or (typer 0.16 lets a missing argument through to
    the command) deltatune's own one-line error: exit 2 either way, never a traceback."""
    result = invoke(*args)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and ("Usage:" in result.output or len(errors) == 1), result.output


@pytest.mark.parametrize("command", ["merge", "export"])
@_fault("lost")
def test_overwrite_replaces_the_output_whole(tiny_dir, tmp_path, finished_run, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("an earlier result")
    result = invoke(command, "--model", tiny_dir, "--delta", finished_run / "delta", "-o", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary left beside it
    if command == "merge":
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(out)
    else:
        assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()


@_fault("lost")
def test_a_merge_that_fails_midway_leaves_the_earlier_output(tiny_dir, tmp_path, finished_run, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("kept")
    from transformers import PreTrainedTokenizerBase

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full_disk)
    result = invoke("merge", "--model", tiny_dir, "--delta", finished_run / "delta", "-o", out, "--overwrite")
    assert_clear_error(result, "no space left on the device")
    assert sorted(p.name for p in out.iterdir()) == ["earlier.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
@_fault("traceback")
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tiny_dir, data_file, tmp_path, finished_run, damage):
    run = copy_of(finished_run, tmp_path)
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    state = newest / "trainer_state.pt"
    data = state.read_bytes()
    state.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x80\x02garbage"}[damage])
    result = train(tiny_dir, data_file, run, "--resume", "--save-every", 1, steps=3)
    assert result.exit_code == 0, result.output
    assert f"skipping {newest.name}, which cannot be read" in result.output
    assert "resumed from step 1" in result.output


@pytest.mark.parametrize("first, second", [(["a"], ["a", "b"]), (["a", "b"], ["a"])], ids=["one-then-two", "two-then-one"])
@_fault("wrong")
def test_saving_the_other_layout_over_an_earlier_save_is_refused(tiny_dir, tmp_path, first, second):
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    for name in ("a", "b"):
        dt.attach(model, dt.LoRAConfig(r=2), name)
    dt.save(model, tmp_path / "d", first)
    with pytest.raises(dt.CheckpointError, match="choose another directory, or delete"):
        dt.save(model, tmp_path / "d", second)
    fresh, _ = load_model_and_tokenizer(str(tiny_dir))
    assert sorted(dt.load(fresh, tmp_path / "d")) == first


@_fault("traceback")
def test_saving_into_a_file_is_a_clear_error(tiny_dir, tmp_path):
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    dt.attach(model, dt.LoRAConfig(r=2))
    (tmp_path / "f").write_text("x")
    with pytest.raises(dt.CheckpointError, match="it is a file"):
        dt.save(model, tmp_path / "f")


@_fault("lost")
def test_the_demo_never_replaces_an_earlier_demo_run(tmp_path):
    preferred = tmp_path / "runs" / "demo"
    assert outputs.unused_directory(preferred) == preferred
    (preferred / "delta").mkdir(parents=True)
    (tmp_path / "runs" / "demo-2" / "summary.json").parent.mkdir(parents=True)
    (tmp_path / "runs" / "demo-2" / "summary.json").write_text("{}")
    assert outputs.unused_directory(preferred) == tmp_path / "runs" / "demo-3"


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@_fault("traceback")
def test_subspace_analysis_of_a_damaged_delta_is_a_clear_error(tiny_dir, tmp_path, finished_run, damage):
    run = copy_of(finished_run, tmp_path)
    weights = run / "delta" / "delta.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 64)
    assert_clear_error(invoke("analyze", "subspace", run / "delta", finished_run / "delta", "-o", tmp_path / "o"),
                       "delta.safetensors")


@pytest.mark.parametrize("command", ["subspace", "compare"])
@_fault("traceback")
def test_analysis_output_that_is_a_file_is_a_clear_error(tiny_dir, data_file, tmp_path, finished_run, command):
    target = tmp_path / "report.txt"
    target.write_text("keep")
    if command == "subspace":
        result = invoke("analyze", "subspace", finished_run / "delta", finished_run / "delta", "-o", target)
    else:
        result = invoke("compare", "--model", tiny_dir, "--data", data_file, "--methods", "lora", "--steps", 1, "-o", target)
    assert_clear_error(result, "is a file")
    assert target.read_text() == "keep"


@_fault("unclear")
def test_a_target_regex_that_hangs_pythons_re_matches_at_once(tiny_dir):
    """([a-z_.0-9]+)+X backtracks exponentially in Python's re on a 31-character module path
    (years); deltatune matches target patterns with the regex package, which does not."""
    import signal

    model, _ = load_model_and_tokenizer(str(tiny_dir))
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("matching the pattern hung"))
    signal.alarm(20)
    try:
        dt.attach(model, dt.LoRAConfig(r=2, rank_pattern={"re:([a-z_.0-9]+)+X": 4}))
    finally:
        signal.alarm(0)
    assert all(info.config.r == 2 for info in dt.deltas(model).values())


@_fault("unclear")
def test_a_target_regex_past_its_time_limit_is_a_clear_error(tiny_dir, monkeypatch):
    import deltatune.targets as targets

    def too_slow(*args, **kwargs):
        raise TimeoutError("regex time-out")

    monkeypatch.setattr(targets.regex, "fullmatch", too_slow)
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    with pytest.raises(dt.ConfigError, match="backtracks catastrophically"):
        dt.attach(model, dt.LoRAConfig(r=2, targets=["re:.*q_proj"]))


@_fault("unclear")
def test_a_rank_above_the_layers_full_rank_is_said_before_allocating(tiny_dir, data_file, tmp_path):
    result = train(tiny_dir, data_file, tmp_path / "out", "--r", 5000, steps=1)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "warning: the lora delta would hold" in text and "their full rank (min(in, out)) is at most" in text
    assert text.index("warning: the lora delta") < text.index("trainable params")


@_fault("unclear")
def test_an_ordinary_rank_says_nothing_about_size(tiny_dir, data_file, tmp_path):
    result = train(tiny_dir, data_file, tmp_path / "out", "--r", 4, steps=1)
    assert result.exit_code == 0, result.output
    assert "warning: the lora delta" not in result.output


INTERRUPT_AT_IMPORT = """
import importlib.abc, sys

interrupted_module = sys.argv[1]

class InterruptAt(importlib.abc.MetaPathFinder):
    # Ctrl-C arriving while the named module loads
    def find_spec(self, name, path=None, target=None):
        if name == interrupted_module:
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, InterruptAt())
from deltatune.cli.main import main
sys.argv = ["deltatune", *sys.argv[2:]]
main()
"""


@pytest.mark.parametrize("module", ["torch", "transformers"])
@_fault("traceback")
def test_interrupt_while_the_command_imports_is_one_line(tiny_dir, data_file, tmp_path, module):
    import subprocess
    import sys

    command = [sys.executable, "-c", INTERRUPT_AT_IMPORT, module, "train", "--model", str(tiny_dir), "--data",
               str(data_file), "-o", str(tmp_path / "out"), "--max-steps", "1", "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stderr.strip() == "interrupted before deltatune train finished"
    assert not (tmp_path / "out").exists()


@_fault("wrong")
def test_some_empty_answers_are_named_and_the_run_goes_on(tiny_dir, data_file, tmp_path):
    rows = data_file.read_text() + '{"instruction": "Upper-case:", "input": "zip", "output": ""}\n'
    data = _file(tmp_path, "some-empty.jsonl", rows.encode())
    result = train(tiny_dir, data, tmp_path / "out", "--eval-fraction", 0.2)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "warning: 1 of" in text and "have an empty answer (first: some-empty.jsonl line 13)" in text
