"""Instruction-tuning data: read records, recognise their layout, tokenise, batch.

Supported files: JSONL, JSON (a list of objects), CSV and Parquet (needs ``pyarrow``).
Supported layouts, recognised from the first record:

========================  ==========================================  ===================
layout                    fields                                      what is trained
========================  ==========================================  ===================
``messages``              ``messages``: [{"role", "content"}, ...]    the last turn, which
                                                                      must be the assistant's
``instruction``           ``instruction``, ``output``, ``input``      ``output``
                          (optional)
``prompt/completion``     ``prompt``, ``completion`` (raw text)       ``completion``
``text``                  ``text``                                    every token
========================  ==========================================  ===================

Chat-like layouts (``messages``, ``instruction``) are rendered with the tokenizer's chat
template, so the model is tuned in the format it is prompted with; tokenizers without a
template get a plain ``### Instruction: / ### Response:`` format. ``prompt/completion``
records are used verbatim. Every completion ends with the end-of-turn token (or EOS), so the
tuned model learns to stop.

Batching pads to the longest sequence in the batch; :func:`batch_indices` can group
examples of similar length to waste less compute on padding. ``deltatune train`` packs its
batches instead where the model computes them exactly (:mod:`.packing`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError

logger = logging.getLogger(__name__)

#: Label value that the loss ignores (PyTorch's ``cross_entropy`` default).
IGNORE_INDEX = -100

LAYOUT_FIELDS = {
    "messages": ("messages",),
    "instruction": ("instruction", "input", "output"),
    "prompt/completion": ("prompt", "completion"),
    "text": ("text",),
}

#: Turn headers for tokenizers without a chat template.
_PLAIN_ROLE_HEADERS = {
    "system": "### System:",
    "user": "### Instruction:",
    "assistant": "### Response:",
}


@dataclass(frozen=True)
class Example:
    """One training example, whatever its file layout.

    ``prompt`` is either the chat turns before the answer (a tuple of ``{"role", "content"}``
    dicts, rendered with the chat template) or raw text used verbatim (``""`` for plain-text
    data, where the whole example is the completion). ``source`` says where it came from
    (``"train.jsonl line 17"``) for error messages. ``task`` names the task of a multi-task
    data set (a record's task field, or its file's name), None in single-task data.
    """

    prompt: str | tuple[dict[str, str], ...]
    completion: str
    source: str = ""
    task: str | None = None

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, tuple)


# ---------------------------------------------------------------------------- reading files


def demo_data_path(split: str) -> Path:
    """Path of the bundled date-normalisation data set: ``split`` is ``"train"`` or ``"test"``."""
    if split not in ("train", "test"):
        raise DataError(f"the demo data has splits 'train' and 'test', not {split!r}")
    return Path(str(resources.files("deltatune") / "data" / "demo" / f"{split}.jsonl"))


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL, JSON, CSV or Parquet file into a list of dicts (one per record)."""
    return [record for _, record in read_located_records(Path(path))]


def load_examples(path: str | Path, *, task_field: str = "task", default_task: str | None = None) -> list[Example]:
    """Read a data file and normalise every record to an :class:`Example`.

    A record's ``task_field`` (if present) names its task; records without one get
    ``default_task``.

    Raises:
        DataError: the file is missing, empty or malformed, its layout is unknown, or a
            record lacks a field its layout needs (the message names file, line and field).
    """
    path = Path(path)
    located = read_located_records(path)
    first_location, first_record = located[0]
    layout = detect_layout(first_record, f"{path.name} {first_location}")
    detected_from = f"layout '{layout}', detected from {first_location}"
    examples = []
    for location, record in located:
        where = f"{path.name} {location}"
        example = _to_example(record, layout, where, detected_from)
        task = record.get(task_field, default_task)
        if task is not None and (not isinstance(task, str) or not task):
            raise DataError(f"{where}: field '{task_field}' must name a task (a non-empty string), got {task!r}")
        examples.append(dataclasses.replace(example, task=task) if task is not None else example)
    return examples


