"""What a base layer is, to a method: a weight W of shape (out, in), a way to read its input.

Methods never look at the module class. They ask a backend for the dense weight (oriented
``(out_features, in_features)`` whatever the storage layout), for an in-place weight update
(merging), and for the input projection ``x -> A x`` (which for an Embedding is a lookup of
the token ids in the columns of A). A new kind of base layer is one more backend; no method changes: the 4-bit
and 8-bit layers of bitsandbytes are backends whose dense weight is dequantized on demand.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Backend:
    """Base-layer access shared by all methods. Subclasses fix the storage layout."""

    kind = "abstract"
    #: whether the layer's input is a float activation (False for token ids)
    takes_activations = True
    #: whether the layer is a linear map with a dense (out, in) weight (False for norms & co.)
    is_linear_map = True
    #: whether the weight is stored quantized (no gradient, no in-place update)
    quantized = False

    def __init__(self, module: nn.Module):
        self.module = module

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def in_features(self) -> int:
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        raise NotImplementedError

    def dense_weight(self) -> Tensor:
        """W as (out, in); a view of the stored weight where the layout allows."""
        raise NotImplementedError

    def stored_layout(self, dense: Tensor) -> Tensor:
        """A tensor given as (out, in), in the layout the weight is stored in."""
        return dense

    def signature(self) -> str:
        """Kind and parameter shapes, for checkpoint fingerprints."""
        return f"{self.kind}:{self.out_features}x{self.in_features}"

    def project_input(self, x: Tensor, a: Tensor) -> Tensor:
        """x -> x A^T for A of shape (r, in), given in the compute dtype: the first factor of a
        low-rank update."""
        return F.linear(x, a)

    def fusable_product(self) -> tuple[Tensor, Tensor | None] | None:
        """(W as (out, in), bias) when the layer's output is exactly x Wᵀ + b with W and b
        frozen, so a delta may compute that product itself, fused with its own
        (:mod:`deltatune.fused`); None otherwise (the base module must run)."""
        return None


class LinearBackend(Backend):
    """``torch.nn.Linear``: weight stored (out, in)."""

    kind = "linear"

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def dense_weight(self) -> Tensor:
        return self.weight

    def fusable_product(self) -> tuple[Tensor, Tensor | None] | None:
        module = self.module
        # a subclass or an instance with its own forward (accelerate's offloading hooks) may do
        # more than x Wᵀ + b, and forward hooks must see the module run: torch offers no public
        # listing of a module's hooks, so its hook dictionaries are read
        if type(module).forward is not nn.Linear.forward or "forward" in vars(module):
            return None
        hooks = torch.nn.modules.module
        if module._forward_hooks or module._forward_pre_hooks or hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
            return None
        bias = module.bias
        if module.weight.requires_grad or (bias is not None and bias.requires_grad):
            return None
        return module.weight, bias


class Conv1DBackend(Backend):
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored transposed, (in, out)."""

    kind = "conv1d"

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    def dense_weight(self) -> Tensor:
        return self.weight.T

    def stored_layout(self, dense: Tensor) -> Tensor:
        return dense.T


class EmbeddingBackend(Backend):
    """``torch.nn.Embedding`` read as a linear map from one-hot token ids: W = weight^T."""

    kind = "embedding"
    takes_activations = False

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    def dense_weight(self) -> Tensor:
        return self.weight.T

    def stored_layout(self, dense: Tensor) -> Tensor:
        return dense.T

    def project_input(self, x: Tensor, a: Tensor) -> Tensor:
        return F.embedding(x, a.T)


