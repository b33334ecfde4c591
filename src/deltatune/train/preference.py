"""Preference tuning: ``deltatune train --objective dpo|orpo|simpo`` on pairs of a preferred
(``chosen``) and a dispreferred (``rejected``) answer to one prompt.

Each loss is a function of the summed token log-probabilities of the two answers under the
model being tuned, log π(y|x), and for DPO under the reference model, log π_ref(y|x). The
reference is the same model with every delta switched off (:func:`deltatune.disabled`),
evaluated once per pair before training starts (the base does not change while a delta trains),
so no second copy of the model is ever held. With |y| the answer's token count, σ the logistic
function, y_w the chosen and y_l the rejected answer:

* **DPO** (Rafailov et al., 2023, "Direct Preference Optimization: Your Language Model is
  Secretly a Reward Model", Eq. 7)::

      L = -log σ( β [log π(y_w|x) - log π_ref(y_w|x)] - β [log π(y_l|x) - log π_ref(y_l|x)] )

  implicit reward r(y) = β [log π(y|x) - log π_ref(y|x)]; default β = 0.1.

* **ORPO** (Hong et al., 2024, "ORPO: Monolithic Preference Optimization without Reference
  Model", Eqs. 4, 6, 7), no reference::

      P(y|x) = exp( log π(y|x) / |y| ),   odds(y|x) = P(y|x) / (1 - P(y|x))
      L = -log π(y_w|x) / |y_w|  -  λ log σ( log odds(y_w|x) - log odds(y_l|x) )

  reward r(y) = λ log π(y|x) / |y| (it orders pairs as the odds do); default λ = 0.1.

* **SimPO** (Meng et al., 2024, "SimPO: Simple Preference Optimization with a Reference-Free
  Reward", Eq. 6), no reference::

      L = -log σ( β/|y_w| log π(y_w|x) - β/|y_l| log π(y_l|x) - γ )

  reward r(y) = β/|y| log π(y|x); defaults β = 2.0, γ = 1.0 (γ/β = 0.5, in the range the
  paper recommends).

* **An NLL anchor** for DPO and SimPO (``chosen_nll_weight`` α, default 0; Pang et al., 2024,
  "Iterative Reasoning Preference Optimization", Eq. 1)::

      L + α · ( -log π(y_w|x) / |y_w| )

  DPO and SimPO only ask that the chosen answer beat the rejected one, which they can also
  reach by pushing both down; on pairs that differ in a few tokens that wrecks greedy answers
  while the reward accuracy climbs. The anchor keeps the chosen answer likely. ORPO's first
  term is this anchor already.

Records (JSONL, JSON, CSV or Parquet): ``prompt``, ``chosen``, ``rejected``. A string prompt is
raw text followed by each answer verbatim (like ``prompt/completion`` records); a prompt given
as chat turns (``[{"role", "content"}, ...]``) is rendered with the chat template, and then each
answer is a string or a list holding the assistant's message. Without ``prompt``, ``chosen`` and
``rejected`` are whole conversations, and the turns they share are the prompt.

Held-out scores: **reward accuracy**, the share of pairs whose chosen answer gets the higher
reward (ties count one half, so a reward that cannot tell the answers apart, like DPO's before
training, scores 0.5), the mean **reward margin** r(y_w) - r(y_l), the mean loss, and, where
every chosen answer is a text, the **exact match** of greedy answers with the chosen ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..api import disabled
from ..errors import ConfigError, DataError
from .data import IGNORE_INDEX, MESSAGE_ROLES, Example, build_prompt, read_located_records, tokenize_example
from .evaluate import exact_match, generate_completions

#: the objectives of ``--objective`` besides plain language modelling (``sft``)
PREFERENCE_OBJECTIVES = ("dpo", "orpo", "simpo")


# ------------------------------------------------------------------------------- losses


@dataclass(frozen=True)
class PreferenceLoss:
    """One of the three objectives with its hyperparameters: ``beta`` (β of DPO and SimPO),
    ``odds_ratio_weight`` (λ of ORPO), ``reward_margin`` (γ of SimPO), ``chosen_nll_weight``
    (α of the NLL anchor, DPO and SimPO)."""

    name: str
    beta: float = 0.1
    odds_ratio_weight: float = 0.1
    reward_margin: float = 1.0
    chosen_nll_weight: float = 0.0

    @classmethod
    def of(cls, name: str, beta: float | None = None, odds_ratio_weight: float | None = None,
           reward_margin: float | None = None, chosen_nll_weight: float | None = None) -> "PreferenceLoss":
        if name not in PREFERENCE_OBJECTIVES:
            raise ConfigError(f"objective={name!r} is not a preference objective; allowed: {', '.join(PREFERENCE_OBJECTIVES)}")
        given = {"beta": beta if beta is not None else (2.0 if name == "simpo" else 0.1),
                 "odds_ratio_weight": 0.1 if odds_ratio_weight is None else odds_ratio_weight,
                 "reward_margin": 1.0 if reward_margin is None else reward_margin,
                 "chosen_nll_weight": 0.0 if chosen_nll_weight is None else chosen_nll_weight}
        for key in ("beta", "odds_ratio_weight"):
            if not given[key] > 0:
                raise ConfigError(f"{key} must be positive, got {given[key]!r}")
        for key in ("reward_margin", "chosen_nll_weight"):
            if not given[key] >= 0:
                raise ConfigError(f"{key} must be >= 0, got {given[key]!r}")
        if name == "orpo" and chosen_nll_weight:
            raise ConfigError("chosen_nll_weight is for dpo and simpo: ORPO's loss already holds the chosen "
                              "answer's NLL (scale the odds-ratio term with odds_ratio_weight instead)")
        return cls(name, **given)

    @property
    def needs_reference(self) -> bool:
        return self.name == "dpo"

    def __call__(self, chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
                 rejected_tokens: torch.Tensor, reference_chosen: torch.Tensor | None = None,
                 reference_rejected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-pair losses and the rewards of the chosen and rejected answers, from summed log-probs."""
        if self.name == "dpo":
            reward_chosen = self.beta * (chosen - reference_chosen)
            reward_rejected = self.beta * (rejected - reference_rejected)
            loss = -F.logsigmoid(reward_chosen - reward_rejected) - self.chosen_nll_weight * chosen / chosen_tokens
            return loss, reward_chosen.detach(), reward_rejected.detach()
        mean_chosen, mean_rejected = chosen / chosen_tokens, rejected / rejected_tokens
        if self.name == "orpo":
            log_odds = (mean_chosen - _log1m_exp(mean_chosen)) - (mean_rejected - _log1m_exp(mean_rejected))
            loss = -mean_chosen - self.odds_ratio_weight * F.logsigmoid(log_odds)
            scale = self.odds_ratio_weight
        else:
            loss = -F.logsigmoid(self.beta * (mean_chosen - mean_rejected) - self.reward_margin) - self.chosen_nll_weight * mean_chosen
            scale = self.beta
        return loss, (scale * mean_chosen).detach(), (scale * mean_rejected).detach()


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0; expm1 keeps it accurate where exp(x) is close to 1. A mean
    log-probability of exactly 0 (P = 1) is moved just below, where the odds are finite."""
    return torch.log(-torch.expm1(x.clamp(max=-1e-6)))


# --------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (raw text or chat turns) with a preferred and a dispreferred answer."""

    prompt: str | tuple[dict[str, Any], ...]
    chosen: str
    rejected: str
    source: str = ""
    task: str | None = None

    def answer(self, which: str) -> Example:
        return Example(prompt=self.prompt, completion=getattr(self, which), source=self.source, task=self.task)


