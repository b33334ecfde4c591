"""A frozen dense layer and a low-rank update computed as one autograd step.

    y = x Wᵀ + b + s · (x Aᵀ) Bᵀ,    A ∈ R^{r×in}, B ∈ R^{out×r}, W frozen

Run as separate modules (the base layer, then the delta's two products and an add), this costs
a (tokens × out) temporary for (x Aᵀ) Bᵀ and another pass to add it, a scaled copy of the
output gradient in the backward, a (tokens × in) temporary for the low-rank part of the input
gradient and a pass to add it, per-forward casts of A and B, and a dozen autograd nodes. Here:

* forward: ``out = x Wᵀ (+ b)``, ``low = x Aᵀ``, then the low-rank product goes straight into
  ``out``;
* backward (g = ∂L/∂y): ``g_low = s·g B``, ``∂L/∂x = g W + g_low A``,
  ``∂L/∂A = g_lowᵀ x``, ``∂L/∂B = s·gᵀ low``; W gets no gradient.

In fp32 each sum is formed in the same order and with the same roundings as the unfused modules
(the products are added with ``add_``, the output gradient is scaled before its products), so
the results are bitwise those of the unfused path. In bf16/fp16, where the unfused path's
roundings are not worth keeping, the low-rank products accumulate inside the matrix products
(``addmm_``) and the scale is applied to the small (tokens × r) factors, which saves two more
passes over (tokens × out) tensors.

LoRA uses it on CPU, where a training step is bound by memory traffic. On CUDA a step of a
small model waits on the CPU instead, and this Python-level autograd function costs more there
than the native operations it replaces (measured on an H200: 225 ms per demo step fused against
181 ms unfused), so LoRA runs unfused on other devices.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LowRankLinear(torch.autograd.Function):
    """``LowRankLinear.apply(x, weight, bias, a, b, scale)``: y = x Wᵀ + b + s·(x Aᵀ) Bᵀ for a
    weight and bias that take no gradient; A and B in any float dtype (cast to W's)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scale: float) -> Tensor:
        compute = weight.dtype
        a_c, b_c = a.to(compute), b.to(compute)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.mm(flat, weight.t()) if bias is None else torch.addmm(bias, flat, weight.t())
        low = torch.mm(flat, a_c.t())
        if compute == torch.float32:
            out.add_(torch.mm(low, b_c.t()), alpha=scale)
        else:
            out.addmm_(low, b_c.t(), alpha=scale)
        ctx.save_for_backward(flat, low, weight, a_c, b_c)
        ctx.scale = scale
        ctx.factor_dtypes = (a.dtype, b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        flat, low, weight, a_c, b_c = ctx.saved_tensors
        scale = ctx.scale
        g = grad_out.reshape(-1, grad_out.shape[-1])
        if weight.dtype == torch.float32:
            scaled = g * scale
            g_low = torch.mm(scaled, b_c)
            grad_b = torch.mm(scaled.t(), low)
        else:
            g_low = torch.mm(g, b_c).mul_(scale)
            grad_b = torch.mm(g.t(), low).mul_(scale)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, weight)
            if weight.dtype == torch.float32:
                grad_x.add_(torch.mm(g_low, a_c))
            else:
                grad_x.addmm_(g_low, a_c)
            grad_x = grad_x.view(*grad_out.shape[:-1], grad_x.shape[-1])
        grad_a = torch.mm(g_low.t(), flat).to(ctx.factor_dtypes[0]) if ctx.needs_input_grad[3] else None
        grad_b = grad_b.to(ctx.factor_dtypes[1]) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_a, grad_b, None