class QuantizedLinearBackend(Backend):
    """A bitsandbytes linear layer (``Linear4bit``: NF4/FP4, ``Linear8bitLt``: LLM.int8) made by
    :func:`deltatune.quantize` or by transformers' ``BitsAndBytesConfig``. Methods see the weight
    dequantized to the compute dtype; merging goes through :meth:`dequantized_module`."""

    quantized = True

    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def out_features(self) -> int:
        return self.module.out_features

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the layer computes (and returns) in: the one deltas compute in too."""
        compute = getattr(self.module, "compute_dtype", None)
        if compute is not None:
            return compute
        bias = self.module.bias
        return bias.dtype if bias is not None else getattr(self.module, "deltatune_dtype", torch.float32)

    def signature(self) -> str:
        # a delta trained on a quantized base applies to the unquantized model and back
        return f"linear:{self.out_features}x{self.in_features}"

    def dequantized_module(self) -> nn.Linear:
        """An ``nn.Linear`` holding the dequantized weight (and the bias) in the compute dtype."""
        module = self.module
        dense = nn.Linear(self.in_features, self.out_features, bias=module.bias is not None,
                          dtype=self.dtype, device=self.device)
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if module.bias is not None:
                dense.bias.copy_(module.bias)
        dense.weight.requires_grad_(False)
        if dense.bias is not None:
            dense.bias.requires_grad_(module.bias.requires_grad)
        return dense


class Linear4bitBackend(QuantizedLinearBackend):
    """``bitsandbytes.nn.Linear4bit``: W = absmax_block · code[q] (see :mod:`deltatune.quant`).

    The weight is in one of two layouts. The standard one holds the codes two per byte in row
    order and the block constants (double-quantized or fp32) in the same order. On a CPU with
    AVX512-BF16, bitsandbytes converts it at the first forward without gradient into its CPU
    inference layout ("CPU-packed"): codes reordered in blocks of rows for its kernel, constants
    as a bf16 (in/blocksize, out) matrix, double quantization dropped; its kernel computes in
    bf16. It converts back when a state dict is saved, and :func:`deltatune.quant.guard_cpu_packing`
    before a forward that needs the input's gradient. Both are read here as the same W."""

    kind = "linear4bit"

    @property
    def cpu_packed(self) -> bool:
        """Whether the weight is in bitsandbytes' CPU inference layout."""
        return getattr(self.module.weight.quant_state, "packing_format_for_cpu", False)

    def dense_weight(self) -> Tensor:
        from bitsandbytes.functional import dequantize_4bit

        weight = self.module.weight
        if not self.cpu_packed:
            return dequantize_4bit(weight.data, weight.quant_state).to(self.dtype)
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        # bitsandbytes' inverse puts the codes back in row order; on a copy of the state told
        # the constants were never double-quantized, it leaves them as the kernel reads them
        # (bf16) instead of quantizing them again, and they are put in row order here
        state = copy.copy(weight.quant_state)
        state.original_nested = False
        codes, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        state.absmax = _constants_in_row_order(weight.quant_state.absmax)
        return dequantize_4bit(codes, state).to(self.dtype)

    def restore_standard_layout(self) -> None:
        """Convert a CPU-packed weight back to the standard layout, in place, as bitsandbytes
        does when it saves a state dict (double-quantizing the constants again if the layer
        had double quantization), but with the constants in row order in every case."""
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight = self.module.weight
        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        state = weight.quant_state
        if state.absmax.dim() == 2:
            # bitsandbytes puts the constants back in row order only when it quantizes
            # them again; left as (in/blocksize, out) they would scale the wrong blocks
            state.absmax = _constants_in_row_order(state.absmax)


def _constants_in_row_order(absmax: Tensor) -> Tensor:
    """The packed layout's (in/blocksize, out) bf16 block constants as the standard layout's
    flat, row-ordered fp32 ones."""
    return absmax.T.reshape(-1).float()


class Linear8bitBackend(QuantizedLinearBackend):
    """``bitsandbytes.nn.Linear8bitLt`` (LLM.int8): W = row_absmax / 127 · q, q ∈ int8."""

    kind = "linear8bit"

    def dense_weight(self) -> Tensor:
        weight = self.module.weight
        scales = weight.SCB if weight.SCB is not None else self.module.state.SCB
        return (weight.data.float() * (scales.float()[:, None] / 127.0)).to(self.dtype)


