"""Training memory: an estimate from the model config alone, and measured peaks.

:func:`estimate_memory` (from a config, built on the meta device: no weights) and
:func:`estimate_training_memory` (a model already built, delta attached) add up these lines,
in bytes. Notation: P_f frozen and P_t trainable parameters; d the weights' bytes per element
(4 fp32, 2 fp16/bf16), d_t the trainable parameters' (deltatune keeps a LoRA delta on a 16-bit
base in fp32 unless ``param_dtype`` says otherwise), d_a the activations'; b batch size, s
sequence length, L layers, h hidden size, a attention heads, h_kv the key/value width, i the MLP
width, V the vocabulary, H the positions the output head runs on (s, or fewer where only the
answer's positions need logits, as in deltatune's trainer).

* **model weights** = P_f·d + P_t·d_t; a quantized base stores its linear layers at the
  format's size, block constants included (as :func:`weight_memory`).
* **gradients** = P_t·d_t: one gradient per trainable parameter, in its dtype.
* **optimizer states**: AdamW (Loshchilov & Hutter 2019) keeps two moments shaped and typed
  like the parameter, 2·P_t·d_t. With master weights (mixed-precision training, Micikevicius et
  al. 2018) a 16-bit trainable parameter also has an fp32 copy and fp32 moments: 12·P_t, ZeRO's
  "K = 12" (Rajbhandari et al. 2020). 8-bit AdamW (Dettmers et al. 2022): 2·P_t plus two fp32
  constants per block of 256. SGD without momentum: none.
* **activations** = b·L·s·(e·d_a + m) + b·H·V·(d_a + 4): what backward reads, per token and
  layer e = 2h (the two norms' inputs) + h (attention input) + (h + 2·h_kv) (q, k, v) + h
  (attention output) + h (MLP input) + 2i (MLP up and activation outputs; 4i for a gated MLP:
  gate, activation, up, product); m = 2h bytes of 1-byte dropout masks (after attention,
  after the MLP) when the model has hidden dropout. Eager attention adds the a·s attention
  probabilities per token (with attention dropout also their mask and dropped-out copy: 2·a·s
  elements + a·s bytes); SDPA/flash kernels keep none (Dao et al. 2022). For GPT/OPT blocks
  (i = 4h, both dropouts, eager) this is Korthikanti et al. (2022, "Reducing Activation
  Recomputation in Large Transformer Models") eq. 1, s·b·h·(34 + 5·a·s/h) bytes at 16 bits,
  whose 5·a·s/h term is the eager attention's. The head adds its logits
  (d_a bytes) and the fp32 log-probabilities cross-entropy keeps (4 bytes) per position.
  With gradient checkpointing each layer keeps only its input, b·L·s·h·d_a, and one layer's
  activations are rebuilt at a time in backward, b·s·(e·d_a + m). A packed batch
  (``train/packing.py``) holds T tokens instead of b·s (its examples' own tokens, a prompt
  prefix they share once per row, no padding), in rows of at most s: every b·s above becomes T.
  A delta that runs the backbone without autograd (Ladder Side-Tuning) replaces the layers'
  line by its own elements per token (its ``backward_activations`` hook): for LST, per kept
  block the same e at the side network's sizes, plus per ladder the backbone state its
  down-projection reads (h) and the gate's two products (2·h/r).
* **allocator retention** (CPU, glibc): the activations once more. glibc's malloc raises its
  mmap threshold to the size of each large block freed (up to 32 MiB; mallopt(3),
  M_MMAP_THRESHOLD), so after the first step activations come from the heap, and a step's freed
  activations stay resident beside the next step's: the resident peak settles at two sets.
  Setting ``MALLOC_MMAP_THRESHOLD_`` (a fixed threshold) turns this off, and the line with it.
* **framework overhead**: on CPU the resident memory of a process that imported torch,
  transformers, accelerate and deltatune and did nothing else (:data:`CPU_RUNTIME_BYTES`,
  measured); on CUDA the CUDA context and kernel images, outside torch's allocator
  (:data:`CUDA_CONTEXT_BYTES`: nvidia-smi counts them, ``torch.cuda.max_memory_allocated`` does not).

* **per device, N processes** (``processes``, ``sharding``): every line is one process's, with
  b its own share of the batch. Data-parallel (``ddp``) replicates everything and adds DDP's
  gradient buckets, P_t·d_t (the gradients are copied into them for the all-reduce). ``fsdp``
  (deltatune's FSDP2: the frozen base sharded, what trains whole) holds P_f·d/N of the base,
  plus the unsharded weights of the blocks being computed (FSDP2 gathers the next block while
  one runs: two blocks' P_blk·d) and of the root (embeddings, head, final norm: gathered for
  the forward and kept until backward), with gradients and optimizer states whole. ZeRO
  stage 2 (Rajbhandari et al. 2020) partitions gradients and optimizer states, P_t·d_t/N and
  states/N; stage 3 also the weights, P_f·d/N + P_t·d_t/N, plus the gathered blocks as FSDP.
  4-bit quantized weights stay whole under ``fsdp`` (their quantization state cannot be
  sharded).

Not modelled: allocator fragmentation, backward's transient gradient buffers, the extra
positions of prompt/prefix tuning. ``scripts/check_memory_estimate.py`` compares the estimate
with the seed documents' OPT-1.3B table and with a measured training run.

Measured peaks come from :func:`peak_memory_bytes` and :func:`reset_peak_memory`.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import check_choice, check_positive_int


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


#: resident memory of an idle CPU process after ``import torch, transformers, accelerate,
#: deltatune.train.trainer`` (measured with torch 2.13 / transformers 4.5x on x86-64 Linux:
#: 330 MiB; ``import torch, transformers`` alone holds 238 MiB); see scripts/check_memory_estimate.py
CPU_RUNTIME_BYTES = 330 * 2**20
#: CUDA context, cuBLAS/cuDNN handles and kernel images on a recent NVIDIA GPU (about 0.5 GiB;
#: outside torch's caching allocator)
CUDA_CONTEXT_BYTES = 512 * 2**20
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "sgd")
ATTENTION = ("sdpa", "flash_attention_2", "eager")
#: how N processes share the work: data-parallel, deltatune's FSDP2, DeepSpeed ZeRO stages 2 and 3
SHARDING = ("ddp", "fsdp", "zero2", "zero3")
#: the storage format :func:`weight_memory` prices for each quantization scheme of :func:`deltatune.quantize`
_QUANT_FORMAT = {"nf4": "nf4+dq", "fp4": "nf4+dq", "int8": "int8"}


@dataclass(frozen=True)
class MemoryEstimate:
    """Lines of (name, bytes, formula); ``total`` is their sum."""

    lines: tuple[tuple[str, int, str], ...]

    @property
    def total(self) -> int:
        return sum(b for _, b, _ in self.lines)

    def __getitem__(self, name: str) -> int:
        for line, value, _ in self.lines:
            if line == name:
                return value
        raise KeyError(f"no line {name!r}; lines: {', '.join(n for n, _, _ in self.lines)}")

    def __str__(self) -> str:
        width = max(len(name) for name, _, _ in self.lines)
        rows = [f"{name.ljust(width)}  {human_bytes(b):>10}  {formula}" for name, b, formula in self.lines]
        return "\n".join(rows + [f"{'total'.ljust(width)}  {human_bytes(self.total):>10}"])

    def markdown(self) -> str:
        rows = [f"| {name} | {human_bytes(b)} | {formula} |" for name, b, formula in self.lines]
        return "\n".join(["| line | bytes | formula |", "|---|---:|---|", *rows, f"| **total** | **{human_bytes(self.total)}** | |"])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError("unreachable")


def _first(config, *names: str, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


@dataclass(frozen=True)
class _Shape:
    """What the activation formula needs from a model: its sizes and block kind."""

    layers: int
    hidden: int
    heads: int
    kv_width: int
    ffn: int
    vocab: int
    gated: bool
    dropout: bool
    attention_dropout: bool
    attention: str

    @classmethod
    def of(cls, model: nn.Module) -> "_Shape":
        from ..anatomy import analyze, iter_modules, linear_shape

        config = getattr(model, "config", None)
        config = getattr(config, "text_config", None) or config
        anatomy = analyze(model)
        hidden = _first(config, "hidden_size", "d_model", "n_embd", default=0)
        heads = _first(config, "num_attention_heads", "n_head", "num_heads", default=1)
        head_dim = _first(config, "head_dim", default=None) or hidden // max(heads, 1)
        kv_heads = _first(config, "num_key_value_heads", "num_kv_heads", default=heads)
        modules = dict(iter_modules(model))  # anatomy's paths, seen through delta wrappers (a prompt's body)
        up = anatomy.paths_with_role("ffn.up")
        ffn = linear_shape(modules[up[0]])[1] if up else _first(config, "intermediate_size", "ffn_dim", "n_inner", "d_ff", default=4 * hidden)
        layers = sum(anatomy.num_layers.values()) or _first(config, "num_hidden_layers", "n_layer", "num_layers", default=0)
        return cls(
            layers=layers, hidden=hidden, heads=heads, kv_width=kv_heads * head_dim, ffn=ffn,
            vocab=_first(config, "vocab_size", default=0), gated=bool(anatomy.paths_with_role("ffn.gate")),
            dropout=_first(config, "dropout", "resid_pdrop", "hidden_dropout_prob", "hidden_dropout", default=0) > 0,
            attention_dropout=_first(config, "attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", default=0) > 0,
            attention=getattr(config, "_attn_implementation", None) or "sdpa",
        )

    def per_token_elements(self, seq_len: int, attention: str) -> tuple[int, int]:
        """(elements at the activation dtype, bytes of 1-byte masks) one layer keeps per token."""
        h = self.hidden
        mlp = 4 * self.ffn if self.gated else 2 * self.ffn
        elements = 2 * h + h + (h + 2 * self.kv_width) + h + h + mlp
        masks = 2 * h if self.dropout else 0
        if attention == "eager":  # softmax output, and with dropout its mask and output too
            elements += self.heads * seq_len * (2 if self.attention_dropout else 1)
            masks += self.heads * seq_len if self.attention_dropout else 0
        return elements, masks


def estimate_training_memory(
    model: nn.Module,
    *,
    batch_size: int = 8,
    seq_len: int = 256,
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
    master_weights: bool = False,
    quantize: str | None = None,
    activation_dtype: str | None = None,
    attention: str | None = None,
    head_positions: int | None = None,
    device: str = "cpu",
    allocator_retention: bool | None = None,
    packed_tokens: int | None = None,
    processes: int = 1,
    sharding: str = "ddp",
) -> MemoryEstimate:
    """Training memory of ``model`` as built (its parameters' dtypes and which ones train),
    for ``batch_size`` sequences of ``seq_len`` tokens; the formula of every line is in the module
    docstring. ``quantize`` (nf4, fp4, int8) prices the linear layers as :func:`deltatune.quantize`
    would store them; ``activation_dtype`` (default: the weights') is bf16 under autocast;
    ``attention`` (default: the model config's) is sdpa, flash_attention_2 or eager;
    ``head_positions`` (default ``seq_len``) are the positions the output head runs on;
    ``device`` (cpu or cuda) chooses the overhead line; ``allocator_retention`` (default: on CPU
    under glibc without ``MALLOC_MMAP_THRESHOLD_``) adds the heap's retained activations;
    ``packed_tokens`` (default: none, padded batches) is the tokens a packed micro-batch holds;
    ``processes`` and ``sharding`` (ddp, fsdp, zero2, zero3) make every line one process's of N
    (``batch_size`` is then each process's share)."""
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_choice("sharding", sharding, SHARDING)
    check_positive_int("processes", processes, "how many processes train together")
    check_choice("device", device, ("cpu", "cuda"))
    shape = _Shape.of(model)
    if attention is not None:
        check_choice("attention", attention, ATTENTION)
    attention = attention or ("eager" if shape.attention == "eager" else "sdpa")  # other kernels keep no scores either
    params = list({id(p): p for p in model.parameters()}.values())
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad]
    weight_size = (frozen or params)[0].element_size() if params else 4
    if quantize is not None:
        from ..quant import check_scheme, quantizable_layers

        check_scheme(quantize)
        quantized = {id(m.weight): m for _, m in quantizable_layers(model)}
        frozen_sizes = {
            id(p): sum(_quantized_bytes(_QUANT_FORMAT[quantize], *p.shape, p.element_size())) if id(p) in quantized
            else p.numel() * p.element_size()
            for p in frozen
        }
    else:
        quantized = {}
        frozen_sizes = {id(p): p.numel() * p.element_size() for p in frozen}
    frozen_bytes = sum(frozen_sizes.values())
    trainable_count = sum(p.numel() for p in trainable)
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    n = processes

    if optimizer == "sgd":
        states, state_formula = 0, "SGD keeps no state"
    elif optimizer.endswith("8bit"):
        states = 2 * trainable_count + 2 * 4 * -(-trainable_count // 256)
        state_formula = "2·P_t (8-bit moments) + 8 bytes per block of 256"
    elif master_weights and trainable_bytes < 4 * trainable_count:
        states, state_formula = 12 * trainable_count, "12·P_t: fp32 master copy + two fp32 moments"
    else:
        states, state_formula = 2 * trainable_bytes, "2·P_t·d_t: two AdamW moments like the parameter"

    act = DTYPES[activation_dtype].itemsize if activation_dtype else weight_size
    b, s, L, h = batch_size, seq_len, shape.layers, shape.hidden
    if packed_tokens is not None:
        check_positive_int("packed_tokens", packed_tokens, "the tokens of a packed micro-batch")
    tokens = b * s if packed_tokens is None else packed_tokens
    bs = "b·s" if packed_tokens is None else "T"
    elements, masks = shape.per_token_elements(s, attention)
    layer_bytes = tokens * (elements * act + masks)
    positions = head_positions if head_positions is not None else s
    head_bytes = b * positions * shape.vocab * (act + 4)
    if gradient_checkpointing:
        layers_line = L * tokens * h * act + layer_bytes
        layers_formula = f"L·{bs}·h·d_a (layer inputs) + one layer's {bs}·(e·d_a + m)"
    else:
        layers_line = L * layer_bytes
        layers_formula = f"L·{bs}·(e·d_a + m), e = {elements}" + (" (eager: + a·s)" if attention == "eager" else "")
    side = _side_activations(model, s, attention)
    if side is not None:  # the backbone runs without autograd: only the side network's backward counts
        layers_line = tokens * side * act
        layers_formula = f"{bs}·e_side·d_a, e_side = {side}: a side network's, the backbone keeps none"
    overhead = CPU_RUNTIME_BYTES if device == "cpu" else CUDA_CONTEXT_BYTES
    if allocator_retention is None:
        allocator_retention = (device == "cpu" and sys.platform.startswith("linux")
                               and "MALLOC_MMAP_THRESHOLD_" not in os.environ)
    retention = [("allocator retention (glibc heap)", layers_line + head_bytes, "the activations once more")]
    weights_formula = "P_f·d" + (f" ({quantize} linear layers)" if quantize else "") + " + P_t·d_t"
    weights, gradients, gradients_formula = frozen_bytes + trainable_bytes, trainable_bytes, "P_t·d_t"
    parallel: list[tuple[str, int, str]] = []
    if n > 1 and sharding == "ddp":
        parallel.append(("DDP gradient buckets", trainable_bytes, "P_t·d_t: the gradients' copy all-reduced"))
    if n > 1 and sharding in ("fsdp", "zero3"):
        whole = sum(frozen_sizes[id(p)] for p in frozen if id(p) in quantized) if sharding == "fsdp" else 0
        weights = whole + (frozen_bytes - whole) // n + (trainable_bytes if sharding == "fsdp" else trainable_bytes // n)
        weights_formula = ("P_f·d/N" + (" (4-bit layers whole)" if whole else "") + " + P_t·d_t" if sharding == "fsdp"
                           else "(P_f·d + P_t·d_t)/N")
        block, root = _largest_block_and_root_bytes(model, frozen_sizes, quantized if sharding == "fsdp" else {})
        parallel.append(("gathered weights (2 blocks + root)", (2 * block + root) * (n - 1) // n,
                         "(2·P_blk + P_root)·d·(N−1)/N: the shards of the others while they compute"))
    if n > 1 and sharding in ("zero2", "zero3"):
        gradients, gradients_formula = trainable_bytes // n, "P_t·d_t/N"
        states, state_formula = states // n, state_formula + ", /N"
    return MemoryEstimate((
        ("model weights", weights, weights_formula + (f" (one of {n} processes, {sharding})" if n > 1 else "")),
        ("gradients", gradients, gradients_formula),
        (f"optimizer states ({optimizer})", states, state_formula),
        *parallel,
        (f"activations: layers (b={b}, s={s}{f', packed T={tokens}' if packed_tokens is not None else ''}"
         f"{', checkpointed' if gradient_checkpointing else ''})", layers_line, layers_formula),
        ("activations: logits", head_bytes, f"b·H·V·(d_a + 4), H = {positions}"),
        *(retention if allocator_retention else []),
        (f"framework overhead ({device})", overhead,
         "idle process: Python, torch, transformers" if device == "cpu" else "CUDA context and kernels"),
    ))


def _side_activations(model: nn.Module, seq_len: int, attention: str) -> int | None:
    """Elements per token kept by deltas that run the backbone without autograd (their
    ``backward_activations`` hook), or None when no active one does."""
    from ..layer import delta_layers

    counts = [count for layer in delta_layers(model).values() for name in layer.active
              if (count := layer.deltas[name].backward_activations(seq_len, attention)) is not None]
    return sum(counts) if counts else None
def _largest_block_and_root_bytes(model: nn.Module, sizes: dict[int, int], whole: dict) -> tuple[int, int]:
    """Bytes of the frozen weights of the largest transformer block, and of those outside every
    block (embeddings, head, final norm), leaving out the parameters in ``whole`` (never sharded)."""
    from ..anatomy import analyze

    blocks = [model.get_submodule(stack)[i] for stack in analyze(model).stacks for i in range(len(model.get_submodule(stack)))]
    in_blocks: set[int] = set()
    largest = 0
    for block in blocks:
        ids = {id(p) for p in block.parameters() if id(p) in sizes and id(p) not in whole}
        in_blocks |= ids
        largest = max(largest, sum(sizes[i] for i in ids))
    root = sum(size for i, size in sizes.items() if i not in in_blocks and i not in whole)
    return largest, root


def meta_model_from_config(config, dtype: str = "fp32") -> nn.Module:
    """A causal LM with ``config``'s shapes on the meta device: no memory, no weights. ``config``
    is a transformers config, a config.json path, or a model directory / hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    from ..errors import ModelLoadError

    check_choice("dtype", dtype, tuple(DTYPES))
    if not isinstance(config, PretrainedConfig):
        path = Path(config)
        try:
            config = (AutoConfig.for_model(**json.loads(path.read_text())) if path.is_file()
                      else AutoConfig.from_pretrained(str(config)))
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"no model config at {str(config)!r}: {exc}") from exc
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).to(DTYPES[dtype])  # .to on meta: no memory, no time


def estimate_memory(
    config,
    method: str = "lora",
    *,
    method_options: dict | None = None,
    dtype: str = "fp16",
    **settings,
) -> MemoryEstimate:
    """Training memory of ``method`` (a delta method, or ``"full"`` for full fine-tuning) on a
    model described by ``config`` (see :func:`meta_model_from_config`) with weights in ``dtype``;
    ``settings`` are those of :func:`estimate_training_memory` (batch_size, seq_len, optimizer,
    master_weights, quantize, gradient_checkpointing, attention, head_positions, device).

    >>> from transformers import OPTConfig
    >>> opt = OPTConfig(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32)
    >>> print(estimate_memory(opt, "full", batch_size=1, seq_len=512, device="cuda"))  # doctest: +SKIP
    """
    from ..api import attach
    from ..config import config as make_config

    model = meta_model_from_config(config, dtype)
    if method == "full":
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)
        attach(model, make_config(method, **(method_options or {})))
    return estimate_training_memory(model, **settings)


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
            f"{name.ljust(width)}  " + "  ".join(f"{human_bytes(v):>10}" for v in values) for name, values in self.rows
        ]
        lines.append(f"{'total'.ljust(width)}  " + "  ".join(f"{human_bytes(self.total(i)):>10}" for i in range(len(self.formats))))
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
