"""PEFT's LORA and IA3 adapters <-> deltatune's LoRA (rsLoRA, DoRA, PiSSA) and (IA)³.

Per adapted module ``P`` PEFT writes (after its ``base_model.model.`` prefix):

* LoRA on Linear / Conv1D: ``P.lora_A.weight`` (r, in) = A, ``P.lora_B.weight`` (out, r) = B,
  DoRA's ``P.lora_magnitude_vector`` (out,) = m — the same layouts as deltatune's, Conv1D's
  transposed storage being PEFT's ``fan_in_fan_out``;
* LoRA on Embedding: ``P.lora_embedding_A`` (r, vocab) = A, ``P.lora_embedding_B`` (dim, r) = B;
* PEFT also stores an adapted input or output embedding layer itself (``P.base_layer.weight``,
  and its bias), which must equal this model's; deltatune does not write it;
* ``bias="lora_only"``: ``P.base_layer.bias`` (``P.bias`` before PEFT 0.7), the trained bias b + Δb (deltatune keeps Δb, ``bias="targets"``);
* ``modules_to_save``: ``M.<parameter>`` for every parameter of a module ``M`` trained whole;
* (IA)³: ``P.ia3_l``, (out, 1) for an output scale, (1, in) for an input scale
  (``feedforward_modules``).

Both libraries scale LoRA by alpha/r (alpha/√r with rsLoRA) per module; deltatune's PiSSA delta
s·(BA − B₀A₀) is written as a rank-2r PEFT LoRA with A' = [A; A₀], B' = [B, −B₀].
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import torch
from torch import Tensor, nn

from ..api import deltas
from ..backends import backend_for
from ..errors import CheckpointError
from ..layer import delta_layers
from ..methods.ia3 import IA3Config
from ..methods.lora import LoRAConfig
from ..placement import ParameterCopy
from . import (
    Converter,
    Exported,
    Imported,
    KeyTable,
    KEY_PREFIX,
    exact_names,
    model_modules,
    peft_name_pattern,
    peft_pattern_key,
    peft_selects,
    peft_targets,
    register,
    task_type,
)


# modules_to_save, shared by every method --------------------------------------------------------


def saved_roots(modules: dict[str, nn.Module], names: list[str] | None) -> list[str]:
    """The modules PEFT's ``modules_to_save`` names select. PEFT's rule is a plain string
    suffix, not a dotted one: ``"norm"`` also selects ``layers.0.input_layernorm``."""
    if not names:
        return []
    return [p for p in modules if p and any(p.endswith(n) for n in names)]


def _inside(modules: dict[str, nn.Module], roots: list[str]) -> list[str]:
    """Modules with parameters of their own inside the ``roots`` (each trained as a full copy)."""
    return [
        p for p, m in modules.items()
        if any(p == r or p.startswith(r + ".") for r in roots) and next(m.parameters(recurse=False), None) is not None
    ]


def saved_module_paths(modules: dict[str, nn.Module], names: list[str] | None) -> list[str]:
    """Modules with parameters of their own inside those PEFT's ``modules_to_save`` names select."""
    return _inside(modules, saved_roots(modules, names))


def deltatune_saved_patterns(names: list[str] | None, modules: dict[str, nn.Module]) -> tuple[str, ...]:
    """deltatune ``modules_to_save`` patterns for PEFT's ``names``: the names themselves (a dotted
    suffix), or, where PEFT's plain-suffix rule selects more than that in this model's
    ``modules``, the exact paths PEFT selects."""
    roots = saved_roots(modules, names)
    dotted = [p for p in modules if p and any(p == n or p.endswith("." + n) for n in names or ())]
    if dotted != roots:
        return tuple(f"re:{re.escape(r)}" for r in roots)
    return tuple(peft_name_pattern(n) for n in names or ())


def add_saved_modules(table: KeyTable, modules: dict[str, nn.Module], paths: list[str]) -> None:
    for path in paths:
        for param_name, _ in modules[path].named_parameters(recurse=False):
            table.add(f"{path}.{param_name}", path, f"copies.{param_name}")


#: the modules PEFT's task models (PeftModelForSequenceClassification, ...ForTokenClassification)
#: always train whole as modules_to_save, whatever the adapter config names
PEFT_TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"]}


def peft_task_heads(model: nn.Module) -> list[str]:
    """Paths of the modules PEFT will load as full copies because of the model's task type."""
    return saved_roots(model_modules(model), PEFT_TASK_HEADS.get(task_type(model)))


