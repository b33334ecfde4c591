"""Quantized bases: 4-bit NormalFloat (QLoRA), FP4 and LLM.int8, on top of bitsandbytes.

QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", §3):

* **NF4.** The weight is cut into blocks of 64 consecutive values. Block b keeps its absolute
  maximum c_b and each value the index of the nearest of 16 levels q_j, the quantiles of N(0, 1)
  rescaled to [-1, 1] with an exact zero:  W_i ≈ c_b · q[k_i],  k_i ∈ {0..15}  (two per byte).
* **Double quantization.** The fp32 constants c_b are quantized again, after subtracting their
  mean μ, to 8 bits in blocks of 256 with fp32 constants c2:  c_b ≈ c2_B · F8[k2_b] + μ.
  Storage per weight: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits (4.5 without double quantization).
* **Forward** (eq. 6): Y = X · doubleDequant(c2, c, W_NF4) + s · X L₁ L₂, computed in the compute
  dtype; the gradient reaches X (and the deltas) through the dequantized weight, W gets none.

FP4 uses 16 floating-point levels instead of NF4's quantiles; LLM.int8 (Dettmers et al., 2022)
keeps one absmax per row, W ≈ s_row / 127 · q with q ∈ int8, and runs outlier features in 16-bit.

Every module-level method trains on these layers unchanged: the core sees them through
:class:`~deltatune.backends.QuantizedLinearBackend`, which dequantizes the weight when a method
asks for it (DoRA's norm, merging). The kernels are bitsandbytes' (CPU and CUDA).

On a CPU with AVX512-BF16, bitsandbytes moves a 4-bit layer into a CPU-packed layout at its
first forward without gradient: bf16 block constants, no double quantization (4 + 16/64 = 4.25
bits per weight), a kernel computing in bf16. The backend reads both layouts as the same W;
:func:`guard_cpu_packing` keeps layers whose shape the conversion does not fit from trying, and
brings packed layers back before a forward that needs their gradient.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..anatomy import analyze, check_model, iter_modules
from ..backends import QuantizedLinearBackend, backend_for
from ..errors import ConfigError
from ..layer import delta_layers
from ..targets import select, validate_pattern

SCHEMES = ("nf4", "fp4", "int8")
#: what :func:`quantize` leaves in full precision unless told otherwise: the output head, as
#: QLoRA and transformers' bitsandbytes integration do (its logits set the loss's precision)
DEFAULT_SKIP = ("head",)


def require_bitsandbytes():
    """The bitsandbytes module, or a :class:`ConfigError` saying how to install it."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ConfigError(
            "quantized bases need bitsandbytes >= 0.50 (4-bit on CPU and CUDA): pip install 'deltatune[quant]'"
        ) from exc
    return bitsandbytes


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ConfigError(f"quantization scheme {scheme!r} is not valid; allowed: {', '.join(SCHEMES)}")


def quantize(
    model: nn.Module,
    scheme: str = "nf4",
    *,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    blocksize: int = 64,
    skip: Sequence[str] = DEFAULT_SKIP,
    int8_threshold: float = 6.0,
) -> nn.Module:
    """Replace the model's linear layers (``nn.Linear`` and GPT-2's ``Conv1D``) by bitsandbytes'
    quantized layers, in place, one layer at a time; returns the same model.

    ``scheme``: ``nf4`` (QLoRA), ``fp4`` or ``int8`` (LLM.int8, outliers above
    ``int8_threshold`` kept in 16-bit). ``double_quant`` quantizes the 4-bit schemes' block
    constants too. ``compute_dtype`` (default: each layer's weight dtype) is what the layers
    compute and return in. ``skip`` takes target patterns (roles, globs, ``re:``) left in full
    precision; weights shared between modules (a head tied to the embedding) and the modules a
    transformers model keeps in fp32 (``_keep_in_fp32_modules``, e.g. T5's ``wo``) never are.
    Deltas attached afterwards train on the quantized layers; quantize before attaching.
    """
    check_model("quantize", model)
    check_scheme(scheme)
    if not isinstance(blocksize, int) or blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ConfigError(f"blocksize must be a power of two from 32 to 4096, got {blocksize!r}")
    for pattern in skip:
        validate_pattern(pattern)
    if delta_layers(model):
        raise ConfigError("quantize the model before attaching deltas: this model already has deltas attached")
    require_bitsandbytes()
    chosen = quantizable_layers(model, skip)
    if not chosen:
        raise ConfigError("quantize found no linear layer to quantize (all were skipped, tied or already quantized)")
    for path, module in chosen:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        backend = backend_for(module)
        replacement = quantized_linear(
            backend.dense_weight(), backend.bias, scheme, double_quant=double_quant,
            compute_dtype=compute_dtype or backend.dtype, blocksize=blocksize, int8_threshold=int8_threshold,
        )
        setattr(parent, child, replacement)
    return model


