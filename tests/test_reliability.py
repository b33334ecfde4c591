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


#: (case, extra train arguments made from tmp_path, fragments of the expected one-line error)
BAD_TRAIN_INPUT = [
    ("lr-nan", lambda t: ("--lr", "nan"), ["lr must be a finite number, got nan"]),
    ("lr-inf", lambda t: ("--lr", "inf"), ["lr must be a finite number, got inf"]),
    ("epochs-nan", lambda t: ("--epochs", "nan"), ["epochs must be a finite number"]),
    ("alpha-nan", lambda t: ("--alpha", "nan"), ["alpha must be a finite number"]),
    ("set-unparsable", lambda t: ("--set", "r={"), ["--set 'r={': the value is not valid YAML"]),
    ("set-fraction-rank", lambda t: ("--set", "r=1.5"), ["r must be an integer, got 1.5"]),
    ("yaml-fraction-count", lambda t: _yaml(t, "grad_accum: 1.5\n"), ["grad_accum must be an integer, got 1.5"]),
    ("yaml-bool-count", lambda t: _yaml(t, "grad_accum: true\n"), ["grad_accum must be an integer, got True"]),
    ("yaml-seed-string", lambda t: _yaml(t, "seed: abc\n"), ["seed must be an integer, got 'abc'"]),
    ("yaml-negative-decay", lambda t: _yaml(t, "weight_decay: -0.1\n"), ["weight_decay and max_grad_norm must be >= 0"]),
    ("yaml-targets-int", lambda t: _yaml(t, "targets: 5\n"), ["targets must be a pattern or a list of patterns"]),
    ("yaml-nested-modules-to-save", lambda t: _yaml(t, "modules_to_save: [[lm_head]]\n"), ["modules_to_save must be a pattern"]),
    ("yaml-unparsable", lambda t: _yaml(t, "r: [1,\n"), ["cannot parse", "settings.yaml"]),
    ("config-not-utf8", lambda t: ("--config", _file(t, "c.yaml", b"r: \xff\xfe\n")), ["is not UTF-8 text"]),
    ("config-is-a-directory", lambda t: ("--config", t), ["is a directory"]),
    ("data-not-utf8", lambda t: ("--data", _file(t, "d.jsonl", b'{"text": "\xff"}\n')), ["d.jsonl is not UTF-8 text"]),
    ("data-is-a-directory", lambda t: ("--data", t), ["is a directory"]),
    ("data-name-with-brackets", lambda t: ("--data", t / "[draft] set.jsonl"), ["[draft] set.jsonl", "does not exist"]),
    ("model-missing", lambda t: ("--model", t / "nowhere"), ["nowhere'", "no such directory"]),
    ("model-without-config", lambda t: ("--model", _file(t, "m/weights.bin", b"").parent), ["no config.json in it", "weights.bin"]),
    ("model-empty-folder", lambda t: ("--model", (t / "empty").mkdir() or t / "empty"), ["no config.json in it", "it is empty"]),
    ("model-is-a-file", lambda t: ("--model", _file(t, "model.bin", b"x")), ["is a file"]),
]


@pytest.mark.parametrize("case, make, fragments", BAD_TRAIN_INPUT, ids=[c[0] for c in BAD_TRAIN_INPUT])
def test_bad_train_input_is_one_clear_line(tiny_dir, data_file, tmp_path, case, make, fragments):
    (tmp_path / "in").mkdir()
    extra = make(tmp_path / "in")
    # later flags win: the case's --model/--data replace the working ones
    result = train(tiny_dir, data_file, tmp_path / "out", *extra)
    assert_clear_error(result, *fragments)


def test_yaml_numbers_as_people_write_them_are_numbers(tiny_dir, data_file, tmp_path):
    result = train(tiny_dir, data_file, tmp_path / "out", *_yaml(tmp_path, "warmup_ratio: 5e-2\nweight_decay: 1E-2\n"))
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "out" / "summary.json").read_text())["settings"]
    assert settings["warmup_ratio"] == 0.05 and settings["weight_decay"] == 0.01


def test_csv_with_a_byte_order_mark_reads_its_first_field(tiny_dir, tmp_path):
    rows = "instruction,input,output\n" + "".join(f"Upper-case:,{w},{w.upper()}\n" for w in ["cat", "dog", "sun", "map", "box", "pen"])
    data = _file(tmp_path, "bom.csv", b"\xef\xbb\xbf" + rows.encode())
    result = train(tiny_dir, data, tmp_path / "out")
    assert result.exit_code == 0, result.output


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


def test_truncated_model_weights_are_a_clear_error(tiny_dir, data_file, tmp_path):
    assert_clear_error(train(tiny_dir, data_file, tmp_path / "out", "--model", _truncated_weights(tiny_dir, tmp_path)),
                       "could not load")


