"""GGUF files for llama.cpp and Ollama: the merged model, and LoRA adapters applied at run time.

A GGUF model file holds the architecture's hyperparameters under ``<arch>.*`` keys, the
tokenizer under ``tokenizer.*`` (vocabulary, BPE merges, special ids, chat template) and every
weight under llama.cpp's name for it (``blk.0.attn_q.weight``), found with the ``gguf`` package's
tensor-name table (``gguf.get_tensor_name_map``), never by editing strings. Three layouts differ
from transformers' and are converted here, as llama.cpp's converter does:

* Llama-style rotary attention: llama.cpp rotates interleaved pairs, transformers rotates the two
  halves of each head, so the rows of the query and key projections are permuted per head;
* GPT-2's ``Conv1D`` stores its weight as (in, out): transposed to (out, in);
* fused query/key/value projections (GPT-NeoX, BLOOM, Falcon) interleave heads or groups: their
  rows are regrouped into all queries, then keys, then values;
* Gemma's norms scale by ``1 + w`` in transformers and by ``w`` in llama.cpp: written as ``1 + w``;
* tied output embeddings are written once (llama.cpp reuses ``token_embd`` for the output).

A LoRA adapter file (``general.type = "adapter"``, ``adapter.type = "lora"``) holds, for each
adapted weight ``W`` of the model file, ``W.lora_a`` (r, in) and ``W.lora_b`` (out, r): llama.cpp
computes ``W x + (alpha / r) · B A x`` with one ``adapter.lora.alpha`` for the file. Any delta
whose forward is exactly ``W0 x + s·B A x`` on every layer (the ``Delta.low_rank_factors`` hook)
can be written; a module whose ``s·r`` differs from the file's alpha carries the ratio in its B.
The rows of B are permuted like the weight they adapt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from jinja2 import TemplateError
from torch import Tensor, nn

from .anatomy import check_model
from .api import deltas, detach, merge_and_detach
from .backends import backend_for
from .errors import CheckpointError
from .layer import delta_layers

#: tensor types deltatune writes: name -> (GGML type name, llama.cpp file type name)
TENSOR_TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}

MODEL_FILE = "model.gguf"
BASE_FILE = "base.gguf"
ADAPTER_FILE = "adapter.gguf"
MODELFILE = "Modelfile"


def _gguf():
    try:
        import gguf
    except ImportError as exc:  # a core dependency, but say what to do if it was removed
        raise CheckpointError("writing GGUF needs the 'gguf' package: pip install gguf") from exc
    return gguf


# architectures ------------------------------------------------------------------------------------


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default")
    if kind != "default":
        raise CheckpointError(
            f"this model scales its rotary embedding ({kind!r}); deltatune writes GGUF only for plain rotary "
            "embeddings. Convert the merged model (deltatune merge) with llama.cpp's convert_hf_to_gguf.py instead"
        )
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _check_activation(config, field: str, allowed: tuple[str, ...]) -> None:
    value = getattr(config, field)
    if value not in allowed:
        raise CheckpointError(
            f"{field}={value!r}: llama.cpp computes this architecture with {' or '.join(allowed)}; "
            "the GGUF would not compute this model"
        )


def _llama_hyperparameters(writer, config, activations: tuple[str, ...] = ("silu",)) -> None:
    _check_activation(config, "hidden_act", activations)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings and getattr(config, "use_sliding_window", True):
        raise CheckpointError(
            f"sliding_window={window} is shorter than the context ({config.max_position_embeddings}); llama.cpp's "
            "llama architecture attends to the whole context, so the GGUF would compute another model"
        )
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _gpt2_hyperparameters(writer, config) -> None:
    _check_activation(config, "activation_function", ("gelu_new", "gelu_pytorch_tanh"))
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)


def _interleave_rotary_rows(weight: Tensor, heads: int) -> Tensor:
    """Rows of a query/key projection (or of a LoRA B for one) from transformers' rotary layout
    (each head's first half, then its second half) to llama.cpp's (pairs interleaved)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _llama_rows(gguf_name: str, weight: Tensor, config) -> Tensor:
    if gguf_name.endswith("attn_q.weight"):
        return _interleave_rotary_rows(weight, config.num_attention_heads)
    if gguf_name.endswith("attn_k.weight"):
        return _interleave_rotary_rows(weight, config.num_key_value_heads)
    return weight


def _gemma_hyperparameters(writer, config) -> None:
    _llama_hyperparameters(writer, config, ("gelu_pytorch_tanh", "gelu_new"))


def _phi_hyperparameters(writer, config) -> None:
    _check_activation(config, "hidden_act", ("gelu_new", "gelu_pytorch_tanh"))
    rope = getattr(config, "rope_parameters", None) or {}
    head_dim = config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(int(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) * head_dim))


