"""Generate deltatune's bundled demo data set: date normalisation to ISO 8601.

Each record asks for one date, written in one of several human styles, to be rewritten as
``YYYY-MM-DD``::

    {"instruction": "Rewrite the date in ISO 8601 format (YYYY-MM-DD).",
     "input": "the 5th of March, 2021", "output": "2021-03-05"}

Why this task: the rule is small and fully learnable (month name -> number, zero padding,
digits copied), outputs are ten characters so evaluation is exact match, and yet the
bundled SmolLM2-135M-Instruct gets almost none right before tuning (it answers in prose,
mixes up day and month, or invents digits). A LoRA fine-tune of a few minutes on CPU brings
it close to perfect, which makes the effect of tuning visible at a glance.

The split is by date: every (year, month, day) appears in at most one of train and test,
so test inputs are never seen in training, in any style. Numeric styles are only used
where the order of the fields is unambiguous (year first, or the month spelled out).

The output is deterministic: the same seed gives byte-identical files. Run from the
repository root::

    python scripts/make_demo_data.py            # writes src/deltatune/data/demo/
    python scripts/make_demo_data.py --out DIR --train 400 --test 100 --seed 20240521
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from collections.abc import Callable
from pathlib import Path

INSTRUCTION = "Rewrite the date in ISO 8601 format (YYYY-MM-DD)."
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "deltatune" / "data" / "demo"
DEFAULT_SEED = 20240521
FIRST_YEAR, LAST_YEAR = 1950, 2049

MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def ordinal(day: int) -> str:
    """1 -> '1st', 2 -> '2nd', 11 -> '11th', 22 -> '22nd'."""
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def month_abbreviation(month: int) -> str:
    return MONTHS[month - 1][:3]


# One function per writing style; each renders a date unambiguously.
STYLES: dict[str, Callable[[dt.date], str]] = {
    "month_day_year": lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    "day_month_year": lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    "abbrev_ordinal": lambda d: f"{month_abbreviation(d.month)} {ordinal(d.day)}, {d.year}",
    "abbrev_dotted": lambda d: f"{month_abbreviation(d.month)}. {d.day}, {d.year}",
    "the_nth_of": lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    "weekday": lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",
    "dashed_abbrev": lambda d: f"{d.day:02d}-{month_abbreviation(d.month)}-{d.year}",
    "upper_abbrev": lambda d: f"{d.day:02d} {month_abbreviation(d.month).upper()} {d.year}",
    "year_first_words": lambda d: f"{d.year}, {MONTHS[d.month - 1]} {ordinal(d.day)}",
    "lowercase": lambda d: f"{MONTHS[d.month - 1].lower()} {d.day} {d.year}",
    "year_slash": lambda d: f"{d.year}/{d.month}/{d.day}",
    "written_out": lambda d: f"{ordinal(d.day)} day of {MONTHS[d.month - 1]} in the year {d.year}",
}


def sample_dates(rng: random.Random, count: int) -> list[dt.date]:
    """``count`` distinct dates, uniform over the days of FIRST_YEAR..LAST_YEAR."""
    first = dt.date(FIRST_YEAR, 1, 1).toordinal()
    last = dt.date(LAST_YEAR, 12, 31).toordinal()
    return [dt.date.fromordinal(n) for n in rng.sample(range(first, last + 1), count)]


def make_records(rng: random.Random, dates: list[dt.date]) -> list[dict[str, str]]:
    """One record per date; styles are dealt round-robin in a shuffled order so every
    style is (near-)equally represented in each split."""
    style_names = list(STYLES)
    rng.shuffle(style_names)
    records = []
    for index, date in enumerate(dates):
        style = STYLES[style_names[index % len(style_names)]]
        records.append(
            {"instruction": INSTRUCTION, "input": style(date), "output": date.isoformat()}
        )
    rng.shuffle(records)
    return records


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--train", type=int, default=400, help="number of training records")
    parser.add_argument("--test", type=int, default=100, help="number of test records")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    # Sampling all dates at once without replacement is what keeps the splits disjoint.
    dates = sample_dates(rng, args.train + args.test)
    train = make_records(rng, dates[: args.train])
    test = make_records(rng, dates[args.train :])

    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "test.jsonl", test)
    print(f"wrote {len(train)} train and {len(test)} test records to {args.out}")


if __name__ == "__main__":
    main()
