"""Weighted combinations of attached deltas into a new delta (task arithmetic, TIES, DARE).

Given deltas 1..K of one method on one model and weights w_i (negative allowed: task
arithmetic, Ilharco et al., 2023, "Editing Models with Task Arithmetic", subtracts a task), the
new delta's update per module is built from the task vectors τ_i = ΔW_i (zero where delta i
does not adapt the module):

* ``linear`` (LoRA):  ΔW = Σ w_i s_i B_i A_i, exactly, as one LoRA of rank Σ r_i with
  A = [A_1; ...; A_K], B = [w_1 s_1 B_1, ..., w_K s_K B_K] and scale 1. Adding the A's and the
  B's separately instead would give (Σ B_i)(Σ A_i), whose cross terms B_i A_j belong to no task.
* ``svd`` (LoRA): ΔW = Σ w_i τ_i, refactored by a truncated SVD to rank k (default: the
  largest input rank): B = U_k Σ_k, A = V_kᵀ — the best rank-k approximation (Eckart–Young).
* ``ties`` (Yadav et al., 2023, "TIES-Merging: Resolving Interference When Merging Models"):
  trim each τ_i to its ``density`` fraction of largest magnitudes, elect per entry the sign
  γ = sgn(Σ_i w_i τ̂_i), and average the weighted entries that agree with it:
  ΔW = Σ_{i: sgn(w_i τ̂_i) = γ} w_i τ̂_i / |{i: sgn(w_i τ̂_i) = γ, τ̂_i ≠ 0}|, then rank k by SVD.
* ``dare_linear`` / ``dare_ties`` (Yu et al., 2024, "Language Models are Super Mario: Absorbing
  Abilities from Homologous Models as a Free Lunch"): drop each entry of τ_i with probability
  1 − density and rescale the rest by 1/density (unbiased: E[τ̃_i] = τ_i), then sum linearly or
  by TIES' election, then rank k by SVD.
* (IA)³: the new vector is l = Σ w_i l_i (``linear`` only), with l_i = 1 where delta i does not
  adapt the module.

LoRA bias deltas (``bias="targets"``) combine as Δb = Σ w_i Δb_i in every combination.

DoRA deltas cannot be combined (each one's magnitude renormalises its own W + ΔW); nor can
methods other than LoRA and (IA)³.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import torch
from torch import Tensor, nn

from .anatomy import check_model
from .api import attach, deltas
from .config import check_choice, check_number
from .errors import ConfigError
from .layer import delta_layers
from .methods.ia3 import IA3Config, IA3Delta
from .methods.lora import LoRAConfig, LoRADelta

COMBINATIONS = ("linear", "svd", "ties", "dare_linear", "dare_ties")


def combine(
    model: nn.Module,
    weights: Mapping[str, float],
    name: str,
    *,
    combination: str = "linear",
    rank: int | None = None,
    density: float = 1.0,
    seed: int = 0,
    activate: bool = False,
) -> nn.Module:
    """Attach a new delta ``name`` combining the deltas named in ``weights`` (name -> weight).

    ``rank`` is the new LoRA rank for ``svd``, ``ties`` and the ``dare_*`` combinations;
    ``density`` the fraction of each task vector kept by TIES' trimming and DARE's dropping;
    ``seed`` makes DARE's random drop reproducible. The inputs stay attached, unchanged. See the
    module docstring for the equations.
    """
    check_model("combine", model)
    check_choice("combination", combination, COMBINATIONS)
    if not weights:
        raise ConfigError("combine needs at least one delta name with its weight")
    for source, weight in weights.items():
        check_number(f"the weight of {source!r}", weight)
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density!r}")
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    infos = deltas(model)
    for source in weights:
        if source not in infos:
            raise ConfigError(f"no delta named {source!r} on this model; attached deltas: {', '.join(infos) or 'none'}")
    methods = {infos[n].config.method for n in weights}
    if len(methods) > 1:
        raise ConfigError(f"combine needs deltas of one method; got {', '.join(sorted(methods))}")
    method = methods.pop()
    if method not in ("lora", "ia3"):
        raise ConfigError(f"combining {method!r} deltas is not implemented; combinable methods: lora, ia3")
    if method == "ia3" and combination != "linear":
        raise ConfigError(f"(IA)³ vectors combine linearly only (combination='linear'), got {combination!r}")
    if any(infos[n].config.dora for n in weights if method == "lora"):
        raise ConfigError("DoRA deltas cannot be combined: each magnitude vector renormalises its own W + ΔW")
    if any(infos[n].merged for n in weights):
        raise ConfigError("unmerge the deltas before combining them")
    paths = list(dict.fromkeys(p for n in weights for p in infos[n].paths))
    layers = delta_layers(model)
    if method == "ia3":
        return _combine_ia3(model, weights, name, paths, layers, activate)
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for path in paths:
        present = {n: layers[path].deltas[n] for n in weights if n in layers[path].deltas}
        if combination == "linear":
            factors[path] = _concatenated(present, weights)
        else:
            target_rank = rank or max(d.A.shape[0] for d in present.values())
            task_vectors = [weights[n] * d.delta_weight() for n, d in present.items()]
            if combination.startswith("dare"):
                task_vectors = [_dare(t, density, generator) for t in task_vectors]
            elif combination == "ties":
                task_vectors = [_trim(t, density) for t in task_vectors]
            if combination in ("ties", "dare_ties"):
                merged = _disjoint_mean(task_vectors)
            else:
                merged = torch.stack(task_vectors).sum(0)
            factors[path] = _low_rank(merged, target_rank)
    # bias deltas (bias="targets") add up like the weights: Δb = Σ w_i Δb_i
    biases = {
        path: sum(
            weights[n] * layers[path].deltas[n].delta_bias.detach().float()
            for n in weights if n in layers[path].deltas and layers[path].deltas[n].delta_bias is not None
        )
        for path in paths
    }
    has_bias = any(infos[n].config.bias == "targets" for n in weights)
    ranks = {p: a.shape[0] for p, (a, _) in factors.items()}
    r = max(ranks.values())
    config = LoRAConfig(
        r=r, alpha=float(r), rank_pattern={_exact(p): k for p, k in ranks.items() if k != r},
        alpha_pattern={_exact(p): float(k) for p, k in ranks.items() if k != r},
        bias="targets" if has_bias else "none", param_dtype=infos[next(iter(weights))].config.param_dtype,
    )
    attach(model, config, name, activate=activate, paths=paths, initialize=False)
    with torch.no_grad():
        for path, (a, b) in factors.items():
            delta: LoRADelta = layers[path].deltas[name]
            delta.A.copy_(a.to(delta.A.dtype))
            delta.B.copy_(b.to(delta.B.dtype))
            if has_bias:
                delta.delta_bias.copy_(torch.as_tensor(biases[path]).to(delta.delta_bias.dtype))
    return model


def _exact(path: str) -> str:
    return "re:" + re.escape(path)


def _concatenated(present: dict[str, LoRADelta], weights: Mapping[str, float]) -> tuple[Tensor, Tensor]:
    """A = [A_1; ...], B = [w_1 s_1 B_1, ...]: Σ w_i ΔW_i with scale 1 (PiSSA deltas bring their
    stacked factors, see :meth:`LoRADelta.factors`)."""
    a_parts, b_parts = [], []
    for n, delta in present.items():
        a, b = delta.factors()
        a_parts.append(a.detach().float())
        b_parts.append(weights[n] * delta.scale * b.detach().float())
    return torch.cat(a_parts), torch.cat(b_parts, dim=1)


def _low_rank(dense: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(A, B) with B A the best rank-``rank`` approximation of ``dense``; zero-padded if the
    matrix is smaller than the rank."""
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    k = min(rank, s.shape[0])
    a = torch.zeros(rank, dense.shape[1])
    b = torch.zeros(dense.shape[0], rank)
    a[:k] = vh[:k]
    b[:, :k] = u[:, :k] * s[:k]
    return a, b