def _gpt_neox_hyperparameters(writer, config) -> None:
    _check_activation(config, "hidden_act", ("gelu", "gelu_new", "gelu_pytorch_tanh"))
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * config.hidden_size // config.num_attention_heads))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_head_count(config.num_attention_heads)
    writer.add_parallel_residual(config.use_parallel_residual)
    writer.add_layer_norm_eps(config.layer_norm_eps)


def _bloom_hyperparameters(writer, config) -> None:
    if config.apply_residual_connection_post_layernorm:
        raise CheckpointError("apply_residual_connection_post_layernorm=True: llama.cpp's BLOOM adds the residual before the norm")
    writer.add_context_length(2048)  # ALiBi has no trained length to record; BLOOM trained on 2048
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(4 * config.hidden_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)


def _falcon_kv_heads(config) -> int:
    if config.new_decoder_architecture:
        return config.num_kv_heads
    if config.multi_query:
        return 1
    raise CheckpointError("Falcon without multi-query or grouped attention (Falcon-RW) is not written to GGUF by deltatune")


def _falcon_hyperparameters(writer, config) -> None:
    _check_activation(config, "activation", ("gelu",))
    if config.alibi:
        raise CheckpointError("alibi=True: llama.cpp's Falcon uses rotary positions")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.ffn_hidden_size or 4 * config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(_falcon_kv_heads(config))
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_rope_freq_base(_rope_theta(config))


def _is_qkv(gguf_name: str) -> bool:
    return gguf_name.endswith(("attn_qkv.weight", "attn_qkv.bias"))


def _per_head_qkv_rows(gguf_name: str, weight: Tensor, config) -> Tensor:
    """GPT-NeoX's and BLOOM's fused projection holds q, k, v per head; llama.cpp wants all q, then k, then v."""
    if not _is_qkv(gguf_name):
        return weight
    heads = config.num_attention_heads
    return weight.reshape(heads, 3, -1, *weight.shape[1:]).transpose(0, 1).reshape(weight.shape)


