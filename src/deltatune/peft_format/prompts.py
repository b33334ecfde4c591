"""PEFT's prompt-learning adapters <-> deltatune's prompt tuning, P-tuning, prefix tuning and LLaMA-Adapter.

Checkpoint layouts. PROMPT_TUNING, P_TUNING and PREFIX_TUNING store one un-prefixed tensor,
``prompt_embeddings``, and ``base_model.<path>.<parameter>`` for every parameter of a module in
``modules_to_save`` (PEFT's prompt-learning model holds the user's model directly as
``base_model``, without the ``.model`` of the module-level tuners). ADAPTION_PROMPT is a
module-level tuner: ``base_model.model.<attention path>.adaption_prompt`` and ``.adaption_gate``.

**Prompt tuning** (Lester, Al-Rfou & Constant, 2021) and **P-tuning** (Liu et al., 2021, "GPT
Understands, Too"). ``prompt_embeddings`` (s·n, e) holds P, the n virtual tokens put before the
embedded input; for P-tuning it is the prompt encoder's output, which PEFT saves and, once loaded,
reads directly (deltatune folds its encoder into the same P). s is ``num_transformer_submodules``:
2 for SEQ_2_SEQ_LM, whose forward reads only the first n rows. Both libraries compute

    h = body([P; E(x)], mask = [1ⁿ; m])

PEFT's per-token outputs include the n virtual positions (CAUSAL_LM, FEATURE_EXTRACTION,
TOKEN_CLS), deltatune drops them; in SEQ_2_SEQ_LM both keep the prompt in the encoder's output
and extend the cross-attention mask, and SEQ_CLS's pooled output reads the first virtual token.

**Prefix tuning** (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation"). ``prompt_embeddings`` (n, 2·L·d), d = ``token_dim`` the key/value width (key/value
heads × head_dim, ``num_attention_heads`` of them): per token [K_0, V_0, K_1, V_1, ...], layer l's
keys in block 2l and its values in block 2l+1 (PEFT views it as (n, 2L, heads, d/heads) and
gives block pair l to the attention whose ``layer_idx`` is l). With ``prefix_projection`` PEFT
saves the projection MLP's output in that same layout and reads it directly once loaded, so it
is read alike; deltatune writes its prefixes (folded from ``reparameterize``) without projection.
PEFT passes the prefixes as an n-long KV cache, so the real tokens sit at positions n..n+T-1;
deltatune's prefixes leave the positions as they are. Where positions enter only through a
rotary embedding R_p applied to queries and keys, the two agree with deltatune's keys being
PEFT's rotated back by n (R is orthogonal and R_a R_b = R_{a+b}):

    (R_{p+n} q)·K_peft = (R_p q)·(R_{-n} K_peft),   so   K_deltatune = R_{-n} K_peft

and values are the same. Any other position scheme (a learned table: GPT-2, OPT, BERT; T5's
relative bias, ALiBi) gives the real tokens other positions in PEFT, which no prefix can undo:
those models are refused, as are encoder-decoders, where PEFT's cache reaches only the decoder's
self-attention (the cross-attention part is discarded, decoder layer l reads the block pair
stored for layer 2l mod L, and T5 adds its relative position bias to the cached prefixes).

**LLaMA-Adapter** (Zhang et al., 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models
with Zero-init Attention"). ``adaption_prompt`` (1, K, h) is T_l, ``adaption_gate`` (1,) is g_l
of each of the top ``adapter_layers`` attention modules named ``target_modules``. PEFT computes

    o_proj(attention) + o_proj(g_l · softmax(q (T_l W_K)ᵀ / √d_h) (T_l W_V))

with q the rotated queries, the prompt keys not rotated, one fp32 softmax over the K prompts
alone and no mask; deltatune computes the same term with a gate per head and adds it before
``o_proj``. The two are equal when every head gate of a layer is g_l and ``o_proj`` has no bias
(PEFT's second ``o_proj`` call adds the bias once more); only Llama and Mistral are adapted by
PEFT and by deltatune alike (PEFT's GPT-2 variant reads the fused ``c_attn``).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

from ..anatomy import unwrap
from ..api import deltas
from ..config import DeltaConfig
from ..errors import CheckpointError
from ..layer import Delta, delta_layers
from ..methods.prefix import LlamaAdapterConfig, PrefixDelta, PrefixTuningConfig
from ..methods.prompt import PromptDelta, PromptTuningConfig, PTuningConfig
from ..placement import ParameterCopy, place
from . import KEY_PREFIX, Converter, Exported, Imported, KeyTable, model_modules, register, task_type
from .lora import add_saved_modules, deltatune_saved_patterns, export_saved_modules, saved_module_paths

#: where PEFT's prompt-learning models put the user's model (PeftModel.base_model, no tuner)
PROMPT_KEY_PREFIX = "base_model."
PROMPT_KEY = "prompt_embeddings"
SEQ_2_SEQ = "SEQ_2_SEQ_LM"
#: the task type whose PeftModel runs the model itself with the prompt, whatever its head
ANY_HEAD_TASK = "FEATURE_EXTRACTION"
#: rotary schemes whose frequencies do not depend on the sequence length, so R_{-n} is one rotation
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
#: model types PEFT's adaption prompt wraps with AdaptedAttention (q/k/v/o projections named as in Llama)
ADAPTION_MODEL_TYPES = ("llama", "mistral")
ADAPTION_TARGET = "self_attn"
#: the fields of every PEFT prompt-learning config that these converters read
PROMPT_LEARNING_FIELDS = frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules", "modules_to_save"})
#: PEFT's P-tuning encoders -> deltatune's
_ENCODERS = {"MLP": "mlp", "LSTM": "lstm"}


# shared ------------------------------------------------------------------------------------------


def _dry_run(model: nn.Module, config: DeltaConfig, paths: list[str] | None = None) -> dict[str, Delta]:
    """The deltas ``config`` would build on ``model`` (at ``paths``, or where its targets point),
    on the meta device: which module gets what, decided by the method itself."""
    return place(model, config, paths).build(initialize=False, device=torch.device("meta"))


def _saved_names(model: nn.Module, names: list[str] | None) -> list[str]:
    """The entries of PEFT's ``modules_to_save`` that name something in this model: PEFT skips the
    others (its SEQ_CLS model always adds both 'classifier' and 'score')."""
    modules = model_modules(model)
    return [n for n in names or () if saved_module_paths(modules, [n])]


def _saved_table(model: nn.Module, names: list[str]) -> KeyTable:
    table = KeyTable()
    modules = model_modules(model)
    add_saved_modules(table, modules, saved_module_paths(modules, names))
    return table


def _complete_states(built: dict[str, Delta], states: dict[str, dict[str, Tensor]], where: str) -> dict[str, dict[str, Tensor]]:
    """Every path the method builds, in its order: the checkpoint's tensors, and nothing for a
    parameter-free companion (the decoder's prompt mask of an encoder-decoder)."""
    stray = sorted(set(states) - set(built))
    if stray:
        raise CheckpointError(f"{where}: the checkpoint holds tensors for {stray[0]}, which this method does not adapt here")
    complete = {}
    for path, delta in built.items():
        if path not in states and delta.saved_state():
            raise CheckpointError(f"{where}: the checkpoint holds no tensors for {path} ({sorted(delta.saved_state())})")
        complete[path] = states.get(path, {})
    return complete


# prompt tuning and P-tuning ----------------------------------------------------------------------


class _PromptConverter(Converter):
    """What PROMPT_TUNING and P_TUNING share: P is ``prompt_embeddings``, folded."""

    translated = PROMPT_LEARNING_FIELDS
    #: PEFT fills them in from the model's config; neither prompt tuning nor P-tuning reads them
    training_only = frozenset({"num_attention_heads", "num_layers"})

    def deltatune_config(self, config: dict[str, Any], modules_to_save: tuple[str, ...]) -> DeltaConfig:
        raise NotImplementedError

    def peft_fields(self, config: DeltaConfig) -> dict[str, Any]:
        raise NotImplementedError

    def read(self, model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]) -> Imported:
        where = f"{self.peft_type} checkpoint"
        if config.get("task_type") is None:
            raise CheckpointError(
                f"{where}: task_type=None; PEFT's plain PeftModel runs the base model without the prompt, so "
                "this adapter changes nothing there and has no deltatune equivalent"
            )
        n = int(config["num_virtual_tokens"])
        submodules = config.get("num_transformer_submodules") or 1
        if submodules not in (1, 2) or (submodules == 2 and config["task_type"] != SEQ_2_SEQ):
            raise CheckpointError(
                f"{where}: num_transformer_submodules={submodules!r} with task_type={config['task_type']!r}; PEFT "
                f"prepends all {submodules}·n prompt rows there, which deltatune does not implement (2 is for "
                f"{SEQ_2_SEQ}, whose encoder reads the first n)"
            )
        names = _saved_names(model, config.get("modules_to_save"))
        delta_config = self.deltatune_config(config, deltatune_saved_patterns(names, model_modules(model)))
        built = _dry_run(model, delta_config)
        body = next(p for p, d in built.items() if isinstance(d, PromptDelta))
        table = _saved_table(model, names)
        table.add(PROMPT_KEY, body, PROMPT_KEY)
        states = table.split(tensors, prefix=PROMPT_KEY_PREFIX)
        if body not in states:
            raise CheckpointError(f"{where}: no {PROMPT_KEY} tensor")
        prompts = states[body][PROMPT_KEY]
        expected = (submodules * n, int(config["token_dim"]))
        if tuple(prompts.shape) != expected:
            raise CheckpointError(
                f"{where}: {PROMPT_KEY} has shape {tuple(prompts.shape)}, expected {expected} for num_virtual_tokens={n}, "
                f"num_transformer_submodules={submodules} and token_dim={expected[1]}"
            )
        notes = []
        if submodules == 2:
            notes.append(f"{where}: rows {n}..{2 * n - 1} of {PROMPT_KEY} are not read by PEFT's {SEQ_2_SEQ} forward; dropped")
        states[body][PROMPT_KEY] = prompts[:n]
        return Imported(delta_config, _complete_states(built, states, where), notes)

    def write(self, model: nn.Module, name: str) -> Exported:
        info = deltas(model)[name]
        layers = delta_layers(model)
        prompt = next(layers[p].deltas[name] for p in info.paths if isinstance(layers[p].deltas[name], PromptDelta))
        saved, tensors = export_saved_modules(model, name, PROMPT_KEY_PREFIX)
        tensors[PROMPT_KEY] = prompt.saved_state()[PROMPT_KEY]
        return Exported(
            {
                "task_type": task_type(model) or ANY_HEAD_TASK,
                "num_virtual_tokens": prompt.n,
                "token_dim": prompt.dim,
                # one block of n rows: PEFT's SEQ_2_SEQ_LM forward reads only the first anyway
                "num_transformer_submodules": 1,
                "modules_to_save": saved or None,
                **self.peft_fields(info.config),
            },
            tensors,
        )