def _trim(task_vector: Tensor, density: float) -> Tensor:
    """Keep the ``density`` fraction of entries largest in magnitude, zero the rest."""
    keep = max(1, math.ceil(density * task_vector.numel()))
    if keep >= task_vector.numel():
        return task_vector
    threshold = task_vector.abs().flatten().kthvalue(task_vector.numel() - keep + 1).values
    return torch.where(task_vector.abs() >= threshold, task_vector, torch.zeros_like(task_vector))


def _dare(task_vector: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """Drop entries with probability 1 − density, rescale the kept ones by 1/density."""
    if density == 1.0:
        return task_vector
    kept = torch.rand(task_vector.shape, generator=generator) < density
    return torch.where(kept, task_vector / density, torch.zeros_like(task_vector))


def _disjoint_mean(weighted: list[Tensor]) -> Tensor:
    """TIES' elect-and-merge over already weighted task vectors: per entry, the mean of the
    non-zero entries whose sign agrees with the sign of their sum."""
    stacked = torch.stack(weighted)
    elected = torch.sign(stacked.sum(0))
    agrees = (torch.sign(stacked) == elected) & (stacked != 0)
    total = torch.where(agrees, stacked, torch.zeros_like(stacked)).sum(0)
    return total / agrees.sum(0).clamp_min(1)


def _combine_ia3(model, weights, name, paths, layers, activate) -> nn.Module:
    vectors, feedforward = {}, []
    for path in paths:
        present: dict[str, IA3Delta] = {n: layers[path].deltas[n] for n in weights if n in layers[path].deltas}
        sides = {d.scale_input for d in present.values()}
        if len(sides) > 1:
            raise ConfigError(f"{path}: some deltas scale its input and others its output; they cannot be combined")
        size = next(iter(present.values())).scale.shape
        ones = torch.ones(size)
        vectors[path] = sum(weights[n] * (present[n].scale.detach().float() if n in present else ones) for n in weights)
        if sides.pop():
            feedforward.append(path)
    config = IA3Config(feedforward=tuple(_exact(p) for p in feedforward))
    attach(model, config, name, activate=activate, paths=paths, initialize=False)
    with torch.no_grad():
        for path, vector in vectors.items():
            delta = layers[path].deltas[name]
            delta.scale.copy_(vector.to(delta.scale.dtype))
    return model
