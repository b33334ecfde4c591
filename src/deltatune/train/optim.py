"""Optimizers by name: AdamW, and bitsandbytes' 8-bit and paged AdamW.

* ``adamw``: ``torch.optim.AdamW``, two fp32 moments per trainable parameter (8 bytes).
* ``adamw_8bit``: block-wise 8-bit moments (Dettmers et al., 2022, "8-bit Optimizers via
  Block-wise Quantization"): 2 bytes per parameter plus one fp32 scale per block of 256.
* ``paged_adamw`` / ``paged_adamw_8bit``: the same updates with the moments in CUDA unified
  memory, paged out to CPU RAM when the GPU runs short (QLoRA §3, "paged optimizers").

Paging needs CUDA. Without it, a paged name runs its unpaged equivalent (``paged_adamw`` →
``adamw``, ``paged_adamw_8bit`` → ``adamw_8bit``, the same update rule) and says so: a
:class:`OptimizerFallbackWarning` from the library, a printed line in ``deltatune train``, and
the optimizer actually used in the run summary.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn

from ..errors import ConfigError

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")
UNPAGED = {"paged_adamw": "adamw", "paged_adamw_8bit": "adamw_8bit"}


class OptimizerFallbackWarning(UserWarning):
    """A paged optimizer was asked for where nothing can be paged (no CUDA)."""


def check_optimizer(name: str) -> None:
    if name not in OPTIMIZERS:
        raise ConfigError(f"optim={name!r} is not valid; allowed: {', '.join(OPTIMIZERS)}")


def make_optimizer(
    name: str, params: Iterable[nn.Parameter], *, lr: float, weight_decay: float = 0.0
) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer called ``name`` over ``params``, and the name of the one actually built
    (different only for a paged optimizer on parameters outside CUDA)."""
    check_optimizer(name)
    params = list(params)
    used = name
    if name in UNPAGED and not all(p.device.type == "cuda" for p in params):
        used = UNPAGED[name]
        warnings.warn(
            f"{name} pages optimizer state through CUDA unified memory, and these parameters are not on a "
            f"CUDA device; using {used} (the same update, state not paged)",
            OptimizerFallbackWarning, stacklevel=2,
        )
    if used == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), used
    from ..quant import require_bitsandbytes

    bnb = require_bitsandbytes()
    kind = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
            "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[used]
    return kind(params, lr=lr, weight_decay=weight_decay), used
