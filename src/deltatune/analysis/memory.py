"""A first-order training-memory estimate, from parameter counts and the model config alone.

Lines (bytes):
* weights: every base parameter at the model's dtype size;
* delta weights, gradients: trainable parameters at their dtype size, once each;
* optimizer: AdamW keeps two fp32 moments per trainable parameter (8 bytes);
* activations: per transformer layer, s·b·h·(34 + 5·a·s/h) bytes at 16-bit (Korthikanti et
  al. 2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 1), doubled
  at 32-bit; with gradient checkpointing only each layer's input (2·s·b·h at 16-bit) is kept,
  plus one layer's full activations during recomputation.
It ignores allocator fragmentation and framework overhead, so treat it as a lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class MemoryEstimate:
    lines: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(b for _, b in self.lines)

    def __str__(self) -> str:
        width = max(len(name) for name, _ in self.lines)
        rows = [f"{name.ljust(width)}  {_human(b):>10}" for name, b in self.lines]
        return "\n".join(rows + [f"{'total'.ljust(width)}  {_human(self.total):>10}"])


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError("unreachable")


def estimate_training_memory(
    model: nn.Module, *, batch_size: int = 8, seq_len: int = 256, gradient_checkpointing: bool = False
) -> MemoryEstimate:
    frozen = trainable = 0
    seen = set()
    weight_bytes = 4
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        size = p.numel() * p.element_size()
        if p.requires_grad:
            trainable += size
        else:
            frozen += size
            weight_bytes = p.element_size()
    trainable_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None) or getattr(config, "n_embd", 0)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None) or getattr(config, "n_layer", 0)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", None) or getattr(config, "n_head", 1)
    s, b, h, a = seq_len, batch_size, hidden, heads
    scale = weight_bytes / 2
    per_layer = int(s * b * h * (34 + 5 * a * s / max(h, 1)) * scale)
    if gradient_checkpointing:
        activations = int(layers * 2 * s * b * h * scale) + per_layer
    else:
        activations = layers * per_layer
    return MemoryEstimate((
        ("base weights", frozen),
        ("delta weights", trainable),
        ("gradients", trainable),
        ("optimizer (AdamW, fp32)", 8 * trainable_count),
        (f"activations (b={b}, s={s}{', checkpointed' if gradient_checkpointing else ''})", activations),
    ))
