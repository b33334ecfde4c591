"""Data loading, layout detection, tokenisation with completion-only labels, batching."""

from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from deltatune.errors import DataError, ModelLoadError
from deltatune.models import bundled_model_dir
from deltatune.train.data import (
    IGNORE_INDEX,
    Example,
    PadCollator,
    batch_indices,
    build_prompt,
    demo_data_path,
    detect_layout,
    encode_prompt,
    load_examples,
    load_records,
    tokenize_example,
    tokenize_examples,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
INSTRUCTION = "Rewrite the date in ISO 8601 format (YYYY-MM-DD)."


@pytest.fixture(scope="module")
def tokenizer():
    """The bundled model's tokenizer (ChatML template, ``<|im_end|>`` as EOS)."""
    try:
        return AutoTokenizer.from_pretrained(bundled_model_dir())
    except ModelLoadError as exc:
        pytest.skip(f"bundled model unavailable: {exc}")


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    """The same tokenizer without a chat template, to exercise the fallback prompt format."""
    without_template = copy.deepcopy(tokenizer)
    without_template.chat_template = None
    return without_template


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def instruction_record(date_input="March 5, 2021", output="2021-03-05"):
    return {"instruction": INSTRUCTION, "input": date_input, "output": output}


def trained_part(features: dict) -> list[int]:
    return [
        token
        for token, label in zip(features["input_ids"], features["labels"])
        if label != IGNORE_INDEX
    ]


# ----------------------------------------------------------------------- layouts


def test_instruction_layout_joins_instruction_and_input(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [instruction_record(), {"instruction": "Say hi.", "output": "hi"}]
    )
    with_input, without_input = load_examples(path)
    assert with_input.prompt == ({"role": "user", "content": f"{INSTRUCTION}\n\nMarch 5, 2021"},)
    assert with_input.completion == "2021-03-05"
    assert with_input.source == "d.jsonl line 1"
    assert without_input.prompt == ({"role": "user", "content": "Say hi."},)


def test_messages_layout_splits_off_the_last_assistant_turn(tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    (example,) = load_examples(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]))
    assert example.is_chat
    assert list(example.prompt) == messages[:-1]
    assert example.completion == "6"


def test_prompt_completion_and_text_layouts(tmp_path):
    (pair,) = load_examples(
        write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: 1+1\nA:", "completion": " 2"}])
    )
    assert (pair.prompt, pair.completion, pair.is_chat) == ("Q: 1+1\nA:", " 2", False)
    (plain,) = load_examples(write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}]))
    assert (plain.prompt, plain.completion) == ("", "Once upon a time.")


def test_unknown_layout_lists_the_supported_ones():
    with pytest.raises(DataError, match=r"cannot tell the data layout.*'question'.*'messages'"):
        detect_layout({"question": "?", "answer": "!"}, "x.jsonl line 1")


# ----------------------------------------------------------------------- file formats


def test_json_csv_and_jsonl_give_the_same_records(tmp_path):
    records = [instruction_record(), instruction_record("5 March 2021")]
    (tmp_path / "d.json").write_text(json.dumps(records))
    with (tmp_path / "d.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(records)
    write_jsonl(tmp_path / "d.jsonl", records)
    for name in ("d.json", "d.csv", "d.jsonl"):
        assert load_records(tmp_path / name) == records, name


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    records = [instruction_record(), instruction_record("5 March 2021")]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    assert load_records(tmp_path / "d.parquet") == records
    assert load_examples(tmp_path / "d.parquet")[1].source == "d.parquet row 2"


def test_parquet_without_pyarrow_says_how_to_fix(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="pip install pyarrow"):
        load_records(tmp_path / "d.parquet")


def test_blank_jsonl_lines_are_skipped_but_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps(instruction_record()) + "\n\n" + json.dumps({"instruction": "x"}) + "\n"
    )
    with pytest.raises(DataError, match="d.jsonl line 3: missing field 'output'"):
        load_examples(path)


# ----------------------------------------------------------------------- errors


def test_missing_field_names_file_line_field_and_layout(tmp_path):
    records = [instruction_record()] * 16 + [{"instruction": INSTRUCTION, "input": "May 1, 2020"}]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    with pytest.raises(DataError) as error:
        load_examples(path)
    assert str(error.value) == (
        "data.jsonl line 17: missing field 'output' (layout 'instruction', detected from line 1)"
    )


def test_wrong_type_names_the_field_and_type(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [instruction_record(), instruction_record(output=20210305)]
    )
    with pytest.raises(DataError, match="d.jsonl line 2: field 'output' must be a string, got int"):
        load_examples(path)


def test_csv_errors_name_the_physical_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"a",b\n"multi\nline",\n')
    # Row 2 starts on line 3 and ends on line 4; its completion cell is empty, not missing.
    assert load_examples(path)[1].completion == ""
    path.write_text("prompt,completion\na,b\nc\n")
    with pytest.raises(DataError, match="d.csv line 3: missing field 'completion'"):
        load_examples(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no records"),
        ("\n\n", "holds no records"),
        ('{"text": "a"}\n{"text": \n', "line 2: invalid JSON"),
        ("[1, 2]", "record 1: expected an object"),
        (
            '{"messages": [{"role": "user", "content": "hi"}]}',
            "assistant's answer as the last message",
        ),
        (
            '{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}',
            r"'messages\[0\].content'",
        ),
        ('{"messages": "hi"}', "field 'messages' must be a list"),
    ],
)
def test_malformed_files(tmp_path, content, message):
    path = tmp_path / ("d.json" if content.startswith("[") else "d.jsonl")
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_examples(path)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown data format '.txt'"):
        load_records(tmp_path / "d.txt")


# ----------------------------------------------------------------------- tokenising


