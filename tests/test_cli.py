"""The CLI on a tiny local model and tiny data: every command, resume, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.main import app
from deltatune.models import load_model_and_tokenizer
from tiny_hub import save_tiny_model

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def train_args(tiny_dir, data_file, out, *extra):
    return ("train", "--model", tiny_dir, "--data", data_file, "-o", out, "--batch-size", 4, "--lr", 0.02,
            "--eval-limit", 2, "--max-new-tokens", 4, "--no-progress", "--targets", "all-linear", *extra)


def test_train_end_to_end(tiny_dir, data_file, tmp_path):
    result = invoke(*train_args(tiny_dir, data_file, tmp_path / "run", "--max-steps", 8, "--r", 4))
    assert result.exit_code == 0, result.output
    assert "held-out evaluation" in result.output and "trainable params:" in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["after"]["loss"] < summary["before"]["loss"]
    assert summary["steps"] == 8 and summary["settings"]["method_options"]["r"] == 4
    assert (tmp_path / "run" / "delta" / "delta.safetensors").is_file()


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_train_on_a_quantized_base_with_a_named_optimizer(tiny_dir, data_file, tmp_path, scheme):
    pytest.importorskip("bitsandbytes")
    result = invoke(*train_args(tiny_dir, data_file, tmp_path / "run", "--max-steps", 8, "--r", 4,
                                "--quantize", scheme, "--optim", "paged_adamw_8bit"))
    assert result.exit_code == 0, result.output
    assert "quantized base:" in result.output and "using adamw_8bit" in " ".join(result.output.split())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["settings"]["quantize"] == scheme and summary["optimizer"] == "adamw_8bit"
    assert summary["after"]["loss"] < summary["before"]["loss"]
    assert 0 < summary["training_peak_memory_mib"] <= summary["peak_memory_mib"]
    # the delta applies to the unquantized model too
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    assert dt.load(model, tmp_path / "run" / "delta") == ["default"]


def test_inspect_quantize_shows_the_memory_table(tiny_dir):
    result = invoke("inspect", "--model", tiny_dir, "--quantize", "nf4", "--optim", "adamw_8bit")
    assert result.exit_code == 0, result.output
    assert "nf4+dq" in result.output and "quant. constants" in result.output and "optim. (adamw_8bit)" in result.output


def test_config_file_with_flag_override(tiny_dir, data_file, tmp_path):
    (tmp_path / "c.yaml").write_text(f"model: {tiny_dir}\ndata: {data_file}\nr: 2\nalpha: 4\nmax_steps: 1\n")
    result = invoke("train", "--config", tmp_path / "c.yaml", "--r", 3, "-o", tmp_path / "run", "--no-progress",
                    "--eval-limit", 1, "--max-new-tokens", 2)
    assert result.exit_code == 0, result.output
    options = json.loads((tmp_path / "run" / "summary.json").read_text())["settings"]["method_options"]
    assert options == {"r": 3, "alpha": 4}


# P-tuning and reparameterised prefixes save a folded form; resuming must continue their encoders
RESUMED_METHODS = {
    "lora": (),
    "ptuning": ("--method", "ptuning", "--set", "num_virtual_tokens=2", "--targets", "re:.+"),
    "prefix-mlp": ("--method", "prefix", "--set", "reparameterize=true", "--set", "encoder_embed_dim=8",
                   "--targets", "attn.q"),
}


@pytest.mark.parametrize("method", list(RESUMED_METHODS))
def test_resume_continues_exactly_where_a_run_stopped(tiny_dir, data_file, tmp_path, monkeypatch, method):
    extra = RESUMED_METHODS[method]
    full = invoke(*train_args(tiny_dir, data_file, tmp_path / "full", "--max-steps", 4, *extra))
    assert full.exit_code == 0, full.output

    import deltatune.train.objectives as objectives

    real_loss, calls = objectives.causal_lm_loss, []

    def interrupted_after_two_steps(model, *args, **kwargs):
        calls.extend([1] if model.training else [])  # training steps; not the set-up's packing check
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_loss(model, *args, **kwargs)

    monkeypatch.setattr(objectives, "causal_lm_loss", interrupted_after_two_steps)
    stopped = invoke(*train_args(tiny_dir, data_file, tmp_path / "cut", "--max-steps", 4, *extra))
    assert stopped.exit_code != 0 and "interrupted at step 2" in stopped.output
    assert (tmp_path / "cut" / "checkpoints" / "step-000002").is_dir()
    monkeypatch.setattr(objectives, "causal_lm_loss", real_loss)
    resumed = invoke(*train_args(tiny_dir, data_file, tmp_path / "cut", "--max-steps", 4, "--resume", *extra))
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from step 2" in resumed.output
    a = load_file(tmp_path / "full" / "delta" / "delta.safetensors")
    b = load_file(tmp_path / "cut" / "delta" / "delta.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_generate_eval_merge_inspect(tiny_dir, data_file, tmp_path):
    assert invoke(*train_args(tiny_dir, data_file, tmp_path / "run", "--max-steps", 2)).exit_code == 0
    delta = tmp_path / "run" / "delta"
    out = invoke("generate", "cat", "dog", "--model", tiny_dir, "--delta", delta, "--max-new-tokens", 3)
    assert out.exit_code == 0 and out.output.count("> ") == 2, out.output
    out = invoke("eval", "--model", tiny_dir, "--delta", delta, "--data", data_file, "--max-new-tokens", 3)
    assert out.exit_code == 0 and "exact match" in out.output, out.output
    out = invoke("merge", "--model", tiny_dir, "--delta", delta, "-o", tmp_path / "merged")
    assert out.exit_code == 0, out.output

    import transformers as tf

    ids = torch.tensor([[5, 6, 7, 8]])
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with_delta = tf.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    dt.load(with_delta, delta)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_delta(ids).logits, atol=1e-4, rtol=1e-4)

    out = invoke("inspect", "--config", tiny_dir / "config.json", "--r", 8, "--targets", "all-linear")
    assert out.exit_code == 0, out.output
    assert "plan for lora: 14 modules" in out.output and "trainable params:" in out.output and "optimizer" in out.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--method", "lorra"), "unknown method 'lorra'"),
        (("--r", 0), "r must be a positive integer"),
        (("--targets", "q_prj"), "Closest existing names: q_proj"),
        (("--set", "rank=3"), "unknown option 'rank'"),
        (("--schedule", "cosine_warm"), "schedule='cosine_warm' is not valid"),
        (("--quantize", "nf2"), "quantization scheme 'nf2' is not valid; allowed: nf4, fp4, int8"),
        (("--optim", "adam"), "optim='adam' is not valid; allowed: adamw, adamw_8bit"),
        (("--quantize", "nf4", "--method", "far"), "not supported on a quantized base"),
    ],
)
def test_bad_input_gives_one_clear_line(tiny_dir, data_file, tmp_path, extra, message):
    result = invoke(*train_args(tiny_dir, data_file, tmp_path / "run", "--max-steps", 1, *extra))
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_data_with_missing_field_names_line_and_field(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    result = invoke("train", "--model", tiny_dir, "--data", bad, "-o", tmp_path / "run", "--no-progress")
    assert result.exit_code == 2 and "line 2" in result.output and "'output'" in result.output, result.output


def test_delta_for_another_base_is_refused(tiny_dir, data_file, tmp_path):
    other = save_tiny_model(tmp_path / "wider", hidden=48)
    assert invoke(*train_args(other, data_file, tmp_path / "run", "--max-steps", 1)).exit_code == 0
    result = invoke("eval", "--model", tiny_dir, "--delta", tmp_path / "run" / "delta", "--data", data_file)
    assert result.exit_code == 2 and "does not fit this model" in result.output, result.output


# every method through the same command; the tiny Llama has no biases, so BitFit adds them
METHOD_FLAGS = {
    "houlsby": (), "pfeiffer": (), "parallel": (), "sparse_adapter": (), "ia3": (),
    "bitfit": ("--set", "add_missing=true"), "ln_tuning": (), "top_layers": ("--set", "k=1"),
    "krona": (), "compacter": (), "compacter++": (), "far": (),
    "prefix": ("--set", "num_virtual_tokens=4"), "llama_adapter": ("--set", "adapter_len=2"),
    "mam": ("--set", "num_virtual_tokens=2"), "prompt": ("--set", "num_virtual_tokens=4"),
    "ptuning": ("--set", "num_virtual_tokens=4"), "unipelt": ("--set", "num_virtual_tokens=2"),
    "s4": ("--set", "num_virtual_tokens=2", "--r", 2),
}


@pytest.mark.parametrize("method", list(METHOD_FLAGS))
def test_every_method_trains_saves_and_evaluates_from_the_cli(tiny_dir, data_file, tmp_path, method):
    run = tmp_path / "run"
    out = invoke("train", "--model", tiny_dir, "--data", data_file, "-o", run, "--batch-size", 4, "--max-steps", 2,
                 "--eval-limit", 2, "--max-new-tokens", 2, "--no-progress", "--method", method, *METHOD_FLAGS[method])
    assert out.exit_code == 0, out.output
    saved = json.loads((run / "delta" / "delta_config.json").read_text())
    assert saved["config"]["method"] == method
    result = invoke("eval", "--model", tiny_dir, "--delta", run / "delta", "--data", data_file, "--max-new-tokens", 2)
    assert result.exit_code == 0 and "exact match" in result.output, result.output


def test_inspect_all_compares_methods(tiny_dir):
    out = invoke("inspect", "--config", tiny_dir / "config.json", "--method", "all")
    assert out.exit_code == 0, out.output
    for method in ("lora", *METHOD_FLAGS):
        assert method in out.output
    assert "% of base" in out.output


def test_a_delta_trained_by_deltatune_train_generates_the_same_in_peft(tiny_dir, data_file, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = invoke(*train_args(tiny_dir, data_file, tmp_path / "run", "--max-steps", 6, "--r", 4))
    assert result.exit_code == 0, result.output
    result = invoke("export", "--delta", tmp_path / "run" / "delta", "-o", tmp_path / "peft", "--model", tiny_dir)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "peft" / "adapter_config.json").is_file()

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    prompts = tokenizer(["Upper-case: cat", "Upper-case: fox"], return_tensors="pt", padding=True)
    ours, _ = load_model_and_tokenizer(str(tiny_dir))
    dt.load(ours, tmp_path / "run" / "delta")
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "peft").eval()
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(theirs(**prompts).logits, ours.eval()(**prompts).logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(theirs.generate(**prompts, **settings), ours.generate(**prompts, **settings))


def test_export_refuses_a_method_peft_does_not_have(tiny_dir, tmp_path):
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    dt.attach(model, dt.HoulsbyConfig())
    dt.save(model, tmp_path / "houlsby")
    result = invoke("export", "--delta", tmp_path / "houlsby", "-o", tmp_path / "out", "--model", tiny_dir)
    assert result.exit_code != 0
    assert "'houlsby' has no equivalent in PEFT's format" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()