def _falcon_rows(gguf_name: str, weight: Tensor, config) -> Tensor:
    """Falcon's fused projection holds, per key/value group, its queries then one key and one value."""
    if not _is_qkv(gguf_name):
        return weight
    groups = _falcon_kv_heads(config)
    grouped = weight.reshape(groups, config.num_attention_heads // groups + 2, -1, *weight.shape[1:])
    parts = (grouped[:, :-2], grouped[:, -2:-1], grouped[:, -1:])
    return torch.cat([part.reshape(-1, *weight.shape[1:]) for part in parts]).reshape(weight.shape)


def _gemma_rows(gguf_name: str, weight: Tensor, config) -> Tensor:
    # transformers' Gemma norms scale by (1 + w), llama.cpp's by w
    return weight + 1 if gguf_name.endswith("_norm.weight") else weight


@dataclass(frozen=True)
class Layout:
    """How one transformers architecture is written for llama.cpp."""

    arch: str  #: the gguf.MODEL_ARCH member's name
    hyperparameters: Callable[[Any, Any], None]
    #: (GGUF tensor name, weight or LoRA B in (out, ...) layout, config) -> the rows as llama.cpp reads them
    rows: Callable[[str, Tensor, Any], Tensor] | None = None


#: transformers ``model_type`` -> its llama.cpp layout. Mistral is llama.cpp's llama architecture.
LAYOUTS: dict[str, Layout] = {
    "llama": Layout("LLAMA", _llama_hyperparameters, _llama_rows),
    "mistral": Layout("LLAMA", _llama_hyperparameters, _llama_rows),
    "qwen2": Layout("QWEN2", _llama_hyperparameters),
    "gpt2": Layout("GPT2", _gpt2_hyperparameters),
    "gemma": Layout("GEMMA", _gemma_hyperparameters, _gemma_rows),
    "phi": Layout("PHI2", _phi_hyperparameters),
    "gpt_neox": Layout("GPTNEOX", _gpt_neox_hyperparameters, _per_head_qkv_rows),
    "bloom": Layout("BLOOM", _bloom_hyperparameters, _per_head_qkv_rows),
    "falcon": Layout("FALCON", _falcon_hyperparameters, _falcon_rows),
}


def layout_for(model: nn.Module) -> Layout:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layout = LAYOUTS.get(model_type)
    if layout is None:
        raise CheckpointError(
            f"deltatune writes GGUF for {', '.join(sorted(LAYOUTS))}, not {model_type!r}. Write the merged model "
            "(deltatune merge) and convert it with llama.cpp's convert_hf_to_gguf.py, which knows more architectures"
        )
    return layout


# tensors --------------------------------------------------------------------------------------------


@dataclass
class _Named:
    gguf_name: str
    transposed: bool  #: stored as (in, out) by the module (GPT-2's Conv1D)


def _name_map(model: nn.Module, layout: Layout):
    gguf = _gguf()
    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, layout.arch), model.config.num_hidden_layers)


def _gguf_name(name_map, model: nn.Module, path: str) -> str | None:
    """llama.cpp's name for the module at ``path``; the table knows some modules (BLOOM's) only
    by their path inside the base model, without the head model's prefix (``transformer.``)."""
    found = name_map.get_name(path)
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    if found is None and prefix != "." and path.startswith(prefix):
        found = name_map.get_name(path.removeprefix(prefix))
    return found


def _tied_output(model: nn.Module) -> nn.Module | None:
    """The output head when it shares the input embedding's weight (written once, as token_embd)."""
    output = model.get_output_embeddings()
    return output if output is not None and output.weight is model.get_input_embeddings().weight else None


def _tensor_names(model: nn.Module, layout: Layout) -> dict[str, _Named]:
    """transformers state-dict key -> where it goes in the GGUF file; tied output weights left out."""
    name_map = _name_map(model, layout)
    modules = dict(model.named_modules())
    output = _tied_output(model)
    tied = output is not None
    names: dict[str, _Named] = {}
    unmapped = []
    for key in model.state_dict():
        path, _, parameter = key.rpartition(".")
        if tied and modules.get(path) is output:
            continue
        target = _gguf_name(name_map, model, path)
        if target is None:
            unmapped.append(key)
            continue
        backend = backend_for(modules[path])
        names[key] = _Named(f"{target}.{parameter}", backend is not None and backend.kind == "conv1d" and parameter == "weight")
    if unmapped:
        raise CheckpointError(
            f"llama.cpp's {layout.arch} architecture has no tensor for {', '.join(unmapped[:5])}"
            + (f" (and {len(unmapped) - 5} more)" if len(unmapped) > 5 else "")
        )
    return names


