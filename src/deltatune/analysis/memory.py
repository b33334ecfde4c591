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

Measured peaks come from :func:`peak_memory_bytes` and :func:`reset_peak_memory`.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory since the last :func:`reset_peak_memory`: CUDA's peak allocation, or on CPU
    the process's peak resident set size (which includes Python, torch and the data, so compare
    runs made the same way)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def reset_peak_memory(device: torch.device) -> bool:
    """Start measuring the peak afresh, so that loading (which on CPU maps and converts the whole
    checkpoint) does not hide the peak of what follows; returns whether it could. On CPU this
    needs Linux's /proc/self/clear_refs; elsewhere the peak stays the whole process's."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    clear_refs = Path("/proc/self/clear_refs")
    if not clear_refs.exists():
        return False
    gc.collect()
    trim_heap()  # glibc keeps freed loading buffers resident; they are not what follows
    clear_refs.write_text("5")  # 5: reset the peak resident set size to the current one
    return True


def trim_heap() -> None:
    """Hand the heap memory freed so far back to the system (glibc only; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.malloc_trim(0)


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


#: formats the weight table compares: bytes per weight of a quantized linear layer, from the
#: storage formulas of :mod:`deltatune.quant` (block constants included)
WEIGHT_FORMATS = ("fp32", "bf16", "int8", "nf4", "nf4+dq")


@dataclass(frozen=True)
class WeightMemory:
    """Memory of weights, deltas and optimizer state in several storage formats (bytes)."""

    formats: tuple[str, ...]
    rows: tuple[tuple[str, tuple[int, ...]], ...]

    def total(self, index: int) -> int:
        return sum(values[index] for _, values in self.rows)

    def __str__(self) -> str:
        width = max(len(name) for name, _ in self.rows + (("total", ()),))
        head = f"{''.ljust(width)}  " + "  ".join(f"{f:>10}" for f in self.formats)
        lines = [head] + [
            f"{name.ljust(width)}  " + "  ".join(f"{_human(v):>10}" for v in values) for name, values in self.rows
        ]
        lines.append(f"{'total'.ljust(width)}  " + "  ".join(f"{_human(self.total(i)):>10}" for i in range(len(self.formats))))
        return "\n".join(lines)


def _quantized_bytes(fmt: str, out_features: int, in_features: int, float_bytes: int) -> tuple[int, int]:
    """(codes, constants) of one linear weight stored in ``fmt``: blocks of 64 with an fp32
    absmax (nf4), or those absmax in 8 bits per blocks of 256 with fp32 constants (nf4+dq), or
    int8 with one fp32 scale per row."""
    n = out_features * in_features
    if fmt in ("fp32", "bf16"):
        return n * float_bytes, 0
    if fmt == "int8":
        return n, 4 * out_features
    blocks = -(-n // 64)
    if fmt == "nf4":
        return -(-n // 2), 4 * blocks + 16 * 4
    return -(-n // 2), blocks + 4 * -(-blocks // 256) + 16 * 4 + 256 * 4 + 4


def weight_memory(model: nn.Module, *, optimizer: str = "adamw", skip: tuple[str, ...] = ("head",)) -> WeightMemory:
    """What the model's weights take in fp32, bf16, int8, NF4 and NF4 with double quantization
    (the linear layers quantized as :func:`deltatune.quantize` would; "other weights" are the
    embeddings, norms and head, at 16 bits in the bf16 column and 32 bits elsewhere, as
    :func:`deltatune.prepare_for_kbit_training` keeps them), with the deltas attached (fp32),
    their gradients and the optimizer state. Works on the meta device: only shapes are read."""
    from ..anatomy import iter_modules
    from ..backends import backend_for
    from ..quant import quantizable_layers

    quantizable = quantizable_layers(model, skip)
    linear = [(backend_for(m).out_features, backend_for(m).in_features) for _, m in quantizable]
    seen = {id(m.weight) for _, m in quantizable}
    other = 0
    for _, module in iter_modules(model):
        for p in module.parameters(recurse=False):
            if id(p) not in seen and not p.requires_grad:
                seen.add(id(p))
                other += p.numel()
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    state_bytes = {"adamw": 8, "paged_adamw": 8}.get(optimizer, 2)
    state = trainable * state_bytes + (0 if state_bytes == 8 else 2 * 4 * -(-trainable // 256))
    formats = WEIGHT_FORMATS
    per_format = [[_quantized_bytes(f, o, i, 2 if f == "bf16" else 4) for o, i in linear] for f in formats]
    rest_bytes = [other * (2 if f == "bf16" else 4) for f in formats]
    return WeightMemory(formats, (
        ("linear weights", tuple(sum(c for c, _ in fmt) for fmt in per_format)),
        ("quant. constants", tuple(sum(k for _, k in fmt) for fmt in per_format)),
        ("other weights", tuple(rest_bytes)),
        ("delta weights", (4 * trainable,) * len(formats)),
        ("delta gradients", (4 * trainable,) * len(formats)),
        (f"optim. ({optimizer})", (state,) * len(formats)),
    ))