@register
class PromptTuningConverter(_PromptConverter):
    peft_type = "PROMPT_TUNING"
    methods = ("prompt",)
    training_only = _PromptConverter.training_only | {
        "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs",
    }

    def deltatune_config(self, config: dict[str, Any], modules_to_save: tuple[str, ...]) -> PromptTuningConfig:
        return PromptTuningConfig(num_virtual_tokens=int(config["num_virtual_tokens"]), modules_to_save=modules_to_save)

    def peft_fields(self, config: PromptTuningConfig) -> dict[str, Any]:
        return {"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None}


@register
class PTuningConverter(_PromptConverter):
    peft_type = "P_TUNING"
    methods = ("ptuning",)
    # the encoder only shapes training: both libraries save and read its output, and a loaded
    # deltatune P-tuning delta is folded; its settings are kept in the config all the same
    translated = _PromptConverter.translated | {"encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers"}
    training_only = _PromptConverter.training_only | {"encoder_dropout"}

    def deltatune_config(self, config: dict[str, Any], modules_to_save: tuple[str, ...]) -> PTuningConfig:
        encoder = config.get("encoder_reparameterization_type", "MLP")
        if encoder not in _ENCODERS:
            raise CheckpointError(
                f"{self.peft_type} checkpoint: encoder_reparameterization_type={encoder!r} is none of PEFT's prompt "
                f"encoders ({', '.join(_ENCODERS)})"
            )
        return PTuningConfig(
            num_virtual_tokens=int(config["num_virtual_tokens"]),
            encoder=_ENCODERS[encoder],
            # PEFT's default hidden size is token_dim
            encoder_hidden_size=int(config.get("encoder_hidden_size") or config["token_dim"]),
            encoder_num_layers=int(config.get("encoder_num_layers", 2)),
            modules_to_save=modules_to_save,
        )

    def peft_fields(self, config: PTuningConfig) -> dict[str, Any]:
        return {
            "encoder_reparameterization_type": {v: k for k, v in _ENCODERS.items()}[config.encoder],
            "encoder_hidden_size": config.encoder_hidden_size,
            "encoder_num_layers": config.encoder_num_layers,
            "encoder_dropout": 0.0,
        }


# prefix tuning -----------------------------------------------------------------------------------


class _RotaryShift:
    """The rotation a model's rotary embedding gives a key at position s, for PEFT's cache offset.

    Built only when PEFT's prefix tuning and deltatune's agree on this model up to that rotation
    (module docstring); otherwise :func:`_prefix_layout` says why not."""

    def __init__(self, rotary: nn.Module, apply, head_dim: int):
        self.rotary = rotary
        self.apply = apply
        self.head_dim = head_dim

    @torch.no_grad()
    def __call__(self, keys: Tensor, shift: int) -> Tensor:
        """``keys`` (n, heads·head_dim) rotated as the model rotates a key at position ``shift``."""
        n, width = keys.shape
        device = self.rotary.inv_freq.device
        by_head = keys.float().to(device).view(n, width // self.head_dim, self.head_dim).transpose(0, 1).unsqueeze(0)
        cos, sin = self.rotary(by_head, torch.full((1, n), shift, dtype=torch.long, device=device))
        # yarn scales cos and sin for queries and keys alike; the cached prefixes were never scaled
        scale = getattr(self.rotary, "attention_scaling", 1.0)
        _, rotated = self.apply(by_head, by_head, cos.float() / scale, sin.float() / scale)
        return rotated[0].transpose(0, 1).reshape(n, width).to(device=keys.device, dtype=keys.dtype)


@torch.no_grad()
def _rotates_as_rope(apply, head_dim: int) -> bool:
    """Whether ``apply(q, k, cos, sin)`` is the rotary rotation x·cos + rotate_half(x)·sin of both,
    tried on random values: the model's module may hold a plain function or a wrapper around one
    (transformers 5.25 makes it a module, for kernel replacement), so its behaviour is what counts."""
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 3, head_dim, generator=generator) for _ in range(2))
    angles = torch.randn(1, 3, head_dim, generator=generator)
    cos, sin = angles.cos(), angles.sin()
    try:
        rotated = apply(q, k, cos, sin)
    except (TypeError, ValueError, RuntimeError):  # another signature: not the rotation this needs
        return False
    if not (isinstance(rotated, tuple) and len(rotated) == 2):
        return False
    half = head_dim // 2

    def expected(x: Tensor) -> Tensor:
        return x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin[:, None]

    return all(isinstance(out, Tensor) and out.shape == x.shape and torch.allclose(out, expected(x), atol=1e-5)
               for out, x in zip(rotated, (q, k)))


