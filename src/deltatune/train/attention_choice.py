"""Which attention implementation a run trains with: the one measured fastest on its own batch.

Which is fastest depends on the device, the dtype and the sequence length, not on the model
alone: on a 2-core CPU with AVX512-BF16, SmolLM2-135M on the demo's ~75-token examples takes
1.30 s per LoRA step with transformers' eager attention and 1.78 s with SDPA (whose CPU flash
kernel's backward dominates at that length), while long sequences and GPUs favour SDPA. So
``attention="auto"`` times a forward and backward of the run's longest training batch with each
candidate, through transformers' documented ``set_attn_implementation``, and keeps the faster.

The timing steps change nothing: the random number generators are forked around them and the
gradients they leave are dropped, so the run that follows computes as it would have. A run
whose deltas wrap a module's call (prefixes, prompts, which read the attention themselves)
keeps the model's own implementation, as does ``attention="model"``.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping

import torch
from torch import nn

from ..config import check_choice
from ..layer import delta_layers

ATTENTION_CHOICES = ("auto", "model", "eager", "sdpa")
#: the implementations ``auto`` times, in the order tried
CANDIDATES = ("sdpa", "eager")


def choose_attention(model: nn.Module, setting: str, batch: Mapping[str, torch.Tensor],
                     loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor],
                     repeats: int = 2) -> tuple[str, dict[str, float]]:
    """Set the attention implementation ``setting`` asks for on ``model``; returns (what it is:
    an implementation's name, or "model" for the model's own, seconds per step of each timed
    candidate)."""
    check_choice("attention", setting, ATTENTION_CHOICES)
    if setting == "model" or not hasattr(model, "set_attn_implementation"):
        return "model", {}
    if setting != "auto":
        model.set_attn_implementation(setting)
        return setting, {}
    if not CANDIDATES or any(d.acts_on == "call" for layer in delta_layers(model).values() for d in layer.deltas.values()):
        return "model", {}
    timings = {name: _seconds_per_step(model, name, batch, loss_fn, repeats) for name in CANDIDATES}
    fastest = min(timings, key=timings.get)
    model.set_attn_implementation(fastest)
    return fastest, timings


def _seconds_per_step(model, name, batch, loss_fn, repeats) -> float:
    model.set_attn_implementation(name)
    trainable = [p for p in model.parameters() if p.requires_grad]
    best = float("inf")
    with torch.random.fork_rng(devices=[batch["input_ids"].device] if batch["input_ids"].is_cuda else []):
        for attempt in range(repeats + 1):  # the first is a warm-up
            started = time.perf_counter()
            loss_fn(model, batch).backward()
            if batch["input_ids"].is_cuda:
                torch.cuda.synchronize()
            if attempt:
                best = min(best, time.perf_counter() - started)
    for p in trainable:
        p.grad = None
    return best
