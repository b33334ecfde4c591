"""Task heads: a new output layer trained and saved as part of a delta.

An encoder fine-tuned for a task needs an output layer for that task's labels. Here that layer
belongs to the delta, not to the base model: ``dt.LoRAConfig(task_head=dt.TaskHead("classify",
labels=["neg", "pos"]))`` attaches LoRA *and* a head, both saved in the delta's few-KB file, so
one frozen encoder serves many tasks and switching (or routing) deltas switches heads too.

The base is a Hugging Face task model (``AutoModelForSequenceClassification`` for
``classify``/``multilabel``/``regression``, ``AutoModelForTokenClassification`` for ``tag``),
whose own code pools the sequence the way the architecture does (BERT's pooler over [CLS],
DistilBERT's pre-classifier, RoBERTa's classification head, the last real token of a decoder).
Its final layer W₀ (``classifier``, ``score``, ``classifier.out_proj``), whatever its width, is
replaced in the forward by the head's own

    logits = W_h x + b_h,        W_h ∈ R^{n×d} ~ N(0, 0.02²), b_h = 0 at init,

with n the task's outputs (its labels; one for a regression score). The other layers outside
the model's body (``model.base_model``) that the task model created — RoBERTa's head dense,
DistilBERT's pre-classifier, DeBERTa's pooler — are new, randomly initialised layers too, so
they are trained whole as copies and saved with the head. The body's own pooler (BERT's,
pretrained) stays frozen. Any ``nn.Module`` works by naming the layers: ``TaskHead(...,
module="out", train=["pool"])``. The method's own targets never include head layers.

Under :func:`deltatune.route` heads of different widths share a batch: each row gets its own
task's logits, padded on the right to the widest with the dtype's lowest value, which no
argmax, softmax or sigmoid threshold picks (read a row's task with ``logits[..., :n]``).

Losses and predictions per task kind (``labels`` of a tagging task are the tags):

* ``classify``: cross-entropy, prediction argmax;
* ``multilabel``: binary cross-entropy with logits per label, predicted where σ(logit) > 0.5;
* ``regression``: mean squared error between the output z and the standardised score
  (y − μ)/σ, prediction μ + σ·z (μ, σ: ``target_mean``, ``target_std``), so gradients have
  unit scale whatever the scores' range: on raw 0–5 similarity scores, LoRA on MiniLM at its
  default learning rate collapsed to one constant prediction, and standardised it learns;
* ``tag``: token-level cross-entropy ignoring positions labelled -100 (padding and the
  continuation pieces of a word), prediction argmax per token.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .anatomy import is_linear_like, iter_modules
from .backends import Backend
from .errors import ConfigError, TargetError
from .layer import Delta, base_of, has_own_parameters

TASKS = ("classify", "multilabel", "regression", "tag")


def model_kind(task: str) -> str:
    """The transformers task model a head task loads (a key of ``models.TASK_MODEL_CLASSES``)."""
    return "token-classification" if task == "tag" else "sequence-classification"

#: label value the tagging loss ignores (pad positions, continuation pieces of a word)
IGNORE_INDEX = -100
#: the standard deviation of a new head's weights (Hugging Face's usual initializer_range)
INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class TaskHead:
    """What a delta's task head predicts; see the module docstring.

    ``labels``: the class names (``classify``, at least two), the label names (``multilabel``),
    the tags (``tag``), or the names of the predicted scores (``regression``; empty means one
    score). ``module``: the model's output layer the head stands in for; ``train``: the other
    head layers trained whole. Both are found in Hugging Face task models when None, and are
    stored resolved in a saved delta. ``target_mean`` and ``target_std`` (regression): the head
    outputs standardised scores z and predicts μ + σ·z, so the loss has unit scale whatever the
    scores' range (``deltatune train`` takes μ and σ from the training data).
    """

    task: str
    labels: tuple[str, ...] = ()
    module: str | None = None
    train: tuple[str, ...] | None = None
    target_mean: float = 0.0
    target_std: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        if self.train is not None:
            object.__setattr__(self, "train", (self.train,) if isinstance(self.train, str) else tuple(self.train))
        self.validate()

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task_head task={self.task!r} is not valid; allowed: {', '.join(TASKS)}")
        bad = [label for label in self.labels if not isinstance(label, str) or not label]
        if bad:
            raise ConfigError(f"task_head labels must be non-empty strings, got {bad[0]!r}")
        repeated = sorted({label for label in self.labels if self.labels.count(label) > 1})
        if repeated:
            raise ConfigError(f"task_head labels must be distinct; repeated: {repeated}")
        least = {"classify": 2, "multilabel": 1, "tag": 2, "regression": 0}[self.task]
        if len(self.labels) < least:
            raise ConfigError(
                f"a {self.task} head needs at least {least} labels, got {list(self.labels)}"
            )
        if not isinstance(self.target_std, (int, float)) or not self.target_std > 0:
            raise ConfigError(f"task_head target_std must be a positive number, got {self.target_std!r}")
        if self.module is not None and (not isinstance(self.module, str) or not self.module):
            raise ConfigError(f"task_head module must be a module path, got {self.module!r}")

    @property
    def num_outputs(self) -> int:
        return max(1, len(self.labels))

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task, "labels": list(self.labels), "module": self.module,
            "train": None if self.train is None else list(self.train),
            "target_mean": self.target_mean, "target_std": self.target_std,
        }

    @staticmethod
    def from_value(value: "TaskHead | Mapping[str, Any] | None") -> "TaskHead | None":
        if value is None or isinstance(value, TaskHead):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"task_head must be a deltatune.TaskHead or a mapping, got {type(value).__name__}")
        fields = {f.name for f in dataclasses.fields(TaskHead)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ConfigError(f"unknown task_head field(s) {unknown}; valid: {sorted(fields)}")
        return TaskHead(**value)

    def paths(self) -> tuple[str, ...]:
        """Every module the head occupies (resolved heads only)."""
        return (self.module, *(self.train or ()))

    # what the logits mean ------------------------------------------------------------------

    def own_logits(self, logits: Tensor) -> Tensor:
        """This head's columns of (possibly padded, under routing) logits."""
        return logits[..., : self.num_outputs]

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The task's training loss: ``targets`` are class indices (classify, tag, with -100
        ignored), a 0/1 matrix (multilabel) or scores (regression, shape (batch, outputs), compared
        standardised: (y − μ)/σ)."""
        logits = self.own_logits(logits).float()
        if self.task == "classify":
            return F.cross_entropy(logits, targets)
        if self.task == "tag":
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        if self.task == "multilabel":
            return F.binary_cross_entropy_with_logits(logits, targets.float())
        standardised = (targets.float().view_as(logits) - self.target_mean) / self.target_std
        return F.mse_loss(logits, standardised)

    def predict(self, logits: Tensor) -> Tensor:
        """Class indices (classify, tag), a 0/1 matrix (multilabel) or scores (regression)."""
        logits = self.own_logits(logits)
        if self.task in ("classify", "tag"):
            return logits.argmax(-1)
        if self.task == "multilabel":
            return (logits > 0).long()  # σ(z) > 0.5 ⟺ z > 0
        return logits.float() * self.target_std + self.target_mean


def _body_path(model: nn.Module, modules: dict[str, nn.Module]) -> str | None:
    body = getattr(model, "base_model", None)
    if not isinstance(body, nn.Module) or body is model:
        return None
    return next((path for path, module in modules.items() if module is body), None)


def resolve(model: nn.Module, head: TaskHead, anatomy: Any) -> TaskHead:
    """``head`` with its ``module`` and ``train`` paths found (or checked) in ``model``."""
    from .targets import suggest

    modules = dict(iter_modules(model))
    body = _body_path(model, modules)
    if body is None and head.module is None:
        raise TargetError(
            f"cannot find the task head of {type(model).__name__}: it is not a Hugging Face task model "
            "(no base_model). Name its layers: TaskHead(..., module='<output layer>', train=[...])"
        )
    # the layers outside the body are the ones the task model added (none known without a body)
    candidates = [] if body is None else [
        path for path, module in modules.items()
        if path and path != body and not path.startswith(body + ".") and has_own_parameters(module)
    ]
    output = head.module
    if output is None:
        linear = [p for p in candidates if is_linear_like(base_of(modules[p]))]
        if not linear:
            raise TargetError(f"{type(model).__name__} has no linear layer outside its body to replace with a task head")
        output = linear[-1]
    for path in (output, *(head.train or ())):
        if path not in modules:
            raise TargetError(f"task_head module {path!r} does not exist. {suggest(path, model, anatomy)}")
    if output == anatomy.head:
        raise ConfigError(
            f"{output} is {type(model).__name__}'s language-model head; a task head replaces a classifier. "
            "Load the model for the task: AutoModelForSequenceClassification (classify, multilabel, "
            "regression) or AutoModelForTokenClassification (tag)"
        )
    if not is_linear_like(base_of(modules[output])):
        raise TargetError(f"task_head module {output} is {type(base_of(modules[output])).__name__}, not a linear layer")
    train = head.train if head.train is not None else tuple(p for p in candidates if p != output)
    for path in train:
        if not has_own_parameters(modules[path]):
            raise TargetError(f"task_head train module {path} has no parameters of its own")
    return dataclasses.replace(head, module=output, train=tuple(train))


class HeadLayer(Delta):
    """logits = W_h x + b_h in place of the output layer's own (whose width may differ)."""

    acts_on = "new output"
    merge_depends_on_weight = True

    def __init__(self, config: Any, backend: Backend, initialize: bool, device: torch.device | None):
        super().__init__()
        self.config = config
        outputs = config.task_head.num_outputs
        dtype = torch.float32 if backend.dtype in (torch.float16, torch.bfloat16) else backend.dtype
        device = device or backend.device
        self.weight = nn.Parameter(torch.empty(outputs, backend.in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(outputs, dtype=dtype, device=device)) if backend.bias is not None else None
        if initialize:
            nn.init.normal_(self.weight, std=INIT_STD)

    @property
    def num_outputs(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor, base_out: Tensor, backend: Backend) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def merge_blocker(self, backend: Backend) -> str | None:
        if backend.out_features != self.num_outputs:
            return (
                f"its task head has {self.num_outputs} outputs and the layer it stands in for has "
                f"{backend.out_features}; keep the delta unmerged"
            )
        if backend.quantized:
            return "the output layer is quantized; a head cannot be written into it"
        return None

    def merge_update(self, backend: Backend) -> tuple[Tensor, Tensor | None]:
        # the merged layer must compute the head alone: W₀ + (W_h − W₀)
        weight = self.weight.detach().float() - backend.dense_weight().float()
        bias = None if self.bias is None else self.bias.detach().float() - backend.bias.detach().float()
        return weight, bias

