"""IPT (Qin et al., 2021, "Exploring Universal Intrinsic Task Subspace via Prompt Tuning"):
the soft prompts of several tasks share a low-dimensional subspace, and a new task is learned
inside it by a handful of numbers.

**Multi-task subspace finding.** Each training task i has a soft prompt Pᵢ ∈ R^{n×e} (as in
prompt tuning, :mod:`.prompt`). An auto-encoder maps it into a d_I-dimensional intrinsic space
and back (d_I = ``dimension``, 5–250 in the paper), both maps two-layer perceptrons:

    vᵢ = Proj(Pᵢ) = W₂ tanh(W₁ vec(Pᵢ) + b₁) + b₂                 (the encoder)
    Pᵢ* = Proj_b(vᵢ) = W₄ tanh(W₃ vᵢ + b₃) + b₄, reshaped to n×e   (the decoder)

and the model reads the *reconstructed* prompt Pᵢ*, so the task loss trains the prompts and
both maps together, with the reconstruction term the trainer adds (``training_penalty``):

    L = L_task(Pᵢ*) + α · ‖Pᵢ* − Pᵢ‖² / (n·e),      α = ``reconstruction_weight``.

**Intrinsic subspace tuning.** A new task trains only its intrinsic vector v ∈ R^{d_I}; its
prompt is Proj_b(v) through the frozen decoder, and nothing else changes (``add_tasks``, or
``deltatune train --from-delta`` with data of new tasks; v starts at the mean of the training
tasks' vᵢ).

One delta serves every task (``serves_all_tasks``): a multi-task ``deltatune train`` trains it
with each sample's prompt chosen by its task (:meth:`IPTConfig.task_batch`), and
:meth:`IPTConfig.select_task` fixes the task for whole batches (evaluation, generation). Where the
prompt goes, and how cached generation, padding and encoder-decoders work, is prompt tuning's.
Not mergeable; every sample of a batch must name a task.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ClassVar, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..config import check_name, check_number, check_positive_int, register
from ..errors import ConfigError
from ..layer import delta_layers, rows_per_sample
from .prompt import PromptDelta, PromptOptions


class IntrinsicSubspace(nn.Module):
    """The training tasks' prompts Pᵢ, the auto-encoder (Proj, Proj_b), and the new tasks'
    intrinsic vectors; the prompt of any task (module docstring)."""

    def __init__(self, tasks: Sequence[str], intrinsic_tasks: Sequence[str], n: int, width: int, dimension: int,
                 hidden: int, dtype, device):
        super().__init__()
        self.n, self.width = n, width
        self.tasks = list(tasks)
        kwargs = dict(dtype=dtype, device=device)
        self.task_prompts = nn.Parameter(torch.zeros(len(self.tasks), n, width, **kwargs))
        self.encode = nn.Sequential(nn.Linear(n * width, hidden, **kwargs), nn.Tanh(), nn.Linear(hidden, dimension, **kwargs))
        self.decode = nn.Sequential(nn.Linear(dimension, hidden, **kwargs), nn.Tanh(), nn.Linear(hidden, n * width, **kwargs))
        self.intrinsic = nn.ParameterDict({t: nn.Parameter(torch.zeros(dimension, **kwargs)) for t in intrinsic_tasks})
        self.current_task = self.known()[0]
        #: under IPTConfig.task_batch: each sample's task
        self.sample_tasks: list[str | None] | None = None

    def known(self) -> list[str]:
        return [*self.tasks, *self.intrinsic]

    def check(self, task: str | None) -> None:
        if task not in self.known():
            raise ConfigError(f"unknown task {task!r} for this IPT delta; its tasks: {', '.join(self.known())}")

    def vector(self, task: str) -> Tensor:
        """The task's intrinsic vector: Proj(Pᵢ) for a training task, its own v for a new one."""
        if task in self.intrinsic:
            return self.intrinsic[task]
        return self.encode(self.task_prompts[self.tasks.index(task)].reshape(-1))

    def prompt(self, task: str) -> Tensor:
        """Proj_b of the task's intrinsic vector, (n, e)."""
        return self.decode(self.vector(task)).view(self.n, self.width)

    def reconstruction_error(self) -> Tensor:
        """‖Pᵢ* − Pᵢ‖² / (n·e), averaged over the training tasks."""
        reconstructed = self.decode(self.encode(self.task_prompts.reshape(len(self.tasks), -1)))
        return (reconstructed - self.task_prompts.reshape(len(self.tasks), -1)).pow(2).mean()

    def add_intrinsic(self, task: str) -> None:
        """A new task's vector, started at the mean of the training tasks' vectors."""
        with torch.no_grad():
            start = torch.stack([self.vector(t) for t in self.tasks]).mean(0)
        self.intrinsic[task] = nn.Parameter(start.detach().clone())