def quantizable_layers(model: nn.Module, skip: Sequence[str] = DEFAULT_SKIP) -> list[tuple[str, nn.Module]]:
    """The (path, module) pairs :func:`quantize` replaces: dense linear layers not matched by
    ``skip``, not sharing their weight with another module, and not among the modules a
    transformers model keeps in fp32."""
    anatomy = analyze(model)
    present = [p for p in skip if p != "head" or anatomy.head is not None]
    skipped = set(select(model, present, accepts=lambda m, r: True, each_must_match=False,
                         what="quantize(skip=...)", anatomy=anatomy).paths) if present else set()
    owners: dict[int, int] = {}
    for _, module in iter_modules(model):
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    # transformers' own list of modules whose code assumes a float weight (T5's `wo`)
    keep_float = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    chosen = []
    for path, module in iter_modules(model):
        backend = backend_for(module)
        if (backend is not None and backend.kind in ("linear", "conv1d") and path not in skipped
                and owners[id(module.weight)] == 1 and not keep_float.intersection(path.split("."))):
            chosen.append((path, module))
    return chosen


def quantized_linear(
    weight: Tensor,
    bias: Tensor | None,
    scheme: str,
    *,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    blocksize: int = 64,
    int8_threshold: float = 6.0,
) -> nn.Module:
    """A bitsandbytes layer computing ``x Wᵀ + b`` for ``weight`` given as (out, in)."""
    bnb = require_bitsandbytes()
    out_features, in_features = weight.shape
    device = weight.device
    data = weight.detach().contiguous()
    if scheme == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None,
                                    has_fp16_weights=False, threshold=int8_threshold, device="meta")
        layer.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
        # Linear8bitLt returns its input's dtype; the backend reads the intended one here
        layer.deltatune_dtype = compute_dtype
    else:
        layer = _linear4bit(data, scheme, double_quant=double_quant, compute_dtype=compute_dtype, blocksize=blocksize,
                            bias=bias is not None)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    # moving the parameters to their device is what quantizes them
    layer = layer.to(device)
    guard_cpu_packing(layer)
    return layer


def _linear4bit(data: Tensor, scheme: str, *, double_quant: bool, compute_dtype: torch.dtype | None, blocksize: int,
                bias: bool = False, quant_storage: torch.dtype = torch.uint8) -> nn.Module:
    """A ``Linear4bit`` holding ``data`` (out, in), not yet quantized (that happens on ``.to(device)``)."""
    bnb = require_bitsandbytes()
    out_features, in_features = data.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type=scheme, quant_storage=quant_storage,
                              device="meta")
    layer.weight = bnb.nn.Params4bit(data, requires_grad=False, blocksize=blocksize, compress_statistics=double_quant,
                                     quant_type=scheme, quant_storage=quant_storage, module=layer)
    return layer


