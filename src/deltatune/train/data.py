"""Instruction-tuning data: read records, recognise their layout, tokenise, batch.

Supported files: JSONL, JSON (a list of objects), CSV and Parquet (needs ``pyarrow``).
Supported layouts, recognised from the first record:

========================  ==========================================  ===================
layout                    fields                                      what is trained
========================  ==========================================  ===================
``messages``              ``messages``: [{"role", "content"}, ...]    the assistant turns
                          (optional ``tools``)                        (``train_on``)
``conversations``         ``conversations``: [{"from", "value"},      the same (ShareGPT:
                          ...]                                        ``human``, ``gpt``...)
``instruction``           ``instruction``, ``output``, ``input``      ``output``
                          (optional)
``prompt/completion``     ``prompt``, ``completion`` (raw text)       ``completion``
``text``                  ``text``                                    every token
========================  ==========================================  ===================

Chat-like layouts (``messages``, ``conversations``, ``instruction``) are rendered with the
tokenizer's chat template, so the model is tuned in the format it is prompted with;
tokenizers without a template get a plain ``### Instruction: / ### Response:`` format.
``prompt/completion`` records are used verbatim. Every completion ends with the end-of-turn
token (or EOS), so the tuned model learns to stop.

Which tokens of a conversation train (``train_on``): ``assistant`` (the default) every
assistant turn, tool calls included; ``last`` the final one only; ``all`` every token.
System, user and tool turns are context. The assistant spans are found from the chat template
itself, not from marker strings: turn i's answer starts where the conversation before it,
rendered with the generation prompt, ends, and stops where the conversation through it,
rendered alone, departs from the whole one (:func:`answer_spans`). A template that renders
earlier turns differently once later turns follow (one that moves the system prompt, or drops
earlier reasoning) has no such spans; its conversations train as one example per assistant
turn, each prompted as the template prompts that turn. A conversation longer than
``max_length`` is cut after the last assistant turn that fits, and the count of turns dropped
is logged.

Batching pads to the longest sequence in the batch; :func:`batch_indices` can group
examples of similar length to waste less compute on padding. ``deltatune train`` packs its
batches instead where the model computes them exactly (:mod:`.packing`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Sequence
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
    "conversations": ("conversations",),
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

#: which tokens of a conversation train: every assistant turn, the final one, or every token
TRAIN_ON = ("assistant", "last", "all")

#: ShareGPT's speaker names (``from``) and the chat roles they are
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "function_call": "assistant", "observation": "tool", "tool": "tool",
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

    prompt: str | tuple[dict[str, Any], ...]
    completion: str
    source: str = ""
    task: str | None = None
    tool_calls: tuple[dict[str, Any], ...] = ()  # the final answer's tool calls, if it makes any
    tools: tuple[dict[str, Any], ...] = ()  # tool schemas the chat template is given

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, tuple)

    @property
    def conversation(self) -> tuple[dict[str, Any], ...]:
        """Every turn of a chat example, the final answer included."""
        answer: dict[str, Any] = {"role": "assistant", "content": self.completion}
        if self.tool_calls:
            answer["tool_calls"] = list(self.tool_calls)
        return (*self.prompt, answer)

    def turns(self) -> list["Example"]:
        """One example per assistant turn that answers in text, its earlier turns as its prompt:
        what per-turn evaluation scores (a tool call has no text to compare)."""
        if not self.is_chat:
            return [self]
        turns = self.conversation
        return [
            dataclasses.replace(self, prompt=turns[:index], completion=turn["content"], tool_calls=(),
                                source=f"{self.source} turn {index + 1}" if index < len(turns) - 1 else self.source)
            for index, turn in enumerate(turns)
            if turn["role"] == "assistant" and turn["content"] and not turn.get("tool_calls")
        ]


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
    if "conversations" in record:
        return "conversations"
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

    if layout in ("messages", "conversations"):
        turns = _validated_messages(record.get(layout), layout, where, detected_from)
        tools = record.get("tools") or ()
        if isinstance(tools, str):  # ShareGPT files often hold the schemas as a JSON string
            tools = _json_field(tools, "tools", where)
        if not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools):
            raise DataError(f"{where}: field 'tools' must be a list of tool schemas (objects), got {tools!r:.80}")
        return Example(prompt=turns[:-1], completion=turns[-1]["content"], source=where,
                       tool_calls=tuple(turns[-1].get("tool_calls", ())), tools=tuple(tools))
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


def _json_field(text: str, field: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: field {field!r} is a string but not JSON ({exc.msg})") from None


def _validated_messages(
    messages: Any, layout: str, where: str, detected_from: str
) -> tuple[dict[str, Any], ...]:
    """The turns as chat-template messages (``role``, ``content``; ``tool_calls`` on assistant
    turns that call tools; ``name`` and ``tool_call_id`` kept for tool turns). ShareGPT turns
    (``from``, ``value``) are translated: a ``function_call`` turn becomes an assistant turn
    calling the tool its value names, an ``observation`` the tool's answer."""
    if messages is None:
        raise DataError(f"{where}: missing field {layout!r} ({detected_from})")
    keys = ("from", "value") if layout == "conversations" else ("role", "content")
    if not isinstance(messages, list):
        raise DataError(
            f"{where}: field {layout!r} must be a list of {{{', '.join(keys)}}} objects, "
            f"got {type(messages).__name__} ({detected_from})"
        )
    turns = []
    for index, message in enumerate(messages):
        field = f"{layout}[{index}]"
        if not isinstance(message, dict):
            raise DataError(
                f"{where}: field '{field}' must be an object, got {type(message).__name__}"
            )
        speaker, text = message.get(keys[0]), message.get(keys[1])
        calls = message.get("tool_calls")
        if text is None and calls:  # an assistant turn that only calls tools has no text
            text = ""
        for key, value in zip(keys, (speaker, text)):
            if not isinstance(value, str):
                problem = "missing" if value is None else f"a {type(value).__name__}"
                raise DataError(f"{where}: field '{field}.{key}' must be a string, is {problem}")
        if layout == "conversations":
            if speaker not in SHAREGPT_ROLES:
                raise DataError(f"{where}: field '{field}.from' is {speaker!r}; allowed: {', '.join(SHAREGPT_ROLES)}")
            turn: dict[str, Any] = {"role": SHAREGPT_ROLES[speaker], "content": text}
            if speaker == "function_call":
                call = _json_field(text, f"{field}.value", where)
                if not isinstance(call, dict) or "name" not in call:
                    raise DataError(f"{where}: field '{field}.value' must name the function called "
                                    f'({{"name": ..., "arguments": ...}}), got {text!r:.80}')
                turn = {"role": "assistant", "content": "",
                        "tool_calls": [{"type": "function", "function": {"name": call["name"],
                                                                          "arguments": call.get("arguments", {})}}]}
        else:
            if speaker not in MESSAGE_ROLES:
                raise DataError(f"{where}: field '{field}.role' is {speaker!r}; allowed: {', '.join(MESSAGE_ROLES)}")
            turn = {"role": speaker, "content": text}
            if calls:
                if speaker != "assistant" or not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                    raise DataError(f"{where}: field '{field}.tool_calls' must be a list of objects on an assistant turn")
                turn["tool_calls"] = calls
            turn.update({key: message[key] for key in ("name", "tool_call_id") if isinstance(message.get(key), str)})
        turns.append(turn)
    if len(turns) < 2 or turns[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: field {layout!r} must hold at least one prompt turn followed by the "
            "assistant's answer as the last message"
        )
    return tuple(turns)


