"""Padding-free packing: a micro-batch's examples laid end to end in a few rows, each attending
only to itself, with a prompt prefix that every example shares computed once.

A micro-batch is the same set of examples as without packing (so the loss, a mean over the
same label tokens, and its gradients are the same); only the layout changes:

* **Shared prefix.** Chat templates put the same tokens at the start of every example (a
  default system prompt: 47 of SmolLM2's ~74 demo tokens). Causal attention makes the hidden
  states of those positions identical in every example, so each row holds the longest prefix
  common to the micro-batch once, and every example after it holds only its own suffix, which
  attends to the prefix and to itself. The prefix stops before the first trained label of any
  example, so no label is predicted from a shared position.
* **Rows.** The suffixes' tokens over ``budget``, rounded up, is the number of rows (each
  beginning with the prefix); the suffixes go longest first into the emptiest row, so a row
  holds about ``budget`` of them (less than one example more), and the rows are padded to the
  longest. The budget bounds the attention's quadratic cost.
* **Positions and attention.** Positions restart at every example (after the prefix: at the
  prefix's length), and a 4-D additive mask lets a token see the earlier tokens of its own
  example and of the prefix, within the model's sliding window where it has one. Every
  example's first token in a row gets label -100: it is predicted from another example's last
  token (in an unpacked batch, nothing predicts an example's first token).

Whether a model computes a packed batch exactly as its padded form is checked by running both
(:func:`packing_blocker`), not assumed: a model that ignores position ids or builds its own
attention bias (ALiBi in BLOOM) trains padded, and the run says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .data import IGNORE_INDEX, PadCollator

#: segment id of the shared prefix (visible to every example of its row) and of row padding
PREFIX, PADDING = 0, -1


@dataclass(frozen=True)
class PackedCollator:
    """Lay tokenised examples out packed (see the module docstring): ``input_ids``,
    ``position_ids``, ``labels`` and ``segment_ids`` (``PREFIX``, the example's number from 1,
    or ``PADDING``) of shape (rows, length)."""

    pad_token_id: int
    budget: int
    share_prefix: bool = True

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        prefix = shared_prefix_length(features) if self.share_prefix else 0
        suffixes = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]) - prefix, reverse=True)
        total = sum(len(features[i]["input_ids"]) - prefix for i in suffixes)
        rows: list[list[int]] = [[] for _ in range(max(1, -(-total // self.budget)))]
        sizes = [0] * len(rows)
        for index in suffixes:  # longest first, into the emptiest row
            emptiest = sizes.index(min(sizes))
            rows[emptiest].append(index)
            sizes[emptiest] += len(features[index]["input_ids"]) - prefix
        rows = [sorted(row) for row in rows if row]  # each row in the batch's order
        length = prefix + max(sizes)
        columns: dict[str, list[list[int]]] = {"input_ids": [], "position_ids": [], "labels": [], "segment_ids": []}
        head = features[0]["input_ids"][:prefix]
        for row in rows:
            ids, positions, labels, segments = list(head), list(range(prefix)), [IGNORE_INDEX] * prefix, [PREFIX] * prefix
            for number, index in enumerate(row, start=1):
                feature = features[index]
                own = feature["input_ids"][prefix:]
                ids += own
                positions += range(prefix, prefix + len(own))
                labels += [IGNORE_INDEX, *feature["labels"][prefix + 1:]]
                segments += [number] * len(own)
            fill = length - len(ids)
            columns["input_ids"].append(ids + [self.pad_token_id] * fill)
            columns["position_ids"].append(positions + [0] * fill)
            columns["labels"].append(labels + [IGNORE_INDEX] * fill)
            columns["segment_ids"].append(segments + [PADDING] * fill)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in columns.items()}


def shared_prefix_length(features: Sequence[dict[str, list[int]]]) -> int:
    """The longest prefix of token ids every example shares, cut before any position that
    predicts a label and so that every example keeps at least one token of its own."""
    first = features[0]["input_ids"]
    limit = min(len(f["input_ids"]) for f in features) - 1
    for feature in features:
        labelled = [i for i, label in enumerate(feature["labels"]) if label != IGNORE_INDEX]
        if labelled:  # position i - 1 predicts label i: keep positions before the first such
            limit = min(limit, labelled[0] - 1)
    length = 0
    while length < limit and all(f["input_ids"][length] == first[length] for f in features):
        length += 1
    return length


def attention_bias(segment_ids: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype,
                   sliding_window: int | None) -> torch.Tensor:
    """The (rows, 1, length, length) additive mask of a packed batch: 0 where a query may see a
    key (an earlier or the same token of its own example or of the shared prefix, within the
    sliding window), the dtype's lowest value elsewhere; a padding query sees itself only."""
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    length = segment_ids.shape[1]
    index = torch.arange(length, device=segment_ids.device)
    causal = index[None, :, None] >= index[None, None, :]
    visible = causal & ((key == query) | (key == PREFIX)) & (key != PADDING) & (query != PADDING)
    if sliding_window is not None:
        visible &= (position_ids[:, :, None] - position_ids[:, None, :]) < sliding_window
    visible |= torch.eye(length, dtype=torch.bool, device=segment_ids.device)[None]
    bias = torch.zeros(visible.shape, dtype=dtype, device=segment_ids.device)
    return bias.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


def sliding_window(model: nn.Module) -> int | None:
    """The attention window every layer of ``model`` uses (its config's ``sliding_window``,
    where its ``layer_types`` say all layers slide, or where it has no ``layer_types``); None
    for full attention. Raises ValueError for a model mixing windowed and full layers, which
    one mask cannot serve."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        sliding = {kind == "sliding_attention" for kind in layer_types}
        if sliding == {True, False}:
            raise ValueError("its layers mix sliding-window and full attention, which one attention mask cannot serve")
        return window if sliding == {True} else None
    return window if isinstance(window, int) and getattr(config, "use_sliding_window", True) else None


def packed_model_inputs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments a causal LM takes for a packed batch."""
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
            "attention_mask": attention_bias(batch["segment_ids"], batch["position_ids"], compute_dtype(model),
                                             sliding_window(model))}


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The float dtype ``model`` computes in: its first float parameter's (fp32 for any other)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def packing_blocker(model: nn.Module, features: Sequence[dict[str, list[int]]], collate: PackedCollator,
                    pad_token_id: int, loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor],
                    device: torch.device) -> str | None:
    """Why ``model`` cannot train on packed batches, or None when it can: the loss of a few
    examples packed must equal their padded loss (without dropout, to the precision of the
    model's dtype); an error from the model, or a different loss, blocks packing."""
    try:
        sliding_window(model)
    except ValueError as exc:
        return str(exc)
    probe = list(features[:3])
    padded = {k: v.to(device) for k, v in PadCollator(pad_token_id)(probe).items()}
    packed = {k: v.to(device) for k, v in collate(probe).items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = float(loss_fn(model, padded))
            got = float(loss_fn(model, packed))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        return f"the model does not take a per-token attention mask and positions ({type(exc).__name__}: {str(exc)[:100]})"
    finally:
        model.train(was_training)
    tolerance = 1e-4 if compute_dtype(model) == torch.float32 else 2e-2
    if not abs(got - expected) <= tolerance * max(1.0, abs(expected)):
        return f"the model computes packed examples differently (loss {got:.4f} packed, {expected:.4f} padded)"
    return None
