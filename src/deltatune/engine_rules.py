"""What vLLM and SGLang accept of a PEFT LoRA adapter, checked before it is written.

PEFT writes adapters that these engines refuse only when they load them, at deploy time (vLLM
refuses DoRA and ``modules_to_save``; both serve LoRA alone). :func:`check` reads the PEFT
config and tensors an export would write, and returns every problem with its fix, so that
``deltatune export --format peft --target vllm`` fails before writing anything.

The rules, per engine (from each engine's adapter loader):

* a LoRA adapter (``peft_type`` LORA): neither engine serves (IA)³ or prompt methods;
* no DoRA magnitude (``use_dora``);
* no full copies of modules (``modules_to_save``);
* no bias (``bias`` "none"): vLLM's adapter config takes only "none";
* one scale for every module: both engines scale each module by the one ``lora_alpha / r``,
  so ``rank_pattern`` / ``alpha_pattern`` would be read with the wrong scale;
* targets are linear layers of the attention and feed-forward blocks: their LoRA layers wrap
  those, not the embedding, the output head or other layers;
* vLLM: the rank at most 512, the largest ``--max-lora-rank`` it accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .anatomy import ROLE_GROUPS, analyze
from .peft_format import KEY_PREFIX

ENGINES = ("vllm", "sglang")

#: vLLM's accepted values of --max-lora-rank
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

_MERGED = "export the merged model instead (deltatune merge), which every engine serves"


@dataclass(frozen=True)
class Problem:
    """One thing the engine refuses, and how to fix it."""

    rule: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.message}. Fix: {self.fix}"


def _adapted_paths(tensors: dict[str, Tensor]) -> list[str]:
    paths = []
    for key in tensors:
        for suffix in (".lora_A.weight", ".lora_embedding_A"):
            if key.endswith(suffix):
                paths.append(key.removeprefix(KEY_PREFIX).removesuffix(suffix))
    return paths


def check(engine: str, model: nn.Module, peft_type: str, config: dict[str, Any], tensors: dict[str, Tensor]) -> list[Problem]:
    """Every reason ``engine`` would refuse this PEFT adapter (``config`` and ``tensors`` as the
    PEFT export writes them, for ``model``); empty when it serves it."""
    name = {"vllm": "vLLM", "sglang": "SGLang"}[engine]
    if peft_type != "LORA":
        return [Problem("lora-only", f"{name} serves LoRA adapters only, and this is a PEFT {peft_type} adapter", _MERGED)]
    problems = []
    if config.get("use_dora"):
        problems.append(Problem(
            "no-dora", f"{name} does not apply DoRA's magnitude vector (use_dora)",
            "merge the DoRA delta into the weights and serve the merged model (deltatune merge), or retrain with --no-dora"))
    if config.get("modules_to_save"):
        problems.append(Problem(
            "no-modules-to-save", f"{name} does not load full copies of modules (modules_to_save: "
            f"{', '.join(config['modules_to_save'])})", f"{_MERGED}, or retrain without modules_to_save"))
    if config.get("bias", "none") != "none":
        problems.append(Problem(
            "no-bias", f"{name} loads LoRA adapters without a bias (this one has bias={config['bias']!r})",
            f"{_MERGED}, or retrain with --bias none"))
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        varied = sorted({*config.get("rank_pattern", {}), *config.get("alpha_pattern", {})})
        problems.append(Problem(
            "one-scale", f"{name} scales every module by one lora_alpha/r, but this adapter's rank or alpha differs on "
            f"{len(varied)} module(s) ({', '.join(varied[:3])})", f"{_MERGED}, or retrain with one r and alpha"))
    anatomy = analyze(model)
    block_roles = set(ROLE_GROUPS["attn"]) | set(ROLE_GROUPS["ffn"])
    outside = [p for p in _adapted_paths(tensors) if anatomy.role_of.get(p) not in block_roles]
    if outside:
        problems.append(Problem(
            "block-targets", f"{name} applies LoRA to the attention and feed-forward projections only, not to "
            f"{', '.join(outside[:3])}" + (f" (and {len(outside) - 3} more)" if len(outside) > 3 else ""),
            f"retrain with --targets attn,ffn (or --exclude {','.join(sorted({p.rsplit('.', 1)[-1] for p in outside}))}), or {_MERGED}"))
    if engine == "vllm":
        rank = max([int(config.get("r", 0)), *config.get("rank_pattern", {}).values()])
        if rank > VLLM_MAX_LORA_RANKS[-1]:
            problems.append(Problem(
                "max-rank", f"vLLM serves ranks up to {VLLM_MAX_LORA_RANKS[-1]} (--max-lora-rank), and this adapter has r={rank}",
                f"retrain with --r {VLLM_MAX_LORA_RANKS[-1]} or less, or {_MERGED}"))
    return problems


def serve_rank(config: dict[str, Any]) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds this adapter's rank."""
    rank = max([int(config.get("r", 0)), *config.get("rank_pattern", {}).values()])
    return next(v for v in VLLM_MAX_LORA_RANKS if v >= rank)


def save_for(engine: str, model: nn.Module, path, names=None) -> list:
    """Write the model's deltas as PEFT adapters ``engine`` serves (:func:`deltatune.save` with
    ``format="peft"``), or raise, before writing anything, naming every problem and its fix."""
    from .api import chosen_names, deltas
    from .config import check_choice
    from .errors import CheckpointError
    from .io import save
    from .peft_format import exporter_for

    check_choice("target", engine, ENGINES)
    infos = deltas(model)
    problems = []
    for name in chosen_names(model, names, infos):
        converter = exporter_for(infos[name].config.method)
        exported = converter.write(model, name)
        problems += [f"delta {name!r}: {p}" for p in check(engine, model, converter.peft_type, exported.config, exported.tensors)]
    if problems:
        raise CheckpointError(f"{engine} would refuse this adapter:\n  " + "\n  ".join(problems))
    return save(model, path, names, format="peft")