def _rotary_embedding(model: nn.Module) -> tuple[nn.Module | None, str | None]:
    """The model's one rotary embedding, or why its positions are more than that."""
    config = getattr(model, "config", None)
    embedding = unwrap(model.get_input_embeddings())
    modules = model_modules(model)
    rotaries = [m for m in modules.values() if isinstance(getattr(m, "inv_freq", None), Tensor)]
    tables = [p for p, m in modules.items() if isinstance(m, nn.Embedding) and m is not embedding]
    if getattr(config, "is_encoder_decoder", False):
        return None, (
            "it is an encoder-decoder: PEFT's cache reaches only the decoder's self-attention, in slots that do "
            "not follow the layers one to one, and relative position biases apply to the cached prefixes"
        )
    if tables:
        return None, f"it encodes positions with a table ({tables[0]}), so the real tokens' positions would differ"
    if len(rotaries) != 1:
        return None, "its positions are not given by one rotary embedding"
    if getattr(rotaries[0], "rope_type", "default") not in STATIC_ROPE_TYPES:
        return None, f"its rotary embedding ({rotaries[0].rope_type}) changes with the sequence length"
    if getattr(config, "sliding_window", None):
        return None, "its sliding attention window would let the cached prefixes fall out of reach"
    return rotaries[0], None