def _encode(tensor: Tensor, tensor_type: str) -> tuple[np.ndarray, Any]:
    """A tensor's data as GGUF stores it: 1-D tensors (norms, biases) in f32 as llama.cpp wants
    them; matrices in ``tensor_type``, Q8_0 only where rows are whole blocks of 32 (else f16)."""
    gguf = _gguf()
    data = tensor.detach().float().cpu().numpy()
    ggml_name = TENSOR_TYPES[tensor_type][0]
    if data.ndim == 1 or ggml_name == "F32":
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if ggml_name == "Q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]:
        ggml_name = "F16"
    if ggml_name == "F16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    qtype = getattr(gguf.GGMLQuantizationType, ggml_name)
    return gguf.quants.quantize(data, qtype), qtype


def _add_tensor(writer, name: str, tensor: Tensor, tensor_type: str) -> None:
    data, qtype = _encode(tensor, tensor_type)
    if qtype in (_gguf().GGMLQuantizationType.F32, _gguf().GGMLQuantizationType.F16):
        writer.add_tensor(name, data)
    else:
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)


# tokenizer ------------------------------------------------------------------------------------------

#: llama.cpp's pre-tokenizer names for the split rules of common byte-level BPE tokenizers,
#: keyed by the regex of the tokenizer.json ``Split`` that precedes a regex-free ByteLevel
_PRE_TOKENIZER_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for how this byte-level BPE tokenizer splits text before merging."""
    if pre is None:
        raise CheckpointError("the tokenizer has no pre-tokenizer; llama.cpp's BPE vocabularies all have one")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # ByteLevel's own regex is GPT-2's
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        splits = [s for s in steps if s.get("type") == "Split"]
        if len(splits) == 1 and steps[-1].get("type") == "ByteLevel" and not steps[-1].get("use_regex", True):
            regex = splits[0].get("pattern", {}).get("Regex")
            if regex in _PRE_TOKENIZER_REGEXES:
                return _PRE_TOKENIZER_REGEXES[regex]
    raise CheckpointError(
        f"the tokenizer splits text with {json.dumps(pre)[:200]}, which deltatune cannot name for llama.cpp "
        f"(it knows GPT-2's ByteLevel and the splits of {', '.join(sorted(set(_PRE_TOKENIZER_REGEXES.values())))}); "
        "convert the merged model with llama.cpp's convert_hf_to_gguf.py instead"
    )


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """The vocabulary, merges, special ids and chat template of a byte-level BPE tokenizer."""
    gguf = _gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CheckpointError("writing the tokenizer to GGUF needs a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise CheckpointError(
            f"the tokenizer is {model.get('type')!r} with a {(spec.get('decoder') or {}).get('type')!r} decoder; deltatune "
            "writes byte-level BPE vocabularies (GPT-2, Llama 3, Qwen, SmolLM) to GGUF. Convert the merged model with "
            "llama.cpp's convert_hf_to_gguf.py instead"
        )
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise CheckpointError(f"the tokenizer has ids up to {max(by_id)} but the model's vocabulary has {vocab_size} rows")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, setter in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                         ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            setter(token_id)
    # what the tokenizer does, not what its config claims: does encoding add a BOS?
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# writers --------------------------------------------------------------------------------------------


def _writer(path: Path, layout: Layout):
    gguf = _gguf()
    return gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, layout.arch)])


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_model(model: nn.Module, path: str | Path, tokenizer=None, *, tensor_type: str = "f16", name: str | None = None) -> Path:
    """Write ``model`` (a causal LM without deltas, e.g. after :func:`merge_and_detach`) as one GGUF
    file. With ``tokenizer`` the file is complete for llama.cpp and Ollama; without it, it holds
    the weights and hyperparameters only (transformers reads it; llama.cpp needs a vocabulary)."""
    check_model("write a GGUF of", model)
    if tensor_type not in TENSOR_TYPES:
        raise CheckpointError(f"unknown GGUF tensor type {tensor_type!r}; choose one of {', '.join(TENSOR_TYPES)}")
    if delta_layers(model):
        raise CheckpointError("the model still has deltas attached; merge them first (merge_and_detach) or write an adapter")
    gguf = _gguf()
    layout = layout_for(model)
    names = _tensor_names(model, layout)
    path = Path(path)
    writer = _writer(path, layout)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or getattr(model.config, "_name_or_path", None) or type(model).__name__)
    layout.hyperparameters(writer, model.config)
    writer.add_vocab_size(model.config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, TENSOR_TYPES[tensor_type][1]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer is not None:
        _add_tokenizer(writer, tokenizer, model.config.vocab_size)
    state = model.state_dict()
    with torch.no_grad():
        for key, named in names.items():
            tensor = state[key]
            if named.transposed:
                tensor = tensor.t()
            if layout.rows is not None:
                tensor = layout.rows(named.gguf_name, tensor, model.config)
            _add_tensor(writer, named.gguf_name, tensor.contiguous(), tensor_type)
    _finish(writer)
    return path


def adapter_factors(model: nn.Module, name: str) -> dict[str, tuple[Tensor, Tensor, float]]:
    """Module path -> (A, B, s) of delta ``name``, refusing a delta llama.cpp cannot apply as B·A."""
    info = deltas(model).get(name)
    if info is None:
        raise CheckpointError(f"no delta named {name!r}; the model has {', '.join(deltas(model)) or 'none'}")
    layers = delta_layers(model)
    embedding_weight = model.get_input_embeddings().weight
    factors, problems = {}, []
    for path in info.paths:
        delta = layers[path].deltas[name]
        was_training = delta.training
        delta.eval()  # dropout does not belong to the exported function
        low_rank = delta.low_rank_factors()
        delta.train(was_training)
        backend = backend_for(layers[path].base)
        if low_rank is None:
            problems.append(f"{path} ({type(delta).__name__}) does not compute W x + s·B A x")
        elif backend is None or backend.kind == "embedding":
            problems.append(f"{path} is an embedding; llama.cpp's adapters there use another layout")
        elif layers[path].base.weight is embedding_weight:
            problems.append(f"{path} is the output head, which llama.cpp computes with the tied input embedding")
        else:
            factors[path] = low_rank
    if problems:
        raise CheckpointError(
            f"delta {name!r} ({info.config.method}) cannot be a llama.cpp LoRA adapter: {'; '.join(problems[:3])}"
            + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
            + ". Write the merged model instead (leave out --adapter)"
        )
    return factors


def write_adapter(model: nn.Module, path: str | Path, name: str, *, tensor_type: str = "f32") -> Path:
    """Write delta ``name`` as a llama.cpp LoRA adapter applying to :func:`write_model`'s file of
    the same base (``llama-cli -m base.gguf --lora adapter.gguf``)."""
    check_model("write a GGUF adapter of", model)
    if tensor_type not in TENSOR_TYPES:
        raise CheckpointError(f"unknown GGUF tensor type {tensor_type!r}; choose one of {', '.join(TENSOR_TYPES)}")
    gguf = _gguf()
    layout = layout_for(model)
    factors = adapter_factors(model, name)
    name_map = _name_map(model, layout)
    # one alpha for the file: the most common s·r; other modules carry their ratio in B
    products = [s * a.shape[0] for a, _, s in factors.values()]
    alpha = max(set(products), key=products.count)
    path = Path(path)
    writer = _writer(path, layout)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    with torch.no_grad():
        for module_path, (a, b, s) in factors.items():
            target = _gguf_name(name_map, model, module_path)
            if target is None:
                raise CheckpointError(f"{module_path} has no weight in llama.cpp's {layout.arch} model file")
            weight = f"{target}.weight"
            b = b.detach().float() * (s * a.shape[0] / alpha)
            if layout.rows is not None:
                b = layout.rows(weight, b, model.config)
            _add_tensor(writer, f"{weight}.lora_a", a.detach().float().contiguous(), tensor_type)
            _add_tensor(writer, f"{weight}.lora_b", b.contiguous(), tensor_type)
    _finish(writer)
    return path


# Ollama ---------------------------------------------------------------------------------------------

_PROBE = [
    {"role": "system", "content": "SYSTEM-TEXT"},
    {"role": "user", "content": "USER-TEXT"},
    {"role": "assistant", "content": "ASSISTANT-TEXT"},
    {"role": "user", "content": "SECOND-USER-TEXT"},
]

#: ChatML as an Ollama (Go text/template) TEMPLATE: system turn, then every other turn, then the
#: opening of the assistant's
OLLAMA_CHATML = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}{{- if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}{{- end }}"
    "<|im_start|>assistant\n"
)


def chatml(messages: list[dict[str, str]]) -> str:
    """``messages`` in ChatML, opening the assistant's turn."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def ollama_template(tokenizer) -> tuple[str | None, str | None]:
    """(Go TEMPLATE, default SYSTEM) when the tokenizer's chat template renders ChatML, found by
    rendering it, else (None, None): Ollama then reads the chat template from the GGUF itself."""
    if tokenizer is None or not tokenizer.chat_template:
        return None, None
    render = lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # noqa: E731
    try:
        with_system, without_system = render(_PROBE), render(_PROBE[1:])
    except (TemplateError, ValueError):  # a template that refuses these turns (a system turn, say) is not ChatML
        return None, None
    if with_system != chatml(_PROBE):
        return None, None
    if without_system == chatml(_PROBE[1:]):
        return OLLAMA_CHATML, None
    default = re.fullmatch(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", without_system[: -len(chatml(_PROBE[1:]))], re.S)
    if default is None or without_system[default.end():] != chatml(_PROBE[1:]):
        return None, None
    return OLLAMA_CHATML, default.group(1)


def _quoted(text: str) -> str:
    if '"""' in text:
        raise CheckpointError('the chat template holds """, which an Ollama Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(model_file: str, tokenizer, adapter_file: str | None = None) -> str:
    """An Ollama Modelfile: FROM the GGUF beside it (and ADAPTER the LoRA one), with the chat
    template as Go TEMPLATE, its default system prompt and its end-of-turn token as a stop."""
    lines = [f"FROM ./{model_file}"]
    if adapter_file is not None:
        lines.append(f"ADAPTER ./{adapter_file}")
    template, system = ollama_template(tokenizer)
    if template is None:
        lines.append("# TEMPLATE: not ChatML; Ollama takes the chat template stored in the GGUF (tokenizer.chat_template)")
    else:
        lines.append(f"TEMPLATE {_quoted(template)}")
        if system is not None:
            lines.append(f"SYSTEM {_quoted(system)}")
        lines.append('PARAMETER stop "<|im_end|>"')
    return "\n".join(lines) + "\n"


def export(model: nn.Module, tokenizer, directory: str | Path, *, tensor_type: str = "f16", adapter: bool = False,
           name: str | None = None) -> list[Path]:
    """Write ``directory``: the merged ``model.gguf`` and its Modelfile, or with ``adapter`` the
    base ``base.gguf`` plus the LoRA ``adapter.gguf`` and a Modelfile naming both. The model's
    deltas are merged (or detached) in the process."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layout_for(model)  # refuse an architecture before any work
    if adapter:
        names = list(deltas(model))
        if len(names) != 1:
            raise CheckpointError(f"an adapter file holds one delta; this model has {len(names)} ({', '.join(names)})")
        written = [write_adapter(model, directory / ADAPTER_FILE, names[0])]
        detach(model)
        written.insert(0, write_model(model, directory / BASE_FILE, tokenizer, tensor_type=tensor_type, name=name))
        text = modelfile(BASE_FILE, tokenizer, ADAPTER_FILE)
    else:
        if deltas(model):
            merge_and_detach(model)
        written = [write_model(model, directory / MODEL_FILE, tokenizer, tensor_type=tensor_type, name=name)]
        text = modelfile(MODEL_FILE, tokenizer)
    (directory / MODELFILE).write_text(text)
    return [*written, directory / MODELFILE]
