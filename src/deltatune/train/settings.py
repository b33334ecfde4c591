"""What a ``deltatune train`` run is given: every setting, validated when built, from flags,
a YAML/JSON file or the API; and which of them a resumed run may change."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


from ..config import check_choice, check_field_types, config as make_config, config_class, did_you_mean, read_mapping
from ..errors import ConfigError
from ..heads import TASKS
from ..precision import PRECISIONS
from ..quant import check_scheme
from .attention_choice import ATTENTION_CHOICES
from .data import TRAIN_ON
from .preference import PREFERENCE_OBJECTIVES, PreferenceLoss
from .optim import check_optimizer


SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainSettings:
    """Every option of ``deltatune train``; the field names are the CLI flags."""

    model: str | None = None
    task: str | None = None  # classify | multilabel | regression | tag: an encoder task; None: language modelling
    data: str | list[str] | None = None  # several files: one task each (unless records name theirs)
    eval_data: str | list[str] | None = None
    task_field: str = "task"
    text_field: str | None = None  # encoder tasks: the fields holding the text, its pair and its label
    pair_field: str | None = None
    label_field: str | None = None
    from_delta: str | None = None  # start from saved deltas instead of new ones
    eval_fraction: float = 0.1
    method: str = "lora"
    method_options: dict[str, Any] = field(default_factory=dict)
    name: str = "default"
    output_dir: str = "runs/deltatune"
    epochs: float = 3.0
    max_steps: int | None = None
    lr: float | None = None  # None: the method's default_lr
    schedule: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    train_on: str = "assistant"  # assistant | last | all: which tokens of a conversation train (train/data.py)
    objective: str = "sft"  # sft (language modelling on the answers) | dpo | orpo | simpo (train/preference.py)
    beta: float | None = None  # DPO's and SimPO's beta (default 0.1 and 2.0)
    odds_ratio_weight: float | None = None  # ORPO's lambda (default 0.1)
    reward_margin: float | None = None  # SimPO's gamma (default 1.0)
    chosen_nll_weight: float | None = None  # DPO's and SimPO's NLL anchor on the chosen answer (default 0)
    group_by_length: bool = True
    gradient_checkpointing: bool = False
    quantize: str | None = None  # nf4 | fp4 | int8: train on a quantized base (QLoRA with nf4)
    optim: str = "adamw"
    eval_every: int | None = None
    save_every: int | None = None
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False  # replace an earlier run's results in output_dir
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (deltatune.precision)
    attention: str = "auto"  # auto (the fastest measured) | model | eager | sdpa (train/attention_choice.py)
    packing: bool = True  # pack language-modelling batches where exact (train/packing.py)
    compile: bool = False  # torch.compile the transformer blocks (train/compiled.py)
    fsdp: bool = False  # shard the model across the processes with FSDP2 (train/distributed.py)
    deepspeed: str | None = None  # zero2 | zero3 | a DeepSpeed JSON config: ZeRO through accelerate
    max_new_tokens: int = 24
    eval_limit: int | None = None
    samples: int = 3

    def __post_init__(self) -> None:
        check_field_types(self)
        positive = {"epochs": self.epochs, "batch_size": self.batch_size,
                    "grad_accum": self.grad_accum, "max_length": self.max_length,
                    "max_new_tokens": self.max_new_tokens, "keep_checkpoints": self.keep_checkpoints}
        for name in ("lr", "max_steps", "eval_every", "save_every", "eval_limit"):
            if getattr(self, name) is not None:
                positive[name] = getattr(self, name)
        for name, value in positive.items():
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name} must be positive, got {value!r}")
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("train_on", self.train_on, TRAIN_ON)
        check_choice("objective", self.objective, ("sft", *PREFERENCE_OBJECTIVES))
        if self.objective == "sft":
            given = [name for name in ("beta", "odds_ratio_weight", "reward_margin", "chosen_nll_weight") if getattr(self, name) is not None]
            if given:
                raise ConfigError(f"{', '.join(given)} set, but they belong to a preference objective; "
                                  f"add --objective {' | '.join(PREFERENCE_OBJECTIVES)}")
        else:
            if self.task is not None:
                raise ConfigError(f"--objective {self.objective} tunes a language model on preference pairs; "
                                  f"it does not combine with --task {self.task}")
            PreferenceLoss.of(self.objective, self.beta, self.odds_ratio_weight, self.reward_margin, self.chosen_nll_weight)
        check_choice("attention", self.attention, ATTENTION_CHOICES)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r} is not valid; allowed: {', '.join(SCHEDULES)}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError(f"weight_decay and max_grad_norm must be >= 0, got {self.weight_decay!r} and {self.max_grad_norm!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        if self.quantize is not None:
            check_scheme(self.quantize)
        if self.task is not None and self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} is not valid; allowed: {', '.join(TASKS)}")
        check_optimizer(self.optim)
        if self.deepspeed is not None:
            from .distributed import deepspeed_config

            if self.fsdp:
                raise ConfigError("fsdp and deepspeed both shard the model; choose one")
            deepspeed_config(self.deepspeed, batch_size=self.batch_size, grad_accum=self.grad_accum)
        if self.fsdp and self.precision == "fp16":
            raise ConfigError("fsdp runs in the model's dtype (fp32 or bf16); precision='fp16' needs a loss "
                              "scaler FSDP's sharded gradients do not go through here: use bf16 or fp32")
        # fail now, not after the model has loaded, on a bad method or option
        self.delta_config()

    def delta_config(self):
        return make_config(self.method, **self.method_options)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else config_class(self.method).default_lr

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], /, **overrides: Any) -> "TrainSettings":
        """Settings from a flat mapping (a YAML/JSON file): training fields and method options
        side by side (``lr: 1e-3``, ``r: 16``); ``overrides`` (the CLI flags) win."""
        own = {f.name for f in dataclasses.fields(cls)}
        merged = {**mapping, **{k: v for k, v in overrides.items() if v is not None}}
        method = merged.get("method", cls.method)
        method_fields = set(config_class(method).option_names())
        settings: dict[str, Any] = {}
        options = dict(merged.pop("method_options", None) or {})
        for key, value in merged.items():
            if key in own:
                settings[key] = value
            elif key in method_fields:
                options[key] = value
            else:
                raise ConfigError(
                    f"unknown option {key!r}: not a training setting nor an option of method {method!r}."
                    + did_you_mean(key, sorted(own | method_fields))
                )
        return cls(**settings, method_options=options)

    @classmethod
    def from_file(cls, path: str | Path, /, **overrides: Any) -> "TrainSettings":
        return cls.from_mapping(read_mapping(path), **overrides)


#: settings a resumed run may change: how long it goes on, how often it evaluates and saves
MAY_CHANGE_ON_RESUME = frozenset({
    "epochs", "max_steps", "eval_every", "save_every", "keep_checkpoints", "resume", "overwrite",
    "output_dir", "eval_limit", "max_new_tokens", "samples",
    # how the work is spread: a checkpoint holds whole tensors, which any layout resumes
    "fsdp", "deepspeed",
})


def resumed_settings(settings: TrainSettings, processes: int = 1) -> dict[str, Any]:
    """The settings a checkpoint must be resumed with, as JSON values. The batch is the global
    one (``batch_size`` × ``processes``): that is what fixes the data order, so a run of N
    processes resumes in M with the same global batch."""
    values = json.loads(json.dumps(dataclasses.asdict(settings), default=str))
    values["batch_size"] = settings.batch_size * processes
    return {k: v for k, v in values.items() if k not in MAY_CHANGE_ON_RESUME}