def _cache_slots(model: nn.Module, config: PrefixTuningConfig, where: str) -> tuple[dict[int, str], dict[str, Delta]]:
    """The attention module reading each slot of PEFT's cache (its ``layer_idx``), and the deltas
    ``config`` builds (its modules_to_save copies included)."""
    built = _dry_run(model, config)
    modules = model_modules(model)
    slots: dict[int, str] = {}
    for path, delta in built.items():
        if isinstance(delta, ParameterCopy):
            continue
        index = getattr(modules[path], "layer_idx", None)
        if not isinstance(index, int) or index in slots:
            raise CheckpointError(f"{where}: cannot tell which KV-cache slot {path} reads (its layer_idx)")
        slots[index] = path
    if sorted(slots) != list(range(len(slots))):
        raise CheckpointError(f"{where}: the attention modules read KV-cache slots {sorted(slots)}, not 0..{len(slots) - 1}")
    return dict(sorted(slots.items())), built


def _prefix_layout(
    model: nn.Module, config: PrefixTuningConfig, where: str
) -> tuple[_RotaryShift, dict[int, str], dict[str, Delta]]:
    """The rotation R_s, the attention module reading each slot of PEFT's cache and the deltas
    ``config`` builds; or a CheckpointError saying why PEFT's prefixes cannot be matched here."""
    rotary, reason = _rotary_embedding(model)
    if reason is None:
        slots, built = _cache_slots(model, config, where)
        attention = model_modules(model)[slots[0]]
        apply = getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)
        head_dim = getattr(attention, "head_dim", None)
        if apply is None or not isinstance(head_dim, int) or not _rotates_as_rope(apply, head_dim):
            reason = f"{type(attention).__name__} does not rotate keys with a known apply_rotary_pos_emb(q, k, cos, sin)"
        elif 2 * rotary.inv_freq.numel() != head_dim:
            reason = "its rotary embedding covers only part of each head"
    if reason:
        raise CheckpointError(
            f"{where}: PEFT's prefix tuning passes the prefixes as a KV cache, which moves the real tokens n "
            f"positions later; deltatune's prefixes keep the positions, which gives the same outputs only when "
            f"positions enter through rotary embeddings alone. This model cannot be matched: {reason}"
        )
    return _RotaryShift(rotary, apply, head_dim), slots, built