class ModuleBackend(Backend):
    """Any other module that holds parameters of its own (a LayerNorm, an RMSNorm, a block's
    gate): no linear view, so only methods that add to its output or copy its parameters
    (BitFit, LN tuning, top-layer tuning) use it. Its "features" are the last dimension of its
    first parameter, which for a norm is the width it normalises."""

    kind = "module"
    is_linear_map = False

    def _first(self) -> Tensor:
        return next(self.module.parameters(recurse=False))

    @property
    def weight(self) -> Tensor | None:
        weight = getattr(self.module, "weight", None)
        return weight if isinstance(weight, Tensor) else None

    @property
    def dtype(self) -> torch.dtype:
        return self._first().dtype

    @property
    def device(self) -> torch.device:
        return self._first().device

    @property
    def in_features(self) -> int:
        return self._first().shape[-1] if self._first().dim() else 1

    out_features = in_features

    def signature(self) -> str:
        shapes = ",".join(f"{n}{tuple(p.shape)}" for n, p in self.module.named_parameters(recurse=False))
        return f"{type(self.module).__name__}:{shapes}"

    def dense_weight(self) -> Tensor:
        raise TypeError(f"{type(self.module).__name__} is not a linear map; it has no dense weight")


class ContainerBackend(ModuleBackend):
    """A module whose parameters all live in its children: an attention module, the model body
    that embeds the tokens. Only deltas that wrap the module's whole call use it (prefixes that
    attention reads, prompts prepended to the input); it has no weight of its own."""

    kind = "container"
    in_features = out_features = 0

    def _first(self) -> Tensor:
        return next(self.module.parameters())

    @property
    def dtype(self) -> torch.dtype:
        """The dtype its layers compute in: that of the first float or quantized layer inside
        (its first parameter may be a quantized layer's integer codes)."""
        for child in self.module.modules():
            backend = backend_for(child) if child is not self.module else None
            if backend is not None and (backend.quantized or backend.dtype.is_floating_point):
                return backend.dtype
        return self._first().dtype

    @property
    def weight(self) -> None:
        return None

    @property
    def bias(self) -> None:
        return None

    def signature(self) -> str:
        from .anatomy import iter_modules

        # the model's own parameters only: deltas attached inside (LoRA on its projections)
        # must not change the fingerprint
        own = sum(p.numel() for _, m in iter_modules(self.module) for p in m.parameters(recurse=False))
        return f"{type(self.module).__name__}:{own}"


def layer_backend(module: nn.Module) -> Backend | None:
    """The backend a :class:`~deltatune.layer.DeltaLayer` uses: :func:`backend_for`, or a
    :class:`ContainerBackend` for a module holding parameters only through its children."""
    backend = backend_for(module)
    if backend is None and next(module.parameters(), None) is not None:
        return ContainerBackend(module)
    return backend


def backend_for(module: nn.Module) -> Backend | None:
    """The backend for a module, or None for a module that holds no parameters of its own."""
    from transformers.pytorch_utils import Conv1D

    # bitsandbytes' layers subclass nn.Linear; they can only exist if it was imported
    if "bitsandbytes" in sys.modules:
        import bitsandbytes as bnb

        if isinstance(module, bnb.nn.Linear4bit):
            return Linear4bitBackend(module)
        if isinstance(module, bnb.nn.Linear8bitLt):
            return Linear8bitBackend(module)
    if isinstance(module, nn.Linear):
        return LinearBackend(module)
    if isinstance(module, Conv1D):
        return Conv1DBackend(module)
    if isinstance(module, nn.Embedding):
        return EmbeddingBackend(module)
    if next(module.parameters(recurse=False), None) is not None:
        return ModuleBackend(module)
    return None
