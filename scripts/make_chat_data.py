"""Generate deltatune's bundled multi-turn chat data: a date, then questions about it.

Each record is a conversation of three assistant turns, every one checkable by exact match::

    {"messages": [
        {"role": "user", "content": "Rewrite the date in ISO 8601 format (YYYY-MM-DD).\\n\\nthe 5th of March, 2021"},
        {"role": "assistant", "content": "2021-03-05"},
        {"role": "user", "content": "Which month is that, as a number?"},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "And the year?"},
        {"role": "assistant", "content": "2021"}]}

The first turn is the bundled date task (``scripts/make_demo_data.py``, its twelve styles); the
two follow-ups ask for two of the year, the month (as a number) and the day of the month, in a
seeded order and wording, so an answer depends on the turns before it. ``deltatune train
--data .../chat/train.jsonl`` trains all three answers of every conversation (``--train-on
assistant``), and held-out exact match is scored per turn, each generated after the reference
turns before it. Train and test never share a date.

Deterministic: the same seed gives byte-identical files. From the repository root::

    python scripts/make_chat_data.py        # writes src/deltatune/data/chat/
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
from pathlib import Path

from make_demo_data import INSTRUCTION, STYLES, sample_dates, write_jsonl

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "deltatune" / "data" / "chat"
DEFAULT_SEED = 20261205

QUESTIONS = {
    "year": (["Which year is that?", "What is the year?"], "And the year?", lambda d: str(d.year)),
    "month": (["Which month is that, as a number?", "What is the month, as a number?"], "And the month, as a number?",
              lambda d: str(d.month)),
    "day": (["Which day of the month is that?", "What is the day of the month?"], "And the day of the month?",
            lambda d: str(d.day)),
}


def conversation(date: dt.date, style: str, rng: random.Random) -> dict:
    first, second = rng.sample(list(QUESTIONS), 2)
    turns = [{"role": "user", "content": f"{INSTRUCTION}\n\n{STYLES[style](date)}"},
             {"role": "assistant", "content": date.isoformat()}]
    for index, field in enumerate((first, second)):
        openings, follow_up, answer = QUESTIONS[field]
        turns += [{"role": "user", "content": rng.choice(openings) if index == 0 else follow_up},
                  {"role": "assistant", "content": answer(date)}]
    return {"messages": turns}


def make_records(rng: random.Random, dates: list[dt.date]) -> list[dict]:
    styles = list(STYLES)
    rng.shuffle(styles)
    records = [conversation(date, styles[index % len(styles)], rng) for index, date in enumerate(dates)]
    rng.shuffle(records)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--train", type=int, default=300, help="number of training conversations")
    parser.add_argument("--test", type=int, default=60, help="number of held-out conversations")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    dates = sample_dates(rng, args.train + args.test)
    train, test = make_records(rng, dates[: args.train]), make_records(rng, dates[args.train :])
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "test.jsonl", test)
    print(f"wrote {len(train)} train and {len(test)} test conversations to {args.out}")


if __name__ == "__main__":
    main()