def _task_head_copies(model: nn.Module, name: str, heads: list[str], prefix: str) -> dict[str, Tensor]:
    """The parameters of each task head as delta ``name`` makes them: a delta on the head (LoRA
    on a classifier, from an all-linear target) is merged into its copy, which is what PEFT loads."""
    layers = delta_layers(model)
    tensors = {}
    for path in _inside(model_modules(model), heads):
        layer = layers.get(path)
        merging = layer is not None and name in layer.deltas and name not in layer.merged
        if merging:
            layer.merge([name], keep_exact=True)
        try:
            module = layer.base if layer is not None else model.get_submodule(path)
            for param_name, value in module.named_parameters(recurse=False):
                tensors[f"{prefix}{path}.{param_name}"] = value.detach().clone()
        finally:
            if merging:
                layer.unmerge([name])
    return tensors


def export_saved_modules(model: nn.Module, name: str, prefix: str = KEY_PREFIX) -> tuple[list[str], dict[str, Tensor]]:
    """The PEFT ``modules_to_save`` entries and tensors of the full copies in delta ``name``
    (keys under ``prefix``: module-level tuners nest the model one level deeper than prompts).

    deltatune copies each module with parameters of its own; PEFT wraps (and copies) a whole
    sub-tree per entry and cannot wrap a module inside one it already wrapped, so the entries are
    the outermost copied modules: the keys of the sub-tree's parameters are the same."""
    paths, tensors = [], {}
    for path, layer in delta_layers(model).items():
        delta = layer.deltas[name] if name in layer.deltas else None
        if isinstance(delta, ParameterCopy):
            paths.append(path)
            for param_name, value in delta.copies.items():
                tensors[f"{prefix}{path}.{param_name}"] = value.detach()
    roots = [p for p in paths if not any(p.startswith(q + ".") for q in paths)]
    modules = model_modules(model)
    selected = saved_roots(modules, roots)
    if set(_inside(modules, selected)) != set(paths):
        raise CheckpointError(
            f"delta {name!r} trains full copies of {', '.join(roots)}, but PEFT, which matches modules_to_save "
            f"entries as plain suffixes of module paths, would also copy {', '.join(p for p in selected if p not in roots)}"
        )
    heads = [h for h in peft_task_heads(model) if h not in roots]
    tensors.update(_task_head_copies(model, name, heads, prefix))
    return roots + heads, tensors


# LoRA --------------------------------------------------------------------------------------------

# only these leave the base weights as they are; PiSSA, OLoRA, CorDA and LoftQ initialisations
# rewrite W0 into a residual, so their adapters only apply to that rewritten base
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