def read_located_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Records paired with their human-readable location ("line 3", "record 3", "row 3")."""
    if path.is_dir():
        raise DataError(f"data file {str(path)!r} is a directory; give a .jsonl, .json, .csv or .parquet file")
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    readers = {
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".csv": _read_csv,
        ".parquet": _read_parquet,
    }
    if suffix not in readers:
        raise DataError(
            f"{path.name}: unknown data format {suffix!r}; use .jsonl, .json, .csv or .parquet"
        )
    try:
        located = readers[suffix](path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path.name} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    if not located:
        raise DataError(f"{path.name}: the file holds no records")
    for location, record in located:
        if not isinstance(record, dict):
            raise DataError(
                f"{path.name} {location}: expected an object with named fields, "
                f"got {type(record).__name__}"
            )
    return located


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    located = []
    with path.open(encoding="utf-8-sig") as file:  # -sig: a byte-order mark is not part of the data
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                located.append((f"line {line_number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path.name} line {line_number}: invalid JSON ({exc.msg})"
                ) from exc
    return located


def _read_json(path: Path) -> list[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path.name} line {exc.lineno}: invalid JSON ({exc.msg})") from exc
    if not isinstance(data, list):
        raise DataError(f"{path.name}: expected a JSON list of records, got {type(data).__name__}")
    return [(f"record {index}", record) for index, record in enumerate(data, start=1)]


def _read_csv(path: Path) -> list[tuple[str, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file)
        # line_num is the physical line a row ends on (the header is line 1).
        return [(f"line {reader.line_num}", row) for row in reader]


def _read_parquet(path: Path) -> list[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(
            f"{path.name}: reading Parquet needs pyarrow, which is not installed. "
            "Fix: pip install pyarrow"
        ) from exc
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path.name} cannot be read as Parquet ({exc})") from None
    return [(f"row {index}", row) for index, row in enumerate(rows, start=1)]


# ------------------------------------------------------------------------- layouts


#: the roles chat templates know
MESSAGE_ROLES = ("system", "user", "assistant", "tool")


def detect_layout(record: dict[str, Any], where: str = "record") -> str:
    """Name of the layout (a key of :data:`LAYOUT_FIELDS`) that ``record`` is written in."""
    if "messages" in record:
        return "messages"
    if "instruction" in record or "output" in record:
        return "instruction"
    if "prompt" in record or "completion" in record:
        return "prompt/completion"
    if "text" in record:
        return "text"
    known = "; ".join(f"'{name}' ({', '.join(fields)})" for name, fields in LAYOUT_FIELDS.items())
    raise DataError(
        f"{where}: cannot tell the data layout from fields {sorted(record)}; "
        f"supported layouts: {known}"
    )


def empty_answers(examples: list[Example], what: str) -> str | None:
    """A note on records whose answer is empty (they teach only where to stop); a DataError
    when every record's is, since then there is nothing to learn."""
    empty = [e for e in examples if not e.completion.strip()]
    if examples and len(empty) == len(examples):
        raise DataError(f"{what}: the answers of all {len(examples)} records are empty (first: {empty[0].source}), "
                        "so there is nothing to learn; fill them in")
    if empty:
        return (f"{len(empty)} of {len(examples)} records of {what} have an empty answer (first: {empty[0].source}); "
                "they teach only where to stop")
    return None


def _to_example(record: dict[str, Any], layout: str, where: str, detected_from: str) -> Example:
    def text_field(name: str, required: bool = True) -> str:
        value = record.get(name)
        if value is None:
            if required:
                raise DataError(f"{where}: missing field '{name}' ({detected_from})")
            return ""
        if not isinstance(value, str):
            raise DataError(
                f"{where}: field '{name}' must be a string, got {type(value).__name__} "
                f"({detected_from})"
            )
        return value

    if layout == "messages":
        turns = _validated_messages(record.get("messages"), where, detected_from)
        return Example(prompt=turns[:-1], completion=turns[-1]["content"], source=where)
    if layout == "instruction":
        instruction, extra_input = text_field("instruction"), text_field("input", required=False)
        user_turn = f"{instruction}\n\n{extra_input}" if extra_input else instruction
        return Example(
            prompt=({"role": "user", "content": user_turn},),
            completion=text_field("output"),
            source=where,
        )
    if layout == "prompt/completion":
        return Example(
            prompt=text_field("prompt"), completion=text_field("completion"), source=where
        )
    return Example(prompt="", completion=text_field("text"), source=where)


def _validated_messages(
    messages: Any, where: str, detected_from: str
) -> tuple[dict[str, str], ...]:
    if messages is None:
        raise DataError(f"{where}: missing field 'messages' ({detected_from})")
    if not isinstance(messages, list):
        raise DataError(
            f"{where}: field 'messages' must be a list of {{role, content}} objects, "
            f"got {type(messages).__name__} ({detected_from})"
        )
    turns = []
    for index, message in enumerate(messages):
        field = f"messages[{index}]"
        if not isinstance(message, dict):
            raise DataError(
                f"{where}: field '{field}' must be an object, got {type(message).__name__}"
            )
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                problem = (
                    "missing" if message.get(key) is None else f"a {type(message[key]).__name__}"
                )
                raise DataError(f"{where}: field '{field}.{key}' must be a string, is {problem}")
        if message["role"] not in MESSAGE_ROLES:
            raise DataError(f"{where}: field '{field}.role' is {message['role']!r}; allowed: {', '.join(MESSAGE_ROLES)}")
        turns.append({"role": message["role"], "content": message["content"]})
    if len(turns) < 2 or turns[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: field 'messages' must hold at least one prompt turn followed by the "
            "assistant's answer as the last message"
        )
    return tuple(turns)


# --------------------------------------------------------------------------- prompts


def build_prompt(tokenizer: Any, example: Example) -> str:
    """The prompt text the model sees before its answer, at training and at generation time."""
    if not example.is_chat:
        return example.prompt
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            list(example.prompt), tokenize=False, add_generation_prompt=True
        )
    turns = [
        f"{_PLAIN_ROLE_HEADERS.get(turn['role'], '### ' + turn['role'].title() + ':')}\n"
        f"{turn['content']}"
        for turn in example.prompt
    ]
    return "\n\n".join(turns) + f"\n\n{_PLAIN_ROLE_HEADERS['assistant']}\n"


