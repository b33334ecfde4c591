"""Which method, and will it fit: the seed documents' rules of thumb made concrete by the estimator.

The rule by data size (from the PEFT literature the seeds summarise): with tens to hundreds of
examples, prompt engineering or (IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient
Fine-Tuning is Better and Cheaper than In-Context Learning": (IA)³ beats in-context learning
from a few dozen examples); hundreds to thousands, prompt tuning or (IA)³ (prompt tuning matches
full fine-tuning only from about 10B parameters, Lester et al. 2021, so below that (IA)³); more,
LoRA (Hu et al. 2021). Then memory decides how: the first of these that fits the budget is the
advice — as is, with gradient checkpointing, on an NF4 base (QLoRA, Dettmers et al. 2023), both,
then with smaller batches (same effective batch through gradient accumulation).

The weights' dtype is the one ``deltatune train`` would choose (:mod:`deltatune.precision`: bf16
on CUDA and on a CPU with native bf16 products, else fp32; the delta stays fp32 beside a bf16
base). Given the examples' mean length, every option is priced with packed batches (``deltatune
train``'s default): a micro-batch then holds batch × that many tokens rather than batch × the
longest sequence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import check_positive_int
from ..errors import ConfigError
from .memory import MemoryEstimate, human_bytes, estimate_training_memory, meta_model_from_config

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
#: prompt tuning reaches full fine-tuning's quality from about this size (Lester et al. 2021, fig. 1)
PROMPT_TUNING_MIN_PARAMS = 10**10


def parse_bytes(text: str) -> int:
    """``"24GB"`` (decimal), ``"24GiB"`` (binary), ``"800MB"``, ``"16g"`` → bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"memory {text!r} is not a size; write a number and a unit: {', '.join(u for u in _UNITS if u)}")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Option:
    """One configuration the advice considered, and its estimated memory."""

    description: str
    gradient_checkpointing: bool
    quantize: str | None
    batch_size: int
    estimate: MemoryEstimate

    def fits(self, budget: int) -> bool:
        return self.estimate.total <= budget


@dataclass(frozen=True)
class Advice:
    method: str
    reason: str
    trainable_params: int
    total_params: int
    budget: int
    chosen: Option | None  # None: nothing considered fits
    considered: tuple[Option, ...]
    full_finetuning: MemoryEstimate
    batch_size: int
    dtype: str = "fp32"  # the base weights' dtype the options are priced in
    packed: bool = False  # whether the options are priced with packed batches
    processes: int = 1  # devices training together; the budget and estimates are each one's
    sharding: str = "ddp"  # how they share the work (analysis.memory.SHARDING)

    def command(self) -> str:
        if self.chosen is None:
            return ""
        flags = [f"--method {self.method}", f"--batch-size {self.chosen.batch_size}"]
        if self.processes > 1:
            flags.append(f"--num-processes {self.processes}")
            flags += {"ddp": [], "fsdp": ["--fsdp"]}.get(self.sharding, [f"--deepspeed {self.sharding}"])
        if self.chosen.batch_size < self.batch_size:
            flags.append(f"--grad-accum {self.batch_size // self.chosen.batch_size}")
        if self.chosen.gradient_checkpointing:
            flags.append("--gradient-checkpointing")
        if self.chosen.quantize:
            flags.append(f"--quantize {self.chosen.quantize}")
        return "deltatune train " + " ".join(flags)

    def __str__(self) -> str:
        lines = [f"method: {self.method} — {self.reason}",
                 f"trains {self.trainable_params:,} of {self.total_params:,} parameters "
                 f"({100 * self.trainable_params / self.total_params:.3f}%); the saved delta is about "
                 f"{human_bytes(4 * self.trainable_params)}"]
        layout = "packed batches" if self.packed else "padded batches"
        per = (f" per device, {self.processes} devices ({self.sharding}; batch {self.batch_size} is each one's share)"
               if self.processes > 1 else "")
        lines.append(f"memory budget {human_bytes(self.budget)}{per}; base weights in {self.dtype}, {layout}; considered:")
        for option in self.considered:
            mark = "fits" if option.fits(self.budget) else "too big"
            lines.append(f"  {option.description:<48} {human_bytes(option.estimate.total):>10}  {mark}")
        lines.append(f"  (full fine-tuning, for comparison: {human_bytes(self.full_finetuning.total)})")
        if self.chosen is None:
            smallest = min(self.considered, key=lambda o: o.estimate.total)
            lines.append(f"nothing fits: the smallest, {smallest.description}, needs {human_bytes(smallest.estimate.total)}; "
                         "use a smaller model, shorter sequences, or more memory")
        else:
            lines += [f"advice: {self.chosen.description}, {human_bytes(self.chosen.estimate.total)} "
                      f"({100 * self.chosen.estimate.total / self.budget:.0f}% of the budget)",
                      f"  {self.command()}", "", str(self.chosen.estimate)]
        return "\n".join(lines)