# --------------------------------------------------------------------------- prompts


def render_chat(tokenizer: Any, turns: Sequence[dict[str, Any]], *, generation_prompt: bool,
                tools: Sequence[dict[str, Any]] = (), source: str = "") -> str:
    """``turns`` as the model reads them: through the tokenizer's chat template, or the plain
    ``### Instruction:`` format when it has none. A template that refuses the conversation
    (Gemma's has no system role) raises a DataError with the template's own reason."""
    if tokenizer.chat_template:
        from jinja2 import TemplateError

        try:
            return tokenizer.apply_chat_template(list(turns), tools=list(tools) or None, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        except TemplateError as exc:
            raise DataError(f"{source or 'a conversation'}: the tokenizer's chat template refuses it ({exc})") from None
    text = "\n\n".join(
        f"{_PLAIN_ROLE_HEADERS.get(turn['role'], '### ' + turn['role'].title() + ':')}\n{_plain_content(turn)}"
        for turn in turns
    )
    return text + f"\n\n{_PLAIN_ROLE_HEADERS['assistant']}\n" if generation_prompt else text


def _plain_content(turn: dict[str, Any]) -> str:
    calls = turn.get("tool_calls")
    return turn["content"] + "".join(f"\n{json.dumps(call)}" for call in calls or ())


def build_prompt(tokenizer: Any, example: Example) -> str:
    """The prompt text the model sees before its answer, at training and at generation time."""
    if not example.is_chat:
        return example.prompt
    return render_chat(tokenizer, example.prompt, generation_prompt=True, tools=example.tools, source=example.source)


class TurnsRenderedDifferently(DataError):
    """The chat template renders a conversation's earlier turns differently once later turns
    follow, so its whole rendering holds no span that is exactly one turn's answer."""


def answer_spans(tokenizer: Any, example: Example, train_on: str = "assistant") -> tuple[str, list[tuple[int, int]]]:
    """The text of ``example`` as trained and the character spans of its answers.

    A chat example's answer i (the i-th assistant turn) starts where the turns before it,
    rendered with the generation prompt, end (that text must begin the whole conversation's),
    and ends where the turns through it, rendered on their own, depart from the whole one: a
    template may close a conversation differently from a turn (Phi-3 adds EOS), so the end is
    backed out of any special token it falls inside and then out of trailing whitespace (the
    newline a template writes after the end-of-turn token is the next turn's, not the answer's).
    ``train_on="last"`` gives the final answer only. The text stops at the final answer's end,
    which is the end-of-turn token, or EOS appended when the template wrote none.

    Raises:
        TurnsRenderedDifferently: the template renders the history differently later on.
        DataError: the template refuses the conversation.
    """
    if train_on not in TRAIN_ON:
        raise DataError(f"train_on={train_on!r} is not valid; allowed: {', '.join(TRAIN_ON)}")
    eos = tokenizer.eos_token or ""
    if not example.is_chat:
        text = example.prompt + example.completion
        return text + eos, [(len(example.prompt), len(text) + len(eos))]
    turns = example.conversation
    render = lambda part, generation_prompt: render_chat(  # noqa: E731
        tokenizer, part, generation_prompt=generation_prompt, tools=example.tools, source=example.source)
    whole = render(turns, False)
    answers = [i for i, turn in enumerate(turns) if turn["role"] == "assistant"]
    if train_on == "last":
        answers = answers[-1:]
    special = atomic_tokens(tokenizer)
    spans = []
    for index in answers:
        before = render(turns[:index], True)
        through = render(turns[: index + 1], False)
        if not whole.startswith(before):
            raise TurnsRenderedDifferently(
                f"{example.source or 'a conversation'}: the chat template renders the turns before "
                f"turn {index + 1} differently once later turns follow")
        end = len(os.path.commonprefix([through, whole]))
        if index == len(turns) - 1:
            # the final answer is compared with itself followed by a user turn, so that what a
            # template writes only at the end of a conversation (Phi-3's EOS) is not part of it
            # (unless the template renders that turn differently, moving its system prompt there)
            continued = len(os.path.commonprefix([through, _followed_by_user(render, turns)]))
            end = continued if continued > len(before) else end
        for token in special:  # a departure inside a special token: the token is the next turn's
            start = whole.find(token, max(0, end - len(token) + 1), end + len(token) - 1)
            if start != -1 and start < end:
                end = start
        while end > len(before) and whole[end - 1].isspace():
            end -= 1
        if end <= len(before) and turns[index]["content"]:
            raise TurnsRenderedDifferently(
                f"{example.source or 'a conversation'}: the chat template renders the answer of turn "
                f"{index + 1} differently once later turns follow")
        spans.append((len(before), end))
    text = whole[: spans[-1][1]]
    if not any(text.endswith(token) for token in special):
        text += eos
        spans[-1] = (spans[-1][0], len(text))
    return text, spans


def atomic_tokens(tokenizer: Any) -> list[str]:
    """The texts the tokenizer never splits: its special and added tokens (a chat template's
    turn markers are among them, whether or not the tokenizer calls them special)."""
    return sorted({token for token in [*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()] if token})


def _followed_by_user(render: Callable[[Sequence[dict[str, Any]], bool], str], turns: Sequence[dict[str, Any]]) -> str:
    """The conversation rendered with one more (user) turn; itself where the template refuses one."""
    try:
        return render([*turns, {"role": "user", "content": "?"}], False)
    except DataError:
        return render(turns, False)


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt, with the tokenizer's special tokens unless the text has them.

    Chat templates already write the BOS token into the text; adding it again would give
    the model a sequence it never saw in pre-training.
    """
    has_bos = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
    return tokenizer(text, add_special_tokens=not has_bos)["input_ids"]


def _token_boundaries(tokenizer: Any, text: str, cuts: Sequence[int]) -> tuple[list[int], list[int]]:
    """``text``'s token ids and the token index of each character offset in ``cuts``.

    The whole text tokenised, where each cut falls between two of its tokens (the text up to
    the cut tokenises as a prefix of the whole); otherwise the tokenizer merged characters
    across a cut, and the pieces between cuts are tokenised one by one, so that every answer
    starts with the token generation starts with after its prompt."""
    ids = encode_prompt(tokenizer, text)
    positions = []
    for cut in cuts:
        head = encode_prompt(tokenizer, text[:cut]) if cut else []
        if ids[: len(head)] != head:
            break
        positions.append(len(head))
    else:
        return ids, positions
    ids, positions, previous = [], [], 0
    for cut in [*cuts, len(text)]:
        piece = text[previous:cut]
        if piece:
            ids += encode_prompt(tokenizer, piece) if not ids else tokenizer(piece, add_special_tokens=False)["input_ids"]
        positions.append(len(ids))
        previous = cut
    return ids, positions[:-1]


# ---------------------------------------------------------------------------- tokenising


class PromptTooLongError(DataError):
    """An example's prompt fills ``max_length``, leaving no answer token to train."""


def tokenize_example(
    tokenizer: Any, example: Example, max_length: int, train_on: str = "assistant"
) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` for one example.

    Labels are ``-100`` outside the answers :func:`answer_spans` finds (everywhere trained with
    ``train_on="all"``); plain-text examples have no prompt and train every token. A sequence
    longer than ``max_length`` is cut after the last answer that fits, whole (the key
    ``dropped_turns`` then counts the turns cut off); when not even the first answer fits, it
    is cut at ``max_length``.

    Raises:
        PromptTooLongError: the prompt alone fills ``max_length``, leaving no answer token.
        TurnsRenderedDifferently: see :func:`answer_spans`.
    """
    text, spans = answer_spans(tokenizer, example, train_on)
    ids, bounds = _token_boundaries(tokenizer, text, [offset for span in spans for offset in span])
    token_spans = list(zip(bounds[0::2], bounds[1::2]))
    token_spans[-1] = (token_spans[-1][0], len(ids))
    prompt_length = token_spans[0][0]
    if prompt_length >= max_length:
        raise PromptTooLongError(
            f"{example.source or 'example'}: the prompt is {prompt_length} tokens, so "
            f"max_length={max_length} leaves no answer token to train; raise max_length"
        )
    dropped = 0
    if len(ids) > max_length:
        fitting = [span for span in token_spans if span[1] <= max_length]
        if fitting:
            dropped = len(example.conversation) - _turns_through(example, len(fitting), train_on)
            token_spans = fitting
            ids = ids[: fitting[-1][1]]
        else:
            ids = ids[:max_length]
    if train_on == "all":
        labels = list(ids)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in token_spans:
            labels[start:end] = ids[start:end]
    feature = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
    if dropped:
        feature["dropped_turns"] = dropped
    return feature


def _turns_through(example: Example, answers: int, train_on: str) -> int:
    """How many turns of ``example`` its first ``answers`` answers (of those trained) span."""
    if train_on == "last":  # one answer, the final turn
        return len(example.conversation)
    seen = 0
    for index, turn in enumerate(example.conversation):
        seen += turn["role"] == "assistant"
        if seen == answers:
            return index + 1
    return len(example.conversation)


def tokenize_examples(
    tokenizer: Any, examples: Iterable[Example], max_length: int, train_on: str = "assistant"
) -> list[dict[str, list[int]]]:
    """Tokenise many examples, skipping (and reporting) those whose prompt fills max_length and
    reporting conversations cut at a turn boundary. A conversation whose template renders
    earlier turns differently later on trains as one example per assistant turn."""
    features, skipped, per_turn = [], [], []
    cut, dropped_turns = 0, 0
    for example in examples:
        try:
            found = [tokenize_example(tokenizer, example, max_length, train_on)]
        except TurnsRenderedDifferently:
            per_turn.append(example.source)
            found = []
            for turn in example.turns():
                try:
                    found.append(tokenize_example(tokenizer, turn, max_length, "last"))
                except PromptTooLongError:
                    skipped.append(turn.source)
        except PromptTooLongError:
            skipped.append(example.source)
            continue
        for feature in found:
            if "dropped_turns" in feature:
                cut += 1
                dropped_turns += feature.pop("dropped_turns")
            if example.task is not None:  # the collator stacks token lists only; the task rides along
                feature["task"] = example.task
            features.append(feature)
    if per_turn:
        logger.warning(
            "the chat template renders earlier turns differently once later turns follow, so %d "
            "conversation(s) train as one example per assistant turn (first: %s)", len(per_turn), per_turn[0])
    if cut:
        logger.warning(
            "cut %d conversation(s) longer than max_length=%d after their last whole answer that fits, "
            "dropping %d turn(s) in all", cut, max_length, dropped_turns)
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