def load_pairs(path: str | Path, *, task_field: str = "task", default_task: str | None = None) -> list[PreferencePair]:
    """Read preference records (see the module docstring) from a data file."""
    path = Path(path)
    pairs = []
    for location, record in read_located_records(path):
        where = f"{path.name} {location}"
        pair = _to_pair(record, where)
        task = record.get(task_field, default_task)
        if task is not None and (not isinstance(task, str) or not task):
            raise DataError(f"{where}: field '{task_field}' must name a task (a non-empty string), got {task!r}")
        pairs.append(dataclasses.replace(pair, task=task))
    return pairs


def _to_pair(record: Mapping[str, Any], where: str) -> PreferencePair:
    missing = [key for key in ("chosen", "rejected") if key not in record]
    if missing:
        raise DataError(f"{where}: a preference record needs fields 'chosen' and 'rejected' (and usually 'prompt'); "
                        f"missing {missing}, has {sorted(record)}")
    prompt = record.get("prompt")
    if prompt is None:  # whole conversations: the turns both share are the prompt
        chosen, rejected = (_turns(record[key], key, where) for key in ("chosen", "rejected"))
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if (len(chosen) != shared + 1 or len(rejected) != shared + 1 or not shared
                or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant"):
            raise DataError(f"{where}: 'chosen' and 'rejected' must be the same conversation up to a final "
                            "assistant answer each (no 'prompt' given)")
        return PreferencePair(chosen[:shared], chosen[-1]["content"], rejected[-1]["content"], where)
    if isinstance(prompt, str):
        texts = [record[key] for key in ("chosen", "rejected")]
        if not all(isinstance(text, str) for text in texts):
            raise DataError(f"{where}: with a text 'prompt', 'chosen' and 'rejected' must be texts too")
        return PreferencePair(prompt, texts[0], texts[1], where)
    turns = _turns(prompt, "prompt", where)
    return PreferencePair(turns, *(_answer_text(record[key], key, where) for key in ("chosen", "rejected")), where)


def _turns(value: Any, field: str, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and m.get("role") in MESSAGE_ROLES and isinstance(m.get("content"), str) for m in value):
        raise DataError(f"{where}: field {field!r} must be a text or a list of {{role, content}} messages "
                        f"(roles: {', '.join(MESSAGE_ROLES)}), got {str(value)[:80]!r}")
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def _answer_text(value: Any, field: str, where: str) -> str:
    if isinstance(value, str):
        return value
    turns = _turns(value, field, where)
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        raise DataError(f"{where}: field {field!r} must be the assistant's answer: a text or one assistant message")
    return turns[0]["content"]


def tokenize_pairs(tokenizer: Any, pairs: list[PreferencePair], max_length: int) -> list[dict[str, Any]]:
    """Each pair's chosen and rejected answer tokenised after the prompt (labels on the answer):
    ``input_ids``/``labels`` of the chosen, ``rejected_input_ids``/``rejected_labels``. A pair whose
    prompt fills ``max_length`` is an error naming it."""
    features = []
    for pair in pairs:
        chosen, rejected = (tokenize_example(tokenizer, pair.answer(which), max_length, "last")
                            for which in ("chosen", "rejected"))
        feature = {"input_ids": chosen["input_ids"], "labels": chosen["labels"],
                   "rejected_input_ids": rejected["input_ids"], "rejected_labels": rejected["labels"]}
        if pair.task is not None:
            feature["task"] = pair.task
        features.append(feature)
    return features


@dataclass(frozen=True)
class PairCollator:
    """A batch of pairs: the chosen answers' rows (``input_ids``, ``attention_mask``, ``labels``)
    and the rejected ones' (``rejected_``-prefixed), each right-padded; the reference log-probs
    where the features carry them."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {}
        for prefix in ("", "rejected_"):
            ids, labels = [f[f"{prefix}input_ids"] for f in features], [f[f"{prefix}labels"] for f in features]
            width = max(map(len, ids))
            batch[f"{prefix}input_ids"] = torch.tensor([x + [self.pad_token_id] * (width - len(x)) for x in ids])
            batch[f"{prefix}attention_mask"] = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
            batch[f"{prefix}labels"] = torch.tensor([x + [IGNORE_INDEX] * (width - len(x)) for x in labels])
        if "reference" in features[0]:
            batch["reference"] = torch.tensor([f["reference"] for f in features], dtype=torch.float32)
        return batch


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   subset: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its label tokens, and how many there are. With
    ``subset`` the LM head runs only on the columns that predict a label."""
    columns = (labels != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    first, last = max(int(columns.min()), 1), int(columns.max())
    if subset:
        keep = torch.arange(first - 1, last, device=labels.device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False).logits
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, first - 1 : last]
    targets = labels[:, first : last + 1]
    mask = targets != IGNORE_INDEX
    picked = torch.gather(logits.float().log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def pair_logps(model: nn.Module, batch: Mapping[str, torch.Tensor], subset: bool) -> tuple[torch.Tensor, ...]:
    """Summed log-probs and token counts of the chosen and the rejected answers of a batch. Two
    forwards of the batch's rows, so that a per-sample routing of the pairs applies to both."""
    chosen, chosen_tokens = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], subset)
    rejected, rejected_tokens = sequence_logps(model, batch["rejected_input_ids"], batch["rejected_attention_mask"],
                                               batch["rejected_labels"], subset)
    return chosen, rejected, chosen_tokens, rejected_tokens


