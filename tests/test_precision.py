"""The precision policy: auto is bf16 exactly where the device multiplies bf16 natively (both
CPU paths simulated), the base is stored in bf16 while deltas and optimizer state stay fp32,
and the invariants hold in bf16 with bf16's tolerance."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import deltatune as dt
import deltatune.precision as precision
from deltatune.cli.main import app
from deltatune.layer import delta_layers
from test_invariants import METHODS, logits, perturb
from zoo import tiny_inputs, tiny_model

#: the module's own detection, taken at import: the suite's conftest replaces it for every test
REAL_NATIVE_BF16 = precision.native_bf16
X86_FLAGS = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n\nprocessor\t: 1\nflags\t\t: fpu\n"
ARM_FEATURES = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


def test_cpu_features_are_read_from_cpuinfo():
    assert "avx512_bf16" in precision.parse_cpuinfo(X86_FLAGS)
    assert precision.parse_cpuinfo(ARM_FEATURES) == {"fp", "asimd", "bf16", "i8mm"}
    assert precision.parse_cpuinfo("processor\t: 0\n") == frozenset()


@pytest.mark.parametrize("features, native", [
    ({"avx2", "avx512f"}, False),        # AVX512 without its bf16 extension: emulated, slower than fp32
    ({"avx512f", "avx512_bf16"}, True),
    ({"amx_tile", "amx_bf16"}, True),
    (set(), False),
])
def test_auto_is_bf16_exactly_where_the_cpu_has_native_bf16(monkeypatch, features, native):
    monkeypatch.setattr(precision, "cpu_features", lambda: frozenset(features))
    monkeypatch.setattr(precision, "native_bf16", REAL_NATIVE_BF16)
    assert precision.native_bf16("cpu") is native
    assert precision.resolve("auto", "cpu") == ("bf16" if native else "fp32")
    assert precision.resolve("fp32", "cpu") == "fp32" and precision.resolve("bf16", "cpu") == "bf16"


def test_fp16_is_refused_off_cuda_and_unknown_values_are_named():
    with pytest.raises(dt.ConfigError, match="precision='fp16' trains only on a CUDA device"):
        precision.resolve("fp16", "cpu")
    with pytest.raises(dt.ConfigError, match="precision='fp8' is not valid; allowed: auto, fp32, bf16, fp16"):
        precision.resolve("fp8", "cpu")


def _train(tiny_dir, data_file, out, *extra):
    return CliRunner().invoke(app, [str(a) for a in ["train", "--model", tiny_dir, "--data", data_file, "-o", out,
                                                      "--batch-size", 4, "--lr", 0.02, "--eval-limit", 2,
                                                      "--max-new-tokens", 2, "--no-progress", "--max-steps", 3, *extra]],
                              catch_exceptions=False)


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16-cpu", "cpu-without-bf16"])
def test_a_default_run_computes_in_bf16_only_on_native_hardware(tiny_dir, data_file, tmp_path, monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    result = _train(tiny_dir, data_file, tmp_path / "run")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["settings"]["precision"] == "auto"
    assert summary["precision"] == ("bf16" if native else "fp32")
    said = "precision bf16: the base in bf16, the deltas and optimizer state in fp32" in " ".join(result.output.split())
    assert said is native


def test_a_bf16_run_keeps_fp32_deltas_and_learns(tiny_dir, data_file, tmp_path):
    result = _train(tiny_dir, data_file, tmp_path / "run", "--precision", "bf16", "--max-steps", 6)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["precision"] == "bf16"
    assert summary["train_losses"][-1] < summary["train_losses"][0]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "delta" / "delta.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}


#: bf16 keeps 8 significant bits: logits of these tiny models agree to ~2^-7 of their size
BF16_TOL = dict(atol=5e-2, rtol=2e-2)
BF16_METHODS = ["lora", "dora", "ia3", "houlsby", "pfeiffer", "bitfit", "prefix", "prompt", "krona", "compacter"]


def _bf16_attached(method):
    model = tiny_model("llama").to(torch.bfloat16)
    inputs = tiny_inputs("llama", model)
    base = logits(model, inputs)
    dt.attach(model, METHODS[method]())
    return model, inputs, base


@pytest.mark.parametrize("method", BF16_METHODS)
def test_invariants_hold_on_a_bf16_base(method, tmp_path):
    model, inputs, base = _bf16_attached(method)
    trained = [p for layer in delta_layers(model).values() for p in layer.deltas["default"].parameters()]
    assert trained and all(p.dtype == torch.float32 for p in trained)  # the deltas stay fp32
    if METHODS[method]().__class__.__name__ not in ("PrefixTuningConfig", "PromptTuningConfig"):
        torch.testing.assert_close(logits(model, inputs), base, **BF16_TOL)  # identity at init
    perturb(model, "default")
    expected = logits(model, inputs)
    with dt.disabled(model):
        torch.testing.assert_close(logits(model, inputs), base, atol=0, rtol=0)
    dt.save(model, tmp_path / "delta")
    fresh = tiny_model("llama").to(torch.bfloat16)
    dt.load(fresh, tmp_path / "delta")
    torch.testing.assert_close(logits(fresh, inputs), expected, atol=0, rtol=0)
    blocked = any(d.merge_blocker(layer.backend) for layer in delta_layers(model).values() for d in layer.deltas.values())
    if METHODS[method]().supports_merge and not blocked:
        dt.merge(model)
        torch.testing.assert_close(logits(model, inputs), expected, **BF16_TOL)
        dt.unmerge(model)
        torch.testing.assert_close(logits(model, inputs), expected, **BF16_TOL)


# the attention implementation: the one measured fastest, without changing what the run computes

import deltatune.train.attention_choice as attention_choice  # noqa: E402


@pytest.fixture
def timed_candidates(monkeypatch):
    monkeypatch.setattr(attention_choice, "CANDIDATES", ("sdpa", "eager"))


def test_auto_keeps_the_faster_implementation_and_leaves_no_trace(timed_candidates, monkeypatch):
    model = tiny_model("llama")
    dt.attach(model, METHODS["lora"]())
    inputs = tiny_inputs("llama", model)
    batch = {**inputs, "labels": inputs["input_ids"]}
    monkeypatch.setattr(attention_choice, "_seconds_per_step",
                        lambda m, name, b, f, r: {"sdpa": 2.0, "eager": 1.0}[name])
    assert attention_choice.choose_attention(model, "auto", batch, lambda m, b: m(**b).loss)[0] == "eager"
    monkeypatch.undo()
    monkeypatch.setattr(attention_choice, "CANDIDATES", ("sdpa", "eager"))
    rng = torch.get_rng_state()
    chosen, timings = attention_choice.choose_attention(model, "auto", batch, lambda m, b: m(**b).loss)
    assert chosen in ("sdpa", "eager") and set(timings) == {"sdpa", "eager"} and all(t > 0 for t in timings.values())
    assert torch.equal(torch.get_rng_state(), rng)  # the timing steps drew no random numbers
    assert all(p.grad is None for p in dt.trainable_parameters(model))


def test_explicit_choices_and_deltas_that_read_attention_themselves(timed_candidates):
    model = tiny_model("llama")
    batch = {**tiny_inputs("llama", model), "labels": tiny_inputs("llama", model)["input_ids"]}
    loss = lambda m, b: m(**b).loss  # noqa: E731
    assert attention_choice.choose_attention(model, "eager", batch, loss) == ("eager", {})
    assert attention_choice.choose_attention(model, "model", batch, loss) == ("model", {})
    dt.attach(model, METHODS["prefix"]())
    assert attention_choice.choose_attention(model, "auto", batch, loss) == ("model", {})
    with pytest.raises(dt.ConfigError, match="attention='flash' is not valid; allowed: auto, model, eager, sdpa"):
        attention_choice.choose_attention(model, "flash", batch, loss)


def test_a_run_records_its_attention_and_a_resume_keeps_it(tiny_dir, data_file, tmp_path, timed_candidates, monkeypatch):
    monkeypatch.setattr(attention_choice, "_seconds_per_step", lambda m, name, b, f, r: {"sdpa": 2.0, "eager": 1.0}[name])
    first = _train(tiny_dir, data_file, tmp_path / "run", "--save-every", 1, "--max-steps", 2)
    assert first.exit_code == 0, first.output
    assert "attention: eager (a step of the longest batch: sdpa 2.00 s, eager 1.00 s)" in " ".join(first.output.split())
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["attention"] == "eager"
    # a later measurement would choose the other: the resumed run still computes as the first did
    monkeypatch.setattr(attention_choice, "_seconds_per_step", lambda m, name, b, f, r: {"sdpa": 1.0, "eager": 2.0}[name])
    resumed = _train(tiny_dir, data_file, tmp_path / "run", "--save-every", 1, "--max-steps", 3, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["attention"] == "eager"