@pytest.mark.parametrize("config_text, fragment", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "is not a deltatune delta config"),
    ('{"format": "deltatune", "config": {"method": "lora", "r": "eight"}}', "r must be an integer"),
], ids=["invalid-json", "a-list", "wrong-type"])
def test_damaged_delta_config_is_a_clear_error(tiny_dir, data_file, tmp_path, finished_run, config_text, fragment):
    run = copy_of(finished_run, tmp_path)
    (run / "delta" / "delta_config.json").write_text(config_text)
    result = invoke("eval", "--model", tiny_dir, "--delta", run / "delta", "--data", data_file, "--max-new-tokens", 2)
    assert_clear_error(result, fragment)


API_MISTAKES = [
    (lambda: dt.LoRAConfig(targets=5), "targets must be a pattern or a list of patterns"),
    (lambda: dt.LoRAConfig(layers=["a"]), "layers must be block indices"),
    (lambda: dt.LoRAConfig(alpha=float("nan")), "alpha must be a finite number"),
    (lambda: dt.LoRAConfig(r=True), "r must be an integer, got True"),
    (lambda: dt.LoRAConfig(dropout="0.1"), "dropout must be a number"),
    (lambda: dt.attach("model", dt.LoRAConfig()), "attach needs the model as a torch.nn.Module, got str"),
    (lambda: dt.plan(__import__("torch").nn.Linear(2, 2), "lora"), "deltatune.config('lora')"),
]


@pytest.mark.parametrize("call, fragment", API_MISTAKES, ids=[f"api-{i}" for i in range(len(API_MISTAKES))])
def test_api_mistakes_raise_a_config_error_naming_the_value(call, fragment):
    with pytest.raises(dt.ConfigError) as raised:
        call()
    assert fragment in str(raised.value)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
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
def test_saving_the_other_layout_over_an_earlier_save_is_refused(tiny_dir, tmp_path, first, second):
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    for name in ("a", "b"):
        dt.attach(model, dt.LoRAConfig(r=2), name)
    dt.save(model, tmp_path / "d", first)
    with pytest.raises(dt.CheckpointError, match="choose another directory, or delete"):
        dt.save(model, tmp_path / "d", second)
    fresh, _ = load_model_and_tokenizer(str(tiny_dir))
    assert sorted(dt.load(fresh, tmp_path / "d")) == first


def test_saving_into_a_file_is_a_clear_error(tiny_dir, tmp_path):
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    dt.attach(model, dt.LoRAConfig(r=2))
    (tmp_path / "f").write_text("x")
    with pytest.raises(dt.CheckpointError, match="it is a file"):
        dt.save(model, tmp_path / "f")


def test_the_demo_never_replaces_an_earlier_demo_run(tmp_path):
    preferred = tmp_path / "runs" / "demo"
    assert outputs.unused_directory(preferred) == preferred
    (preferred / "delta").mkdir(parents=True)
    (tmp_path / "runs" / "demo-2" / "summary.json").parent.mkdir(parents=True)
    (tmp_path / "runs" / "demo-2" / "summary.json").write_text("{}")
    assert outputs.unused_directory(preferred) == tmp_path / "runs" / "demo-3"


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_subspace_analysis_of_a_damaged_delta_is_a_clear_error(tiny_dir, tmp_path, finished_run, damage):
    run = copy_of(finished_run, tmp_path)
    weights = run / "delta" / "delta.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 64)
    assert_clear_error(invoke("analyze", "subspace", run / "delta", finished_run / "delta", "-o", tmp_path / "o"),
                       "delta.safetensors")


@pytest.mark.parametrize("command", ["subspace", "compare"])
def test_analysis_output_that_is_a_file_is_a_clear_error(tiny_dir, data_file, tmp_path, finished_run, command):
    target = tmp_path / "report.txt"
    target.write_text("keep")
    if command == "subspace":
        result = invoke("analyze", "subspace", finished_run / "delta", finished_run / "delta", "-o", target)
    else:
        result = invoke("compare", "--model", tiny_dir, "--data", data_file, "--methods", "lora", "--steps", 1, "-o", target)
    assert_clear_error(result, "is a file")
    assert target.read_text() == "keep"


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


def test_a_target_regex_past_its_time_limit_is_a_clear_error(tiny_dir, monkeypatch):
    import deltatune.targets as targets

    def too_slow(*args, **kwargs):
        raise TimeoutError("regex time-out")

    monkeypatch.setattr(targets.regex, "fullmatch", too_slow)
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    with pytest.raises(dt.ConfigError, match="backtracks catastrophically"):
        dt.attach(model, dt.LoRAConfig(r=2, targets=["re:.*q_proj"]))