@register
class LoraConverter(Converter):
    peft_type = "LORA"
    methods = ("lora",)
    translated = frozenset({
        "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias", "rank_pattern", "alpha_pattern",
        "target_modules", "exclude_modules", "modules_to_save", "fan_in_fan_out", "layers_to_transform",
        "layers_pattern", "init_lora_weights",
    })
    training_only = frozenset({
        "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size", "megatron_core",
        "ensure_weight_tying",
    })
    honoured_values = {
        "bias": ("none", "lora_only"),
        "init_lora_weights": _PLAIN_INITS,
        "lora_bias": (False,),
        "use_qalora": (False,),
        "use_bdlora": (None, False),
        "layer_replication": (None,),
        "megatron_config": (None,),
        "target_parameters": (None, []),
        "trainable_token_indices": (None,),
        "alora_invocation_tokens": (None,),
        "arrow_config": (None,),
        "kasa_config": (None,),
        "velora_config": (None,),
        "monteclora_config": (None,),
    }

    def read(self, model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]) -> Imported:
        modules = model_modules(model)
        table = KeyTable()
        base_weights = {}
        saved = saved_module_paths(modules, config.get("modules_to_save"))
        copied = set(saved)
        for path, module in modules.items():
            backend = backend_for(module)
            # PEFT never adapts a module inside modules_to_save: its keys there are the copies'
            if backend is None or not backend.is_linear_map or path in copied:
                continue
            if backend.kind == "embedding":
                table.add(f"{path}.lora_embedding_A", path, "A")
                table.add(f"{path}.lora_embedding_B", path, "B")
            else:
                table.add(f"{path}.lora_A.weight", path, "A")
                table.add(f"{path}.lora_B.weight", path, "B")
                table.add(f"{path}.lora_magnitude_vector", path, "magnitude")
            # PEFT also saves the input and output embeddings whole when it adapts them (a LoRA on
            # embed_tokens or lm_head): their base layer's weight, and bias, if any
            weight = getattr(module, "weight", None)
            if isinstance(weight, Tensor) and weight.is_floating_point():
                table.add(f"{path}.base_layer.weight", path, "base weight")
                base_weights[path] = weight
            if backend.bias is not None:
                table.add(f"{path}.base_layer.bias", path, "delta_bias")
                table.add(f"{path}.bias", path, "delta_bias")  # PEFT before 0.7
        add_saved_modules(table, modules, saved)
        states = table.split(tensors)
        notes = []
        for path, state in states.items():
            base = state.pop("base weight", None)
            if base is not None:
                if base.shape != base_weights[path].shape or not torch.equal(
                    base.to(base_weights[path].dtype), base_weights[path].detach().cpu()
                ):
                    raise CheckpointError(
                        f"the adapter carries its own weight for {path} (base_layer.weight), which differs from this "
                        "model's (a resized or retrained vocabulary); load it onto the base model it was trained with"
                    )
                notes.append(f"{path}: the stored base weight equals this model's; not needed")
            if "delta_bias" in state:
                bias = modules[path].bias.detach().cpu()
                if config.get("bias") == "lora_only":
                    state["delta_bias"] = state["delta_bias"].float() - bias.float()
                elif base is not None and torch.equal(state["delta_bias"].to(bias.dtype), bias):
                    del state["delta_bias"]  # saved along with the embedding layer's weight, unchanged
                else:
                    raise CheckpointError(f"the adapter stores a bias for {path} but its config has bias={config.get('bias')!r}")
        states = {p: s for p, s in states.items() if s}

        dora = bool(config.get("use_dora", False))
        rslora = bool(config.get("use_rslora", False))
        r, alpha = int(config["r"]), config.get("lora_alpha", 8)
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        lora_paths = [p for p in states if p not in copied]
        for path in lora_paths:
            state = states[path]
            if set(state) - {"delta_bias"} and not {"A", "B"} <= set(state):
                raise CheckpointError(f"the adapter stores {sorted(state)} for {path}; LoRA needs both lora_A and lora_B")
            key = peft_pattern_key(rank_pattern, path)
            expected_r = rank_pattern[key] if key is not None else r
            if state["A"].shape[0] != expected_r:
                raise CheckpointError(
                    f"{path}: lora_A has rank {state['A'].shape[0]} but the config gives r={expected_r} there"
                )
            if dora != ("magnitude" in state):
                raise CheckpointError(f"{path}: use_dora={dora} but the magnitude vector is {'missing' if dora else 'present'}")
            if dora and backend_for(modules[path]).kind == "embedding":
                raise CheckpointError(f"{path}: use_dora on an Embedding layer is not implemented in deltatune")
        biases = {"delta_bias" in states[p] for p in lora_paths}
        if len(biases) > 1:
            raise CheckpointError("bias='lora_only' needs a bias for every adapted layer; some of these layers have none")
        lora = LoRAConfig(
            targets=peft_targets(config.get("target_modules")) if not config.get("layers_to_transform") else tuple(
                peft_name_pattern(p) for p in lora_paths
            ),
            exclude=peft_targets(config.get("exclude_modules")) or (),
            modules_to_save=deltatune_saved_patterns(config.get("modules_to_save"), modules),
            r=r, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0)), rslora=rslora, dora=dora,
            bias="targets" if biases == {True} else "none",
            rank_pattern={_peft_regex(k): v for k, v in rank_pattern.items()},
            alpha_pattern={_peft_regex(k): v for k, v in alpha_pattern.items()},
        )
        return Imported(lora, states, notes)

    def write(self, model: nn.Module, name: str) -> Exported:
        info = deltas(model)[name]
        config: LoRAConfig = info.config
        layers = delta_layers(model)
        modules = model_modules(model)
        tensors: dict[str, Tensor] = {}
        ranks: dict[str, int] = {}
        alphas: dict[str, float] = {}
        lora_paths = []
        heads = _inside(modules, peft_task_heads(model))  # exported as full copies
        for path in info.paths:
            delta = layers[path].deltas[name]
            if isinstance(delta, ParameterCopy) or path in heads:
                continue
            lora_paths.append(path)
            a, b = (t.detach() for t in delta.factors())  # PiSSA: an exact rank-2r LoRA
            ranks[path] = a.shape[0]
            alphas[path] = delta.scale * (math.sqrt(a.shape[0]) if config.rslora else a.shape[0])
            backend = backend_for(modules[path])
            if backend.kind == "embedding":
                tensors[f"{KEY_PREFIX}{path}.lora_embedding_A"] = a
                tensors[f"{KEY_PREFIX}{path}.lora_embedding_B"] = b
            else:
                tensors[f"{KEY_PREFIX}{path}.lora_A.weight"] = a
                tensors[f"{KEY_PREFIX}{path}.lora_B.weight"] = b
            if delta.magnitude is not None:
                tensors[f"{KEY_PREFIX}{path}.lora_magnitude_vector"] = delta.magnitude.detach()
            if delta.delta_bias is not None:
                tensors[f"{KEY_PREFIX}{path}.base_layer.bias"] = (backend.bias.detach().float() + delta.delta_bias.detach().float()).to(
                    backend.bias.dtype
                )
        saved, saved_tensors = export_saved_modules(model, name)
        tensors.update(saved_tensors)
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        candidates = [p for p, m in modules.items() if (bk := backend_for(m)) is not None and bk.is_linear_map]
        return Exported(
            {
                "r": r,
                "lora_alpha": _plain_number(alpha),
                "lora_dropout": config.dropout,
                "use_rslora": config.rslora,
                "use_dora": config.dora,
                "bias": "lora_only" if config.bias == "targets" else "none",
                "target_modules": exact_names(lora_paths, candidates),
                "modules_to_save": saved or None,
                "rank_pattern": {_exact(p): v for p, v in ranks.items() if v != r},
                "alpha_pattern": {_exact(p): _plain_number(v) for p, v in alphas.items() if v != alpha},
                "fan_in_fan_out": any(backend_for(modules[p]).kind == "conv1d" for p in lora_paths),
                "init_lora_weights": True,
                "lora_bias": False,
            },
            tensors,
        )