def _completion_text(tokenizer: Any, example: Example, prompt_text: str) -> str:
    """The answer as it follows the prompt, ending with the end-of-turn token or EOS."""
    eos = tokenizer.eos_token or ""
    if not (example.is_chat and tokenizer.chat_template):
        return example.completion + eos
    conversation = [*example.prompt, {"role": "assistant", "content": example.completion}]
    full_text = tokenizer.apply_chat_template(conversation, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise DataError(
            f"{example.source}: the tokenizer's chat template renders the prompt differently "
            "with and without the answer, so prompt tokens cannot be masked"
        )
    # Templates put a newline or similar after the end-of-turn token; the model should
    # learn to emit the end-of-turn token, not what the template writes after it.
    completion = full_text[len(prompt_text) :].rstrip()
    if not any(completion.endswith(token) for token in tokenizer.all_special_tokens):
        completion += eos
    return completion


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt, with the tokenizer's special tokens unless the text has them.

    Chat templates already write the BOS token into the text; adding it again would give
    the model a sequence it never saw in pre-training.
    """
    has_bos = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
    return tokenizer(text, add_special_tokens=not has_bos)["input_ids"]


# ---------------------------------------------------------------------------- tokenising


class PromptTooLongError(DataError):
    """An example's prompt fills ``max_length``, leaving no answer token to train."""


def tokenize_example(
    tokenizer: Any, example: Example, max_length: int, completion_only: bool = True
) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` for one example.

    With ``completion_only`` (the default) the labels of prompt tokens are ``-100``, so only
    the answer is trained; plain-text examples have no prompt and train every token.
    Sequences longer than ``max_length`` are cut at the end.

    Raises:
        PromptTooLongError: the prompt alone fills ``max_length``, leaving no answer token.
    """
    prompt_text = build_prompt(tokenizer, example)
    completion_text = _completion_text(tokenizer, example, prompt_text)
    prompt_ids = encode_prompt(tokenizer, prompt_text)
    full_ids = encode_prompt(tokenizer, prompt_text + completion_text)
    if full_ids[: len(prompt_ids)] != prompt_ids or len(full_ids) <= len(prompt_ids):
        # The tokenizer merged tokens across the prompt/answer boundary. Generation starts
        # from the prompt's own tokens, so train on exactly those followed by the answer's.
        full_ids = prompt_ids + tokenizer(completion_text, add_special_tokens=False)["input_ids"]

    prompt_length = len(prompt_ids)
    if prompt_length >= max_length:
        raise PromptTooLongError(
            f"{example.source or 'example'}: the prompt is {prompt_length} tokens, so "
            f"max_length={max_length} leaves no answer token to train; raise max_length"
        )
    input_ids = full_ids[:max_length]
    masked = prompt_length if completion_only else 0
    labels = [IGNORE_INDEX] * masked + input_ids[masked:]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize_examples(
    tokenizer: Any, examples: Iterable[Example], max_length: int, completion_only: bool = True
) -> list[dict[str, list[int]]]:
    """Tokenise many examples, skipping (and reporting) those whose prompt fills max_length."""
    features, skipped = [], []
    for example in examples:
        try:
            feature = tokenize_example(tokenizer, example, max_length, completion_only)
        except PromptTooLongError:
            skipped.append(example.source)
            continue
        if example.task is not None:  # the collator stacks token lists only; the task rides along
            feature["task"] = example.task
        features.append(feature)
    if skipped:
        logger.warning(
            "skipped %d example(s) whose prompt is longer than max_length=%d (first: %s)",
            len(skipped), max_length, skipped[0],
        )  # fmt: skip
    if not features:
        raise DataError(f"every example's prompt is longer than max_length={max_length}")
    return features


# ----------------------------------------------------------------------------- batching


@dataclass(frozen=True)
class PadCollator:
    """Stack tokenised examples into a batch, right-padded to the longest one.

    Padding gets ``attention_mask`` 0 and label ``-100``, so it is neither attended to nor
    trained, whichever token id fills it.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch = {}
        for key, pad_value in fill.items():
            rows = [
                feature[key] + [pad_value] * (length - len(feature[key])) for feature in features
            ]
            batch[key] = torch.tensor(rows, dtype=torch.long)
        return batch


def batch_indices(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    group_by_length: bool = False,
    drop_last: bool = False,
) -> list[list[int]]:
    """Split example indices into batches.

    With ``group_by_length``, examples are shuffled, cut into windows of 50 batches, and
    sorted by length inside each window before batching, so a batch holds examples of
    similar length (less padding) while batch order and membership still vary with the
    seed. Pass a different ``seed`` per epoch for a new order each epoch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        window = 50 * batch_size
        order = [
            index
            for start in range(0, len(order), window)
            for index in sorted(
                order[start : start + window], key=lambda i: lengths[i], reverse=True
            )
        ]
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if shuffle and group_by_length:
        # Sorting made neighbouring batches alike; shuffle so lengths do not trend over an epoch.
        rng.shuffle(batches)
    return batches