def requantized_like(original: nn.Module, dense: nn.Linear) -> nn.Module:
    """``dense`` quantized with the settings ``original`` (a bitsandbytes layer) was made with."""
    weight = original.weight
    if isinstance(weight, require_bitsandbytes().nn.Params4bit):
        return quantized_linear(
            dense.weight, dense.bias, weight.quant_type, double_quant=weight.compress_statistics,
            compute_dtype=original.compute_dtype or dense.weight.dtype, blocksize=weight.blocksize,
        )
    return quantized_linear(dense.weight, dense.bias, "int8", compute_dtype=dense.weight.dtype,
                            int8_threshold=original.state.threshold)


def is_quantized(module: nn.Module) -> bool:
    backend = backend_for(module)
    return backend is not None and backend.quantized


# bitsandbytes' CPU inference layout ---------------------------------------------------------


def guard_cpu_packing(model: nn.Module) -> nn.Module:
    """Make bitsandbytes' CPU-packed 4-bit layout safe on every 4-bit layer of ``model`` (or on
    ``model`` itself, a layer); returns it. Called by :func:`quantize` and when deltas are
    attached, so layers made by transformers' ``BitsAndBytesConfig`` are covered too.

    On a CPU with AVX512-BF16 a ``Linear4bit`` converts its weight to that layout at its first
    forward without gradient (see :class:`~deltatune.backends.Linear4bitBackend`). Where the
    conversion fails or computes wrongly for the layer's shape (rows shorter than a block,
    fewer rows than the kernel's row blocking), the layer is kept from trying, per layer; where
    it works, the layer goes back to the standard layout before a forward that must pass a
    gradient to its input (the packed kernel has none: the gradient would silently vanish) and
    before its state dict is saved (bitsandbytes' own conversion misorders the constants of a
    layer without double quantization).
    """
    if "bitsandbytes" not in sys.modules:  # no 4-bit layer can exist
        return model
    for module in model.modules():
        backend = backend_for(module)
        if (backend is None or backend.kind != "linear4bit" or not getattr(module, "support_avx512bf16_for_cpu", False)
                or getattr(module, "deltatune_guards_packing", False)):
            continue
        if not _cpu_packing_works(module):
            module.support_avx512bf16_for_cpu = False
            continue
        module.register_forward_pre_hook(_standard_layout_for_gradient)
        module.register_state_dict_pre_hook(_standard_layout_for_saving)
        module.deltatune_guards_packing = True
    return model


def _standard_layout_for_gradient(module: nn.Module, args: tuple) -> None:
    backend = backend_for(module)
    if backend.cpu_packed and torch.is_grad_enabled() and args[0].requires_grad:
        backend.restore_standard_layout()


