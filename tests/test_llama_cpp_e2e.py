"""What deltatune writes as GGUF, run by llama.cpp itself.

Every architecture deltatune writes: a tiny random model's logits under llama.cpp equal
transformers', for the model file and with a LoRA adapter applied at run time (seconds).

The bundled model trained on the demo task (slow): llama.cpp (through llama-cpp-python, the `deploy` extra) decodes greedily the first 20
held-out prompts, with the merged model and with the base model plus the LoRA adapter, and
must give the answers the trained model gives in deltatune on at least 19 of them. The
prompts are tokenized by llama.cpp from the GGUF's own vocabulary, and that tokenization is
checked against the one training used.

llama-cpp-python builds llama.cpp from source (about 5.5 minutes on 2 cores), so it is not in
the `test` extra and this test skips where it is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.main import app
from deltatune.gguf_format import LAYOUTS, write_adapter, write_model
from tiny_hub import tiny_bpe_tokenizer, tiny_lm, trained_lora

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (pip install 'deltatune[deploy]') runs the GGUF")

PROMPTS = 20
#: llama.cpp against transformers, relative to the largest logit: its kernels round differently
#: (f16 key/value cache), and the adapter's product adds its own rounding
LOGIT_TOLERANCE = {"model": 1e-3, "adapter": 5e-3}


@pytest.mark.parametrize("arch", sorted(LAYOUTS))
def test_llama_cpp_computes_the_models_logits(arch, tmp_path):
    model = trained_lora(tiny_lm(arch), rank_pattern={"ffn.down": 2})
    tokenizer = tiny_bpe_tokenizer()
    ids = tokenizer("The date 2024-03-05 is the fifth of March.")["input_ids"]
    write_adapter(model, tmp_path / "adapter.gguf", "default")
    with torch.no_grad():
        adapted = model(torch.tensor([ids])).logits[0].numpy()
        with dt.disabled(model):
            base = model(torch.tensor([ids])).logits[0].numpy()
    dt.detach(model)
    write_model(model, tmp_path / "base.gguf", tokenizer, tensor_type="f32")
    for kind, lora, expected in (("model", None, base), ("adapter", tmp_path / "adapter.gguf", adapted)):
        llm = llama_cpp.Llama(str(tmp_path / "base.gguf"), lora_path=str(lora) if lora else None, n_ctx=64,
                              n_threads=1, logits_all=True, verbose=False)
        assert llm.tokenize(b"The date 2024-03-05 is the fifth of March.", add_bos=False) == ids
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
        assert np.abs(got - expected).max() <= LOGIT_TOLERANCE[kind] * np.abs(expected).max(), kind
MAX_NEW_TOKENS = 24


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo run (no arguments but the output directory) and the trained model's answers."""
    from deltatune.io import load
    from deltatune.models import load_model_and_tokenizer
    from deltatune.train.data import build_prompt, demo_data_path, load_examples
    from deltatune.train.evaluate import generate_completions

    run = tmp_path_factory.mktemp("llama-cpp") / "run"
    _invoke("train", "-o", str(run), "--no-progress")
    model, tokenizer = load_model_and_tokenizer()
    load(model, run / "delta")
    examples = load_examples(demo_data_path("test"))[:PROMPTS]
    prompts = [build_prompt(tokenizer, e) for e in examples]
    answers = generate_completions(model.eval(), tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS)
    return run, tokenizer, prompts, answers, [e.completion for e in examples]


def _llama_cpp_answers(model_file: Path, prompts: list[str], tokenizer, lora: Path | None = None) -> list[str]:
    llm = llama_cpp.Llama(str(model_file), lora_path=str(lora) if lora else None, n_ctx=512, n_threads=2,
                          seed=0, verbose=False)
    end_of_turn = {llm.token_eos(), *llm.tokenize(b"<|im_end|>", add_bos=False, special=True)}
    answers = []
    for prompt in prompts:
        tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        assert tokens == tokenizer(prompt, add_special_tokens=False)["input_ids"], "llama.cpp tokenizes the prompt as training did"
        llm.reset()
        generated = []
        for token in llm.generate(tokens, top_k=1, temp=0.0, reset=True):
            if token in end_of_turn or len(generated) == MAX_NEW_TOKENS:
                break
            generated.append(token)
        answers.append(llm.detokenize(generated).decode("utf-8", errors="replace").strip())
    return answers


def _report(kind: str, got: list[str], trained_answers: list[str], references: list[str]) -> int:
    same = sum(g == t for g, t in zip(got, trained_answers))
    correct = sum(g == r for g, r in zip(got, references))
    print(f"\n{kind}: llama.cpp gives the trained answer on {same}/{len(got)} held-out prompts "
          f"({correct}/{len(got)} equal the reference)")
    for g, t in zip(got, trained_answers):
        print(f"  {'ok ' if g == t else 'DIFF'} llama.cpp {g!r:16} deltatune {t!r}")
    return same


@pytest.mark.slow
def test_merged_gguf_gives_the_trained_answers(trained, tmp_path):
    run, tokenizer, prompts, answers, references = trained
    out = tmp_path / "gguf"
    print(_invoke("export", "--delta", str(run / "delta"), "--format", "gguf", "-o", str(out)))
    got = _llama_cpp_answers(out / "model.gguf", prompts, tokenizer)
    assert _report("merged model.gguf (f16)", got, answers, references) >= PROMPTS - 1


@pytest.mark.slow
def test_base_gguf_with_lora_adapter_gives_the_trained_answers(trained, tmp_path):
    run, tokenizer, prompts, answers, references = trained
    out = tmp_path / "gguf-adapter"
    print(_invoke("export", "--delta", str(run / "delta"), "--format", "gguf", "--adapter", "-o", str(out)))
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./base.gguf" in modelfile and "ADAPTER ./adapter.gguf" in modelfile
    got = _llama_cpp_answers(out / "base.gguf", prompts, tokenizer, lora=out / "adapter.gguf")
    assert _report("base.gguf + adapter.gguf (llama.cpp --lora)", got, answers, references) >= PROMPTS - 1