@register
class PrefixTuningConverter(Converter):
    peft_type = "PREFIX_TUNING"
    methods = ("prefix",)
    translated = PROMPT_LEARNING_FIELDS | {"num_attention_heads", "num_layers"}
    # prefix_projection: the checkpoint holds the projection's output either way (module docstring)
    training_only = frozenset({"prefix_projection", "encoder_hidden_size", "init_weights"})

    def read(self, model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]) -> Imported:
        where = f"{self.peft_type} checkpoint"
        n = int(config["num_virtual_tokens"])
        names = _saved_names(model, config.get("modules_to_save"))
        saved = deltatune_saved_patterns(names, model_modules(model))
        delta_config = PrefixTuningConfig(num_virtual_tokens=n, modules_to_save=saved)
        shift, slots, built = _prefix_layout(model, delta_config, where)
        width, heads, layers = int(config["token_dim"]), int(config["num_attention_heads"]), int(config["num_layers"])
        submodules = config.get("num_transformer_submodules") or 1
        if submodules != 1:
            raise CheckpointError(
                f"{where}: num_transformer_submodules={submodules!r}; PEFT then lays the cache out for an "
                "encoder-decoder, which deltatune's prefixes do not reproduce"
            )
        if layers != len(slots):
            raise CheckpointError(f"{where}: num_layers={layers}, but this model has {len(slots)} attention layers")
        for path in slots.values():
            delta = built[path]
            if (delta.key_width, delta.value_width) != (width, width):
                raise CheckpointError(
                    f"{where}: token_dim={width}, but {path} has keys {delta.key_width} and values {delta.value_width} wide"
                )
        if width % heads or width // heads != shift.head_dim:
            raise CheckpointError(
                f"{where}: num_attention_heads={heads} splits token_dim={width} into heads of {width / heads:g}, but "
                f"this model's heads are {shift.head_dim} wide"
            )
        rest = dict(tensors)
        prefixes = rest.pop(PROMPT_KEY, None)
        if prefixes is None or tuple(prefixes.shape) != (n, 2 * layers * width):
            shape = None if prefixes is None else tuple(prefixes.shape)
            raise CheckpointError(f"{where}: {PROMPT_KEY} has shape {shape}, expected ({n}, {2 * layers * width})")
        blocks = prefixes.split(width, dim=1)
        states = _saved_table(model, names).split(rest, prefix=PROMPT_KEY_PREFIX)
        for slot, path in slots.items():
            states[path] = {"prefix_keys": shift(blocks[2 * slot], -n), "prefix_values": blocks[2 * slot + 1]}
        return Imported(delta_config, _complete_states(built, states, where))

    def write(self, model: nn.Module, name: str) -> Exported:
        info = deltas(model)[name]
        config: PrefixTuningConfig = info.config
        where = f"delta {name!r}"
        n = config.num_virtual_tokens
        # every attention module, whatever the delta's own targets: PEFT gives each one a prefix
        shift, slots, _ = _prefix_layout(model, PrefixTuningConfig(num_virtual_tokens=n), where)
        layers = delta_layers(model)
        adapted = {p for p in info.paths if isinstance(layers[p].deltas[name], PrefixDelta)}
        missing = [p for p in slots.values() if p not in adapted]
        if missing:
            raise CheckpointError(
                f"{where} has no prefix on {missing[0]}; PEFT's prefix tuning gives every attention layer one "
                "(a layer without a prefix is not a layer with a zero prefix: zero keys still take attention)"
            )
        blocks = []
        for path in slots.values():
            state = layers[path].deltas[name].saved_state()
            keys, values = state["prefix_keys"], state["prefix_values"]
            if keys.shape != values.shape:
                raise CheckpointError(f"{where}: {path} has keys and values of different widths, which PEFT cannot store")
            blocks += [shift(keys, n), values]
        widths = {b.shape[1] for b in blocks}
        if len(widths) != 1:
            raise CheckpointError(
                f"{where}: the layers' prefixes have different widths {sorted(widths)}; PEFT needs one token_dim"
            )
        (width,) = widths
        saved, tensors = export_saved_modules(model, name, PROMPT_KEY_PREFIX)
        tensors[PROMPT_KEY] = torch.cat(blocks, dim=1)
        return Exported(
            {
                "task_type": task_type(model) or ANY_HEAD_TASK,
                "num_virtual_tokens": n,
                "token_dim": width,
                "num_attention_heads": width // shift.head_dim,
                "num_layers": len(slots),
                "num_transformer_submodules": 1,
                "prefix_projection": False,
                "encoder_hidden_size": None,
                "init_weights": None,
                "modules_to_save": saved or None,
            },
            tensors,
        )