def _peft_regex(key: str) -> str:
    """PEFT's rank/alpha pattern key (a regex matched against a dotted suffix) in deltatune's language."""
    return f"re:(?:.*\\.)?(?:{key})"


def _exact(path: str) -> str:
    """A PEFT pattern key matching exactly the module ``path`` (anchored at a dotted suffix by PEFT)."""
    return re.escape(path)


def _plain_number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


# (IA)³ -------------------------------------------------------------------------------------------


@register
class IA3Converter(Converter):
    peft_type = "IA3"
    methods = ("ia3",)
    translated = frozenset({"target_modules", "feedforward_modules", "exclude_modules", "modules_to_save", "fan_in_fan_out"})
    training_only = frozenset({"init_ia3_weights"})

    def read(self, model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]) -> Imported:
        modules = model_modules(model)
        table = KeyTable()
        saved = saved_module_paths(modules, config.get("modules_to_save"))
        copied = set(saved)
        for path, module in modules.items():
            backend = backend_for(module)
            if backend is not None and backend.is_linear_map and backend.takes_activations and path not in copied:
                table.add(f"{path}.ia3_l", path, "scale")
        add_saved_modules(table, modules, saved)
        states = table.split(tensors)
        input_scaled = []
        for path, state in states.items():
            if path in saved:
                continue
            vector = state["scale"]
            as_input = vector.dim() == 2 and vector.shape[0] == 1
            if as_input != peft_selects(config.get("feedforward_modules"), path):
                raise CheckpointError(
                    f"{path}: ia3_l has shape {tuple(vector.shape)}, which does not agree with feedforward_modules"
                )
            state["scale"] = vector.reshape(-1)
            if as_input:
                input_scaled.append(path)
        ia3 = IA3Config(
            targets=peft_targets(config.get("target_modules")),
            exclude=peft_targets(config.get("exclude_modules")) or (),
            modules_to_save=deltatune_saved_patterns(config.get("modules_to_save"), modules),
            feedforward=tuple(peft_name_pattern(p) for p in input_scaled),
        )
        return Imported(ia3, states)

    def write(self, model: nn.Module, name: str) -> Exported:
        info = deltas(model)[name]
        layers = delta_layers(model)
        modules = model_modules(model)
        tensors: dict[str, Tensor] = {}
        scaled, feedforward = [], []
        heads = _inside(modules, peft_task_heads(model))  # exported as full copies
        for path in info.paths:
            delta = layers[path].deltas[name]
            if isinstance(delta, ParameterCopy) or path in heads:
                continue
            scaled.append(path)
            vector = delta.scale.detach()
            if delta.scale_input:
                feedforward.append(path)
            tensors[f"{KEY_PREFIX}{path}.ia3_l"] = vector[None, :] if delta.scale_input else vector[:, None]
        saved, saved_tensors = export_saved_modules(model, name)
        tensors.update(saved_tensors)
        candidates = [
            p for p, m in modules.items()
            if (bk := backend_for(m)) is not None and bk.is_linear_map and bk.takes_activations
        ]
        return Exported(
            {
                "target_modules": exact_names(scaled, candidates),
                "feedforward_modules": exact_names(feedforward, scaled) if feedforward else [],
                "modules_to_save": saved or None,
                "fan_in_fan_out": any(backend_for(modules[p]).kind == "conv1d" for p in scaled),
                "init_ia3_weights": True,
            },
            tensors,
        )
