"""`deltatune export --format peft --target vllm|sglang`: each rule of what the engine serves
refuses its feature with the reason and the fix, before anything is written; an adapter that
keeps every rule is written and loads in PEFT."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.main import app
from deltatune.errors import CheckpointError
from deltatune.peft_format.lora import LoraConverter
from deltatune.engine_rules import check, save_for, serve_rank
from zoo import tiny_model

peft = pytest.importorskip("peft")


def problems(engine: str, model) -> dict[str, str]:
    converter = LoraConverter()
    exported = converter.write(model, "default")
    return {p.rule: str(p) for p in check(engine, model, converter.peft_type, exported.config, exported.tensors)}


def lora_model(arch: str = "llama", **options):
    model = tiny_model(arch)
    dt.attach(model, dt.config("lora", **{"r": 4, "alpha": 8, **options}))
    return model


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_plain_lora_on_the_blocks_is_served(engine, tmp_path):
    model = lora_model()
    assert problems(engine, model) == {}
    (written,) = save_for(engine, model, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), written)
    assert loaded.peft_config["default"].r == 4


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_dora_is_refused_with_merge_as_the_fix(engine):
    found = problems(engine, lora_model(dora=True))
    assert set(found) == {"no-dora"}
    assert "DoRA's magnitude" in found["no-dora"] and "deltatune merge" in found["no-dora"]


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_modules_to_save_is_refused(engine):
    found = problems(engine, lora_model(modules_to_save=["model.norm"]))
    assert set(found) == {"no-modules-to-save"}
    assert "modules_to_save: model.norm" in found["no-modules-to-save"]


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_bias_is_refused(engine):
    found = problems(engine, lora_model("qwen2", targets=["attn.q"], bias="targets"))  # Qwen2's q has a bias
    assert set(found) == {"no-bias"}
    assert "bias='lora_only'" in found["no-bias"] and "--bias none" in found["no-bias"]


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_per_module_rank_or_alpha_is_refused(engine):
    found = problems(engine, lora_model(rank_pattern={"ffn.down": 2}))
    assert set(found) == {"one-scale"}
    assert "one lora_alpha/r" in found["one-scale"] and "one r and alpha" in found["one-scale"]


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_targets_outside_the_blocks_are_refused(engine):
    found = problems(engine, lora_model(targets=["attn.q", "head"]))
    assert set(found) == {"block-targets"}
    assert "not to lm_head" in found["block-targets"] and "--exclude lm_head" in found["block-targets"]


def test_vllm_refuses_a_rank_above_512_and_names_the_server_rank():
    model = lora_model(targets=["ffn.up"], r=600)  # rank is not bounded by the tiny layer's size for LoRA
    found = problems("vllm", model)
    assert set(found) == {"max-rank"}
    assert "up to 512" in found["max-rank"] and "r=600" in found["max-rank"]
    assert problems("sglang", model) == {}  # SGLang sizes its buffers from the adapters it loads
    assert serve_rank({"r": 12}) == 16 and serve_rank({"r": 8}) == 8


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_methods_other_than_lora_are_refused(engine, tmp_path):
    model = tiny_model("llama")
    dt.attach(model, dt.config("ia3"))
    with pytest.raises(CheckpointError, match=r"serves LoRA adapters only, and this is a PEFT IA3 adapter.*deltatune merge"):
        save_for(engine, model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_cli_names_every_problem_and_writes_nothing(tiny_dir, tmp_path):
    from deltatune.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(tiny_dir))
    dt.attach(model, dt.config("lora", r=4, dora=True, modules_to_save=["model.norm"]))
    dt.save(model, tmp_path / "delta")
    out = tmp_path / "vllm"
    result = CliRunner().invoke(app, ["export", "--model", str(tiny_dir), "--delta", str(tmp_path / "delta"),
                                      "--target", "vllm", "-o", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "vllm would refuse this adapter" in result.output and "DoRA" in result.output and "modules_to_save" in result.output
    assert not out.exists()

    model, _ = load_model_and_tokenizer(str(tiny_dir))
    dt.attach(model, dt.config("lora", r=12, alpha=24))
    dt.save(model, tmp_path / "plain")
    result = CliRunner().invoke(app, ["export", "--model", str(tiny_dir), "--delta", str(tmp_path / "plain"),
                                      "--target", "vllm", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "--max-lora-rank 16" in result.output
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 12
