"""GGUF export: what deltatune writes reads back through transformers' GGUF loader with the
merged model's logits, the LoRA adapter file holds B·A as llama.cpp applies it, and the CLI
writes the files and an Ollama Modelfile."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import transformers as tf
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.main import app
from deltatune.errors import CheckpointError
from deltatune.models import load_model_and_tokenizer
from deltatune.gguf_format import OLLAMA_CHATML, chatml, export, modelfile, ollama_template, write_adapter, write_model
from tiny_hub import BPE_MODEL_VOCAB as VOCAB, CHAT_TEMPLATE as CHATML, tiny_bpe_tokenizer, tiny_lm, trained_lora
from zoo import tiny_inputs

gguf = pytest.importorskip("gguf")

#: largest logit difference to the merged model per tensor type, relative to the largest logit
TOLERANCE = {"f32": 1e-6, "f16": 2e-3, "bf16": 2e-2, "q8_0": 5e-2}
TEXT = "The date 2024-03-05, hello world!"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_bpe_tokenizer()


def read_back(directory, file_name):
    return tf.AutoModelForCausalLM.from_pretrained(directory, gguf_file=file_name, dtype=torch.float32,
                                                   attn_implementation="eager").eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_merged_gguf_reads_back_with_the_merged_models_logits(arch, tokenizer, tmp_path):
    model = trained_lora(tiny_lm(arch))
    inputs = tiny_inputs(arch, model)
    with torch.no_grad():
        expected = model(**inputs).logits
    export(model, tokenizer, tmp_path, tensor_type="f32")  # merges
    assert not dt.deltas(model)
    for tensor_type, tolerance in TOLERANCE.items():
        path = write_model(model, tmp_path / f"{tensor_type}.gguf", tokenizer, tensor_type=tensor_type)
        with torch.no_grad():
            got = read_back(tmp_path, path.name)(**inputs).logits
        assert (got - expected).abs().max() <= tolerance * expected.abs().max(), tensor_type
    # the export's own file, its tokenizer and chat template
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    assert reader.fields["tokenizer.chat_template"].contents() == CHATML
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == VOCAB
    assert read_back(tmp_path, "model.gguf").config.vocab_size == VOCAB
    read_tokenizer = tf.AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert read_tokenizer(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]


def test_q8_0_stores_quantized_blocks(tokenizer, tmp_path):
    write_model(tiny_lm("llama"), tmp_path / "q.gguf", tokenizer, tensor_type="q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"  # norms stay f32, as llama.cpp wants them


def _dequantized(reader, name):
    tensor = next(t for t in reader.tensors if t.name == name)
    return torch.from_numpy(np.array(gguf.dequantize(tensor.data, tensor.tensor_type))).reshape(
        tuple(reversed(tensor.shape.tolist())))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_holds_the_update_llama_cpp_adds(arch, tokenizer, tmp_path):
    """W + (alpha / r)·B A, computed from the two files as llama.cpp computes it, is the merged
    weight in the merged file, for every adapted weight: rows permuted (Llama's q and k),
    Conv1D transposed (GPT-2), per-module ranks folded into B."""
    model = trained_lora(tiny_lm(arch), rank_pattern={"ffn.down": 2}, alpha_pattern={"attn.q": 4} if arch == "llama" else {})
    adapted = list(dt.deltas(model)["default"].paths)
    write_adapter(model, tmp_path / "adapter.gguf", "default")
    dt.merge_and_detach(model)
    write_model(model, tmp_path / "merged.gguf", tokenizer, tensor_type="f32")
    model = tiny_lm(arch)
    write_model(model, tmp_path / "base.gguf", tokenizer, tensor_type="f32")
    adapter, base, merged = (gguf.GGUFReader(tmp_path / f) for f in ("adapter.gguf", "base.gguf", "merged.gguf"))
    assert adapter.fields["general.type"].contents() == "adapter"
    assert adapter.fields["adapter.type"].contents() == "lora"
    assert adapter.fields["general.architecture"].contents() == base.fields["general.architecture"].contents()
    alpha = adapter.fields["adapter.lora.alpha"].contents()
    pairs = sorted(t.name.removesuffix(".lora_a") for t in adapter.tensors if t.name.endswith(".lora_a"))
    assert len(pairs) == len(adapted)
    for weight in pairs:
        a, b = _dequantized(adapter, f"{weight}.lora_a"), _dequantized(adapter, f"{weight}.lora_b")
        rebuilt = _dequantized(base, weight) + (alpha / a.shape[0]) * (b @ a)
        torch.testing.assert_close(rebuilt, _dequantized(merged, weight), rtol=0, atol=1e-5, msg=weight)


def test_adapter_refuses_what_llama_cpp_cannot_add(tmp_path):
    model = trained_lora(tiny_lm("llama"), dora=True)
    with pytest.raises(CheckpointError, match="cannot be a llama.cpp LoRA adapter.*merged model"):
        write_adapter(model, tmp_path / "a.gguf", "default")
    assert not (tmp_path / "a.gguf").exists()


def test_unsupported_architecture_and_tokenizer_are_named(tokenizer, tmp_path):
    from zoo import tiny_model

    with pytest.raises(CheckpointError, match="deltatune writes GGUF for bloom, .*, qwen2, not 'opt'.*convert_hf_to_gguf"):
        write_model(tiny_model("opt"), tmp_path / "m.gguf")
    from tiny_hub import tiny_tokenizer

    word_level = tiny_tokenizer()
    model = tiny_lm("llama")
    with pytest.raises(CheckpointError, match="'WordLevel'.*byte-level BPE"):
        write_model(model, tmp_path / "m.gguf", word_level)


def test_ollama_modelfile_turns_chatml_into_a_go_template(tokenizer):
    template, system = ollama_template(tokenizer)
    assert template == OLLAMA_CHATML and system is None
    from deltatune.models import SMOLLM2_CHAT_TEMPLATE

    smollm = tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    smollm.chat_template = SMOLLM2_CHAT_TEMPLATE  # ChatML with a default system turn
    text = modelfile("base.gguf", smollm, "adapter.gguf")
    assert text.splitlines()[:2] == ["FROM ./base.gguf", "ADAPTER ./adapter.gguf"]
    assert f'TEMPLATE """{OLLAMA_CHATML}"""' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    other = tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    other.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    assert "TEMPLATE" not in modelfile("model.gguf", other).replace("# TEMPLATE", "")


def test_cli_export_gguf_writes_model_and_modelfile(tmp_path, tiny_dir):
    # the CLI's tiny model has a character-level (WordLevel) tokenizer, which llama.cpp has no
    # kind for: the export says so instead of writing a file llama.cpp cannot load
    runner = CliRunner()
    delta = tmp_path / "delta"
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    dt.attach(model, dt.config("lora", r=2))
    dt.save(model, delta)
    result = runner.invoke(app, ["export", "--model", str(tiny_dir), "--delta", str(delta), "--format", "gguf",
                                 "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "WordLevel" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    result = runner.invoke(app, ["export", "--model", str(tiny_dir), "--delta", str(delta), "--format", "gguf",
                                 "--gguf-type", "q4", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "q8_0" in result.output


def test_cli_export_gguf_with_a_bpe_model(tmp_path, tokenizer):
    source = tmp_path / "model"
    tiny_lm("qwen2").save_pretrained(source)
    tokenizer.save_pretrained(source)
    model, _ = load_model_and_tokenizer(str(source))
    trained_lora(model)
    dt.save(model, tmp_path / "delta")
    for extra, files in (([], {"model.gguf", "Modelfile"}), (["--adapter", "--gguf-type", "q8_0"], {"base.gguf", "adapter.gguf", "Modelfile"})):
        out = tmp_path / ("out" + "".join(extra))
        result = CliRunner().invoke(app, ["export", "--model", str(source), "--delta", str(tmp_path / "delta"),
                                          "--format", "gguf", "-o", str(out), *extra])
        assert result.exit_code == 0, result.output
        assert {p.name for p in out.iterdir()} == files
        assert (out / "Modelfile").read_text().startswith(f"FROM ./{'base' if extra else 'model'}.gguf\n")


GO_RENDER = """package main

import (
	"os"
	"text/template"
)

type Message struct{ Role, Content string }

func main() {
	text, _ := os.ReadFile(os.Args[1])
	messages := []Message{}
	for i := 3; i+1 < len(os.Args); i += 2 {
		messages = append(messages, Message{os.Args[i], os.Args[i+1]})
	}
	data := map[string]interface{}{"System": os.Args[2], "Messages": messages}
	if err := template.Must(template.New("m").Parse(string(text))).Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="Go's text/template (Ollama's template engine) needs a Go toolchain")
def test_ollama_template_renders_chatml_under_go_text_template(tmp_path):
    """The Modelfile's TEMPLATE, executed by Go's text/template with the variables Ollama passes
    (.System and .Messages with .Role, .Content), renders what the Jinja ChatML template renders."""
    (tmp_path / "template.txt").write_text(OLLAMA_CHATML)
    (tmp_path / "render.go").write_text(GO_RENDER)
    turns = [("user", "USER-TEXT"), ("assistant", "ASSISTANT-TEXT"), ("user", "SECOND-USER-TEXT")]
    for system in ("SYSTEM-TEXT", ""):
        messages = ([("system", system)] if system else []) + turns
        rendered = subprocess.run(
            ["go", "run", "render.go", "template.txt", system, *[part for turn in messages for part in turn]],
            cwd=tmp_path, capture_output=True, text=True, check=True, env={**os.environ, "GO111MODULE": "off"},
        ).stdout
        assert rendered == chatml([{"role": r, "content": c} for r, c in messages])