def choose_method(examples: int, model_params: int) -> tuple[str, str]:
    """The seeds' rule of thumb: (method, reason)."""
    if examples < 1:
        raise ConfigError(f"examples must be positive, got {examples}")
    if examples < 100:
        return "ia3", (f"{examples} examples is few-shot territory: few-shot prompting with no training, or (IA)³, "
                       "which learns three scaling vectors per layer and beats in-context learning from a few dozen "
                       "examples (Liu et al. 2022)")
    if examples < 1000:
        if model_params >= PROMPT_TUNING_MIN_PARAMS:
            return "prompt", (f"{examples} examples on a {model_params / 1e9:.0f}B model: prompt tuning matches full "
                              "fine-tuning at this scale (Lester et al. 2021) and trains only the soft prompt")
        return "ia3", (f"{examples} examples: prompt tuning or (IA)³; at {model_params / 1e6:.0f}M parameters prompt "
                       "tuning lags fine-tuning (it catches up near 10B, Lester et al. 2021), so (IA)³")
    return "lora", (f"{examples} examples is enough data to use LoRA's capacity: it matches full fine-tuning "
                    "(Hu et al. 2021) with a small fraction of the parameters")


def advise(
    examples: int,
    model=None,
    *,
    memory: str | int = "24GB",
    device: str = "cuda",
    dtype: str | None = None,
    batch_size: int = 8,
    seq_len: int = 512,
    example_length: int | None = None,
    processes: int = 1,
    sharding: str = "ddp",
) -> Advice:
    """Advice for fine-tuning ``model`` (a config, config.json, model directory or hub id; default
    the bundled SmolLM2-135M) on ``examples`` examples within ``memory`` bytes (or "24GB"), of
    ``seq_len`` tokens at most and ``example_length`` on average (given: priced packed), on
    ``processes`` devices of ``memory`` each that share the work as ``sharding`` says (ddp,
    fsdp, zero2, zero3; :func:`deltatune.analysis.memory.estimate_training_memory`)."""
    from .. import precision
    from ..api import attach, count_parameters
    from ..config import config as make_config
    from ..models import bundled_model_dir

    check_positive_int("examples", examples, "how many training examples there are")
    budget = parse_bytes(memory) if isinstance(memory, str) else int(memory)
    dtype = dtype or ("bf16" if device == "cuda" else precision.resolve("auto", "cpu"))
    if example_length is not None:
        check_positive_int("example_length", example_length, "the examples' mean length in tokens")
        example_length = min(example_length, seq_len)
    source = model if model is not None else bundled_model_dir()

    full = meta_model_from_config(source, dtype)
    _, total = count_parameters(full)
    method, reason = choose_method(examples, total)
    full_estimate = estimate_training_memory(full.requires_grad_(True), batch_size=batch_size, seq_len=seq_len,
                                             device=device, master_weights=dtype != "fp32",
                                             processes=processes, sharding=sharding)
    model_with_delta = meta_model_from_config(source, dtype).requires_grad_(False)
    attach(model_with_delta, make_config(method))
    trainable, _ = count_parameters(model_with_delta)

    def option(checkpointing: bool, quantize: str | None, batch: int) -> Option:
        parts = [f"{method}, batch {batch}"] + (["gradient checkpointing"] if checkpointing else []) + (
            [f"{quantize} base"] if quantize else [])
        estimate = estimate_training_memory(model_with_delta, batch_size=batch, seq_len=seq_len, device=device,
                                            gradient_checkpointing=checkpointing, quantize=quantize,
                                            packed_tokens=None if example_length is None else batch * example_length,
                                            processes=processes, sharding=sharding)
        return Option(", ".join(parts), checkpointing, quantize, batch, estimate)

    considered = [option(False, None, batch_size), option(True, None, batch_size), option(False, "nf4", batch_size),
                  option(True, "nf4", batch_size)]
    batch = batch_size // 2
    while batch >= 1 and not any(o.fits(budget) for o in considered):
        considered.append(option(True, "nf4", batch))
        batch //= 2
    chosen = next((o for o in considered if o.fits(budget)), None)
    return Advice(method, reason, trainable, total, budget, chosen, tuple(considered), full_estimate, batch_size,
                  dtype=dtype, packed=example_length is not None, processes=processes, sharding=sharding)