def _standard_layout_for_saving(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    backend = backend_for(module)
    if backend.cpu_packed:
        backend.restore_standard_layout()


_CPU_PACKING_WORKS: dict[tuple, bool] = {}


def _cpu_packing_works(layer: nn.Module) -> bool:
    """Whether bitsandbytes' CPU-packed layout works for a 4-bit layer of this shape and these
    settings, found once per kind of layer: a layer like it, holding random weights, is
    converted by a forward without gradient on CPU and must compute what its weight did before
    (to the bf16 rounding of the packed kernel)."""
    weight = layer.weight
    key = (layer.out_features, layer.in_features, weight.quant_type, weight.blocksize, weight.compress_statistics,
           weight.quant_storage, layer.compute_dtype)
    if key not in _CPU_PACKING_WORKS:
        generator = torch.Generator().manual_seed(0)
        probe = _linear4bit(torch.randn(layer.out_features, layer.in_features, generator=generator),
                            weight.quant_type, double_quant=weight.compress_statistics, compute_dtype=layer.compute_dtype,
                            blocksize=weight.blocksize, quant_storage=weight.quant_storage).to("cpu").eval()
        probe.support_avx512bf16_for_cpu = True
        x = torch.randn(4, layer.in_features, generator=generator).to(layer.compute_dtype or torch.float32)
        expected = x.float() @ backend_for(probe).dense_weight().float().T
        try:
            with torch.no_grad():
                out = probe(x).float()
        except (RuntimeError, AssertionError, ValueError):  # its conversion fails on shapes its blocking does not fit
            _CPU_PACKING_WORKS[key] = False
        else:
            # bf16 inputs and weights: ~0.5% of the output's norm; a misread layout: ~100%
            _CPU_PACKING_WORKS[key] = backend_for(probe).cpu_packed and bool(
                (out - expected).norm() <= 0.03 * expected.norm())
    return _CPU_PACKING_WORKS[key]


# storage ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantizedStorage:
    """What the quantized layers of a model hold, measured from their tensors."""

    layers: int
    parameters: int  # weights represented
    code_bytes: int  # the 4-bit / 8-bit codes
    constant_bytes: int  # block constants, their own constants, level tables, offsets
    schemes: tuple[str, ...]

    @property
    def bits_per_parameter(self) -> float:
        return 8 * (self.code_bytes + self.constant_bytes) / max(self.parameters, 1)

    @property
    def total_bytes(self) -> int:
        return self.code_bytes + self.constant_bytes

    def __str__(self) -> str:
        return (f"{self.layers} quantized layers ({', '.join(self.schemes)}), {self.parameters:,} weights in "
                f"{self.total_bytes / 2**20:.2f} MiB: {self.bits_per_parameter:.3f} bits per weight")


def quantized_storage(model: nn.Module) -> QuantizedStorage:
    """Bytes actually held by the model's quantized layers; tensors shared between layers (the
    level tables) are counted once."""
    check_model("quantized_storage", model)
    bnb = require_bitsandbytes()
    seen: set[int] = set()

    def size(tensor: Tensor | None) -> int:
        if tensor is None or tensor.data_ptr() in seen:
            return 0
        seen.add(tensor.data_ptr())
        return tensor.numel() * tensor.element_size()

    layers = parameters = codes = constants = 0
    schemes = set()
    for _, module in iter_modules(model):
        if not is_quantized(module):
            continue
        layers += 1
        weight = module.weight
        parameters += module.in_features * module.out_features
        codes += size(weight.data)
        if isinstance(weight, bnb.nn.Params4bit):
            state = weight.quant_state
            # the CPU-packed layout holds bf16 constants and no double quantization
            layout = " cpu-packed" if backend_for(module).cpu_packed else ""
            schemes.add(f"{state.quant_type}{'+dq' if state.nested else ''}{layout}")
            constants += size(state.absmax) + size(state.code)
            if state.nested:
                constants += size(state.state2.absmax) + size(state.state2.code) + size(state.offset)
        else:
            schemes.add("int8")
            constants += size(weight.SCB if weight.SCB is not None else module.state.SCB)
    return QuantizedStorage(layers, parameters, codes, constants, tuple(sorted(schemes)))


def expected_bits(scheme: str, *, double_quant: bool = True, blocksize: int = 64, cpu_packed: bool = False) -> float:
    """Bits per weight by the formula: codes plus block constants (plus their constants). In
    bitsandbytes' CPU-packed layout (``cpu_packed``) the constants are bf16, not double-quantized."""
    check_scheme(scheme)
    if scheme == "int8":
        return 8.0  # plus one fp32 scale per row, which depends on the shape
    if cpu_packed:
        return 4 + 16 / blocksize
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * 256)
    return 4 + 32 / blocksize


# preparing for training -------------------------------------------------------------------