def test_completion_only_labels_mask_the_prompt(tokenizer):
    example = Example(
        prompt=({"role": "user", "content": f"{INSTRUCTION}\n\nMarch 5, 2021"},),
        completion="2021-03-05",
    )
    features = tokenize_example(tokenizer, example, max_length=256)
    prompt_ids = encode_prompt(tokenizer, build_prompt(tokenizer, example))

    assert features["input_ids"][: len(prompt_ids)] == prompt_ids
    assert features["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert tokenizer.decode(trained_part(features)) == "2021-03-05<|im_end|>"
    assert features["attention_mask"] == [1] * len(features["input_ids"])
    # The prompt is rendered with the chat template and ends where generation starts.
    assert build_prompt(tokenizer, example).endswith("<|im_start|>assistant\n")


def test_training_on_all_tokens(tokenizer):
    example = Example(prompt=({"role": "user", "content": "hi"},), completion="hello")
    features = tokenize_example(tokenizer, example, max_length=256, train_on="all")
    assert features["labels"] == features["input_ids"]


def test_multi_turn_with_train_on_last_trains_only_the_last_answer(tokenizer):
    turns = (
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
    )
    features = tokenize_example(tokenizer, Example(prompt=turns, completion="6"), max_length=256, train_on="last")
    assert tokenizer.decode(trained_part(features)) == "6<|im_end|>"


def test_raw_prompt_completion_and_plain_text(tokenizer):
    pair = tokenize_example(tokenizer, Example(prompt="Q: 1+1\nA:", completion=" 2"), max_length=64)
    assert tokenizer.decode(trained_part(pair)) == " 2" + tokenizer.eos_token
    text = tokenize_example(
        tokenizer, Example(prompt="", completion="Once upon a time."), max_length=64
    )
    assert text["labels"] == text["input_ids"]
    assert tokenizer.decode(text["input_ids"]) == "Once upon a time." + tokenizer.eos_token


def test_tokenizer_without_chat_template_gets_a_plain_prompt(plain_tokenizer):
    example = Example(prompt=({"role": "user", "content": "Say hi."},), completion="hi")
    assert build_prompt(plain_tokenizer, example) == "### Instruction:\nSay hi.\n\n### Response:\n"
    features = tokenize_example(plain_tokenizer, example, max_length=64)
    assert plain_tokenizer.decode(trained_part(features)) == "hi" + plain_tokenizer.eos_token


def test_truncation_keeps_the_start_and_reports_prompts_that_fill_max_length(tokenizer):
    example = Example(
        prompt=({"role": "user", "content": "a somewhat longer question"},),
        completion="one two three four five six",
        source="d.jsonl line 4",
    )
    full = tokenize_example(tokenizer, example, max_length=512)
    prompt_length = full["labels"].count(IGNORE_INDEX)
    cut = tokenize_example(tokenizer, example, max_length=prompt_length + 2)
    assert cut["input_ids"] == full["input_ids"][: prompt_length + 2]
    assert len(trained_part(cut)) == 2
    with pytest.raises(DataError, match="d.jsonl line 4: the prompt is .* tokens"):
        tokenize_example(tokenizer, example, max_length=prompt_length)
    short = Example(prompt=({"role": "user", "content": "x"},), completion="y")
    kept = tokenize_examples(tokenizer, [example, short], max_length=prompt_length)
    assert len(kept) == 1  # the long-prompt example is skipped, with a warning


# ----------------------------------------------------------------------- batching


def test_collator_right_pads_with_ignored_labels():
    collate = PadCollator(pad_token_id=7)
    batch = collate([
        {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [-100, 2, 3]},
        {"input_ids": [4], "attention_mask": [1], "labels": [4]},
    ])  # fmt: skip
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["input_ids"].dtype == torch.long
    padded = PadCollator(pad_token_id=0, pad_to_multiple_of=8)(
        [{"input_ids": [1], "attention_mask": [1], "labels": [1]}]
    )
    assert padded["input_ids"].shape == (1, 8)


def test_batch_indices_cover_every_example_once_and_are_seeded():
    lengths = [(i * 37) % 101 for i in range(1000)]
    for group_by_length in (False, True):
        batches = batch_indices(lengths, 8, seed=3, group_by_length=group_by_length)
        assert sorted(i for batch in batches for i in batch) == list(range(1000))
        assert batches == batch_indices(lengths, 8, seed=3, group_by_length=group_by_length)
        assert batches != batch_indices(lengths, 8, seed=4, group_by_length=group_by_length)
    assert batch_indices(lengths, 8, shuffle=False)[0] == list(range(8))
    assert len(batch_indices(lengths[:20], 8, drop_last=True)) == 2


def test_length_grouping_reduces_padding():
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]

    def padding(batches):
        return sum(
            max(lengths[i] for i in batch) * len(batch) - sum(lengths[i] for i in batch)
            for batch in batches
        )

    assert (
        padding(batch_indices(lengths, 8, group_by_length=True))
        < padding(batch_indices(lengths, 8)) / 5
    )


# ----------------------------------------------------------------------- demo data


def test_demo_splits_are_disjoint_and_well_formed():
    train, test = load_records(demo_data_path("train")), load_records(demo_data_path("test"))
    assert (len(train), len(test)) == (400, 100)
    assert not {r["output"] for r in train} & {r["output"] for r in test}
    assert not {r["input"] for r in train} & {r["input"] for r in test}
    for record in train + test:
        assert set(record) == {"instruction", "input", "output"}
        assert len(record["output"]) == 10 and record["output"][4] == record["output"][7] == "-"


def test_demo_generator_reproduces_the_bundled_files(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "make_demo_data.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == demo_data_path(split).read_bytes()