class IPTDelta(PromptDelta):
    """Prompt tuning whose prompt is the subspace's decoding for each sample's task."""

    def __init__(self, config: "IPTConfig", n: int, width: int, body: nn.Module, subspace: IntrinsicSubspace,
                 dtype, device):
        super().__init__(config, n, width, body, None, dtype, device)
        del self.prompt_embeddings  # the subspace makes every prompt
        self.subspace = subspace

    def prompts(self) -> Tensor:
        return self.subspace.prompt(self.subspace.current_task)

    def batch_prompts(self, rows: int) -> Tensor:
        tasks = self.subspace.sample_tasks
        if tasks is None:
            return super().batch_prompts(rows)
        repeat = rows_per_sample(rows, len(tasks), "the batch's list of tasks")
        decoded = {t: self.subspace.prompt(t) for t in dict.fromkeys(tasks)}
        return torch.stack([decoded[tasks[r // repeat]] for r in range(rows)])

    @property
    def per_sample_tasks(self) -> list[str | None] | None:
        return self.subspace.sample_tasks

    def training_penalty(self) -> Tensor | None:
        if not self.training or not self.subspace.task_prompts.requires_grad or not self.config.reconstruction_weight:
            return None
        return self.config.reconstruction_weight * self.subspace.reconstruction_error()

    def fold(self) -> bool:
        return False  # the decoder is the method: there is no single prompt to fold into

    def saved_state(self) -> dict[str, Tensor]:
        return dict(self.state_dict())

    def load_saved_state(self, state: dict[str, Tensor], where: str) -> None:
        super(PromptDelta, self).load_saved_state(state, where)


@register
@dataclasses.dataclass(frozen=True)
class IPTConfig(PromptOptions):
    """IPT (module docstring): ``tasks`` found the subspace (each with a prompt of
    ``num_virtual_tokens``), ``intrinsic_tasks`` are learned in it (a ``dimension``-long vector
    each); the auto-encoder's perceptrons have ``hidden_size`` units; ``reconstruction_weight``
    is α."""

    method: ClassVar[str] = "ipt"
    serves_all_tasks: ClassVar[bool] = True
    default_lr: ClassVar[float] = 1e-2

    tasks: tuple[str, ...] = ()
    intrinsic_tasks: tuple[str, ...] = ()
    dimension: int = 10
    hidden_size: int = 64
    reconstruction_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("tasks", "intrinsic_tasks"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.init == "text":
            raise ConfigError("IPT starts every task's prompt at random or from the vocabulary (init='random' or 'vocab')")
        for task in (*self.tasks, *self.intrinsic_tasks):
            check_name("task names", task)
        shared = sorted(set(self.tasks) & set(self.intrinsic_tasks))
        repeated = len(set(self.tasks)) != len(self.tasks) or len(set(self.intrinsic_tasks)) != len(self.intrinsic_tasks)
        if shared or repeated:
            raise ConfigError(f"every task is named once, in tasks or intrinsic_tasks; got tasks={list(self.tasks)}, "
                              f"intrinsic_tasks={list(self.intrinsic_tasks)}")
        check_positive_int("dimension", self.dimension, "the intrinsic dimension d_I (the paper uses 5-250)")
        check_positive_int("hidden_size", self.hidden_size, "the auto-encoder's hidden units")
        check_number("reconstruction_weight", self.reconstruction_weight, low=0)

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> IPTDelta:
        if not self.tasks:
            raise ConfigError(
                "IPT finds a subspace shared by several tasks: give tasks=[...], or train it with several tasks "
                "(deltatune train --method ipt --data a.jsonl --data b.jsonl, or records with a task field)"
            )
        embedding, weight, width, dtype, device = self._sizes(module, options)
        subspace = IntrinsicSubspace(self.tasks, self.intrinsic_tasks, self.num_virtual_tokens, width, self.dimension,
                                     self.hidden_size, dtype, device)
        delta = IPTDelta(self, self.num_virtual_tokens, width, module, subspace, dtype, device)
        if initialize and not torch.device(device).type == "meta":
            with torch.no_grad():
                for index in range(len(self.tasks)):
                    subspace.task_prompts[index].copy_(self.initial_embeddings(module, embedding, weight, width))
        return delta

    # one delta for every task ------------------------------------------------------------------

    def for_tasks(self, tasks: Sequence[str]) -> "IPTConfig":
        return self.replace(tasks=tuple(tasks))

    def known_tasks(self) -> tuple[str, ...]:
        return (*self.tasks, *self.intrinsic_tasks)

    def add_tasks(self, model: nn.Module, name: str, tasks: Sequence[str]) -> str:
        deltas = _ipt_deltas(model, name)
        for task in tasks:
            check_name("task names", task)
            if task in deltas[0].subspace.known():
                raise ConfigError(f"task {task!r} already exists; tasks: {', '.join(deltas[0].subspace.known())}")
        config = deltas[0].config.replace(intrinsic_tasks=(*deltas[0].config.intrinsic_tasks, *tasks))
        for delta in deltas:
            delta.requires_grad_(False)
            for task in tasks:
                delta.subspace.add_intrinsic(task)
            delta.config = config
        return f"their intrinsic vectors ({self.dimension} numbers each); the prompts and the auto-encoder stay frozen"

    @contextlib.contextmanager
    def task_batch(self, model: nn.Module, name: str, tasks: Sequence[str | None]) -> Iterator[nn.Module]:
        deltas = _ipt_deltas(model, name)
        for task in tasks:
            if task is None:
                raise ConfigError("every sample of an IPT batch needs a task (its prompt is the task's)")
            deltas[0].subspace.check(task)
        for delta in deltas:
            delta.subspace.sample_tasks = list(tasks)
        try:
            yield model
        finally:
            for delta in deltas:
                delta.subspace.sample_tasks = None

    def select_task(self, model: nn.Module, name: str, task: str) -> None:
        for delta in _ipt_deltas(model, name):
            delta.subspace.check(task)
            delta.subspace.current_task = task


def _ipt_deltas(model: nn.Module, name: str) -> list[IPTDelta]:
    found = [layer.deltas[name] for layer in delta_layers(model).values()
             if name in layer.deltas and isinstance(layer.deltas[name], IPTDelta)]
    if not found:
        raise ConfigError(f"no IPT delta named {name!r} on this model")
    return found