def prepare_for_kbit_training(
    model: nn.Module, *, gradient_checkpointing: bool = False, upcast_dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Make a quantized model ready to train deltas on; returns the same model.

    * freezes every parameter of the base (the deltas attached later are the trainable ones);
    * casts the parameters that were not quantized and are in half precision (norms, the head,
      embeddings, biases) to ``upcast_dtype``: their values set the scale every quantized layer
      sees and the logits the loss is taken on, and they are a small part of the weights;
    * with ``gradient_checkpointing``, turns it on (non-reentrant) and makes the embedding
      output require grad, so the checkpointed blocks of a frozen model still pass gradients
      to the deltas inside them;
    * makes bitsandbytes' CPU-packed 4-bit layout safe (:func:`guard_cpu_packing`).
    """
    check_model("prepare_for_kbit_training", model)
    guard_cpu_packing(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for _, module in iter_modules(model):
        if is_quantized(module):
            continue
        for param in module.parameters(recurse=False):
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.to(upcast_dtype)
    if gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ConfigError(f"{type(model).__name__} has no gradient_checkpointing_enable(); it is not a transformers model")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


# merging onto a quantized base ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RequantizationReport:
    """How far the requantized merged model is from the exact (dequantized + ΔW) one, on a
    probe batch: absolute differences of the model's outputs."""

    layers: int
    max_abs: float
    mean_abs: float
    reference_mean_abs: float  # mean |output| of the exact model, for scale

    def __str__(self) -> str:
        return (f"requantized {self.layers} merged layers; output error on the probe batch: "
                f"max |Δ| {self.max_abs:.4g}, mean |Δ| {self.mean_abs:.4g} "
                f"(mean |output| {self.reference_mean_abs:.4g})")


def merge_and_requantize(
    model: nn.Module, names: str | Iterable[str] | None = None, *, probe: Mapping[str, Tensor] | Tensor | None = None
) -> RequantizationReport:
    """Merge deltas into a quantized base and quantize the merged layers again, with the
    settings each layer had; the model ends plain (no deltatune modules) and quantized.

    The exact merge (:func:`deltatune.merge_and_detach`, which writes dequantized weights + ΔW in
    the compute dtype) is the default elsewhere; requantizing rounds the merged weights to the
    4-bit grid again, so this reports the output error that introduced on ``probe`` (model
    inputs as a dict, or token ids; default: 4 sequences of 32 seeded random token ids).
    """
    check_model("merge_and_requantize", model)
    from ..api import merge_and_detach

    originals = {path: layer.attached_base for path, layer in delta_layers(model).items()
                 if is_quantized(layer.attached_base)}
    merge_and_detach(model, names)
    inputs = _probe_inputs(model, probe)
    with torch.no_grad():
        exact = _outputs(model(**inputs))
        count = 0
        for path, original in originals.items():
            merged = model.get_submodule(path)
            if merged is original:  # no chosen delta on it: still the original layer
                continue
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, requantized_like(original, merged))
            count += 1
        approx = _outputs(model(**inputs))
    diff = (approx.float() - exact.float()).abs()
    return RequantizationReport(count, diff.max().item(), diff.mean().item(), exact.float().abs().mean().item())


def _outputs(result) -> Tensor:
    if isinstance(result, Tensor):
        return result
    for key in ("logits", "last_hidden_state"):
        value = getattr(result, key, None)
        if value is not None:
            return value
    raise ConfigError(f"cannot read the model's output from {type(result).__name__}; pass a model returning logits")


def _probe_inputs(model: nn.Module, probe) -> dict[str, Tensor]:
    if isinstance(probe, Tensor):
        return {"input_ids": probe}
    if probe is not None:
        return dict(probe)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab:
        raise ConfigError("pass probe= (model inputs): this model has no config.vocab_size to draw token ids from")
    device = next(model.parameters()).device
    ids = torch.randint(vocab, (4, 32), generator=torch.Generator().manual_seed(0)).to(device)
    inputs = {"input_ids": ids}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids[:, :8]
    return inputs


__all__ = [
    "DEFAULT_SKIP",
    "QuantizedLinearBackend",
    "QuantizedStorage",
    "RequantizationReport",
    "SCHEMES",
    "expected_bits",
    "guard_cpu_packing",
    "is_quantized",
    "merge_and_requantize",
    "prepare_for_kbit_training",
    "quantize",
    "quantized_linear",
    "quantized_storage",
]