@torch.no_grad()
def add_reference_logps(model: nn.Module, features: list[dict[str, Any]], collate: Callable, subset: bool,
                        batch_size: int = 16) -> None:
    """Store each pair's (chosen, rejected) log-probs under the base model, every delta off, in
    its feature (``reference``): the base does not change while a delta trains."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with disabled(model):
            for start in range(0, len(features), batch_size):
                part = features[start : start + batch_size]
                batch = {k: v.to(device) for k, v in collate(part).items()}
                chosen, rejected, _, _ = pair_logps(model, batch, subset)
                for feature, c, r in zip(part, chosen.tolist(), rejected.tolist()):
                    feature["reference"] = [c, r]
    finally:
        model.train(was_training)


def preference_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], loss: PreferenceLoss,
                    subset: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and rewards (chosen, rejected) of a batch."""
    chosen, rejected, chosen_tokens, rejected_tokens = pair_logps(model, batch, subset)
    reference = batch.get("reference")
    return loss(chosen, rejected, chosen_tokens, rejected_tokens,
                *((reference[:, 0], reference[:, 1]) if reference is not None else ()))


@torch.no_grad()
def evaluate_pairs(model: nn.Module, tokenizer: Any, pairs: list[PreferencePair], features: list[dict[str, Any]],
                   loss: PreferenceLoss, collate: Callable, subset: bool, *, max_new_tokens: int,
                   eval_limit: int | None, samples: int) -> tuple[dict[str, float], float, list[dict[str, str]]]:
    """Held-out reward accuracy, reward margin and loss (and the exact match of greedy answers
    with the chosen ones where they are chat answers or raw completions); returns (metrics, loss, samples)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses, margins = [], []
    try:
        for start in range(0, len(features), 16):
            batch = {k: v.to(device) for k, v in collate(features[start : start + 16]).items()}
            per_pair, reward_chosen, reward_rejected = preference_loss(model, batch, loss, subset)
            losses += per_pair.tolist()
            margins += (reward_chosen - reward_rejected).tolist()
    finally:
        model.train(was_training)
    metrics = {"reward_accuracy": sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins),
               "reward_margin": sum(margins) / len(margins)}
    chosen = pairs[:eval_limit] if eval_limit else pairs
    shown: list[dict[str, str]] = []
    if all(p.chosen.strip() for p in chosen):
        prompts = [build_prompt(tokenizer, p.answer("chosen")) for p in chosen]
        predictions = generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
        metrics["exact_match_with_chosen"] = exact_match(predictions, [p.chosen for p in chosen])
        for pair, prediction in list(zip(chosen, predictions))[:samples]:
            question = pair.prompt[-1]["content"] if isinstance(pair.prompt, tuple) else pair.prompt
            shown.append({"prompt": question, "reference": pair.chosen, "prediction": prediction})
    return metrics, sum(losses) / len(losses), shown