# LLaMA-Adapter -----------------------------------------------------------------------------------


def _adaption_layers(model: nn.Module, target: str, count: int, where: str) -> tuple[list[str], list[str]]:
    """The attention modules PEFT could adapt (those whose path ends in ``.<target>``) and the
    last ``count`` of them, which it does adapt."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTION_MODEL_TYPES:
        raise CheckpointError(
            f"{where}: PEFT's adaption prompt and deltatune's llama_adapter agree on {', '.join(ADAPTION_MODEL_TYPES)} "
            f"models only, this one is {model_type!r} (PEFT's GPT-2 variant reads the fused c_attn and skips c_proj)"
        )
    modules = model_modules(model)
    candidates = [p for p in modules if p.endswith("." + target)]
    if not 0 < count <= len(candidates):
        raise CheckpointError(f"{where}: adapter_layers={count}, but the model has {len(candidates)} '{target}' modules")
    chosen = candidates[-count:]
    biased = [p for p in chosen if getattr(getattr(modules[p], "o_proj", None), "bias", None) is not None]
    if biased:
        raise CheckpointError(
            f"{where}: {biased[0]}.o_proj has a bias, which PEFT's adaption prompt adds a second time (it runs o_proj "
            "on the prompt term separately); deltatune adds the term before o_proj, once"
        )
    return candidates, chosen


@register
class AdaptionPromptConverter(Converter):
    peft_type = "ADAPTION_PROMPT"
    methods = ("llama_adapter",)
    translated = frozenset({"target_modules", "adapter_len", "adapter_layers"})

    def read(self, model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]) -> Imported:
        where = f"{self.peft_type} checkpoint"
        length, count = int(config["adapter_len"]), int(config["adapter_layers"])
        candidates, chosen = _adaption_layers(model, config.get("target_modules") or ADAPTION_TARGET, count, where)
        table = KeyTable()
        for path in candidates:
            table.add(f"{path}.adaption_prompt", path, "adaption_prompt")
            table.add(f"{path}.adaption_gate", path, "gate")
        states = table.split(tensors)
        if sorted(states) != sorted(chosen):
            raise CheckpointError(
                f"{where}: adapter_layers={count} makes PEFT adapt {', '.join(chosen)}, but the checkpoint holds "
                f"prompts for {', '.join(states) or 'none'}"
            )
        delta_config = LlamaAdapterConfig(adapter_len=length, adapter_layers=count)
        built = _dry_run(model, delta_config, chosen)
        for path, state in states.items():
            if set(state) != {"adaption_prompt", "gate"}:
                raise CheckpointError(
                    f"{where}: {path} needs adaption_prompt and adaption_gate, the checkpoint has {sorted(state)}"
                )
            prompt, gate = state["adaption_prompt"], state["gate"]
            if prompt.dim() != 3 or prompt.shape[:2] != (1, length) or gate.shape != (1,):
                raise CheckpointError(
                    f"{where}: {path} has adaption_prompt {tuple(prompt.shape)} and adaption_gate {tuple(gate.shape)}, "
                    f"expected (1, {length}, hidden) and (1,)"
                )
            heads = built[path].gate.shape[0]
            states[path] = {"adaption_prompt": prompt[0], "gate": gate.expand(heads).clone()}
        return Imported(delta_config, _complete_states(built, states, where))

    def write(self, model: nn.Module, name: str) -> Exported:
        info = deltas(model)[name]
        config: LlamaAdapterConfig = info.config
        where = f"delta {name!r}"
        if config.modules_to_save:
            raise CheckpointError(f"{where} trains modules_to_save, which PEFT's adaption prompt cannot store")
        _, chosen = _adaption_layers(model, ADAPTION_TARGET, len(info.paths), where)
        if chosen != info.paths:
            raise CheckpointError(
                f"{where} adapts {', '.join(info.paths)}; PEFT's adaption prompt adapts the top adapter_layers "
                f"'{ADAPTION_TARGET}' modules ({', '.join(chosen)})"
            )
        layers = delta_layers(model)
        tensors = {}
        for path in chosen:
            delta = layers[path].deltas[name]
            gate = delta.gate.detach()
            if not torch.all(gate == gate[0]):
                raise CheckpointError(
                    f"{where}: the head gates of {path} differ ({[round(float(g), 6) for g in gate]}); PEFT's adaption "
                    "prompt has one gate per layer, so it can hold this delta only when they are all equal"
                )
            tensors[f"{KEY_PREFIX}{path}.adaption_prompt"] = delta.adaption_prompt.detach()[None]
            tensors[f"{KEY_PREFIX}{path}.adaption_gate"] = gate[:1]
        return Exported(
            {"target_modules": ADAPTION_TARGET, "adapter_len": config.adapter_len, "adapter_layers": len(chosen)},
            tensors,
        )
