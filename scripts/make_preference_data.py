"""Generate deltatune's bundled preference data: date normalisation, a right and a wrong answer.

Each record is a chat-form preference pair for ``deltatune train --objective dpo|orpo|simpo``::

    {"prompt": [{"role": "user", "content": "Rewrite the date in ISO 8601 format (YYYY-MM-DD).\\n\\nthe 5th of March, 2021"}],
     "chosen": [{"role": "assistant", "content": "2021-03-05"}],
     "rejected": [{"role": "assistant", "content": "2021-05-03"}]}

The prompt is the bundled date task's (``scripts/make_demo_data.py``, the same twelve styles),
so the preferred answer is checkable: it is the date in ISO 8601, and a greedy answer can be
compared with it. The rejected answer is a near miss, one of five kinds dealt in turn: day and
month swapped (where both could be a month), a day off by one, a year off by one to ten, the
neighbouring month, or the right date in another format (``DD/MM/YYYY``). Train and test
never share a date, in any style.

Deterministic: the same seed gives byte-identical files. From the repository root::

    python scripts/make_preference_data.py      # writes src/deltatune/data/preference/
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
from pathlib import Path

from make_demo_data import INSTRUCTION, STYLES, sample_dates, write_jsonl

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "deltatune" / "data" / "preference"
DEFAULT_SEED = 20261204


def _shift_month(date: dt.date, months: int) -> dt.date:
    index = date.month - 1 + months
    year, month = date.year + index // 12, index % 12 + 1
    return date.replace(year=year, month=month, day=min(date.day, 28))


def near_misses(date: dt.date, rng: random.Random) -> dict[str, str]:
    """Wrong answers of each kind (a kind that cannot go wrong for this date is left out)."""
    wrong = {
        "day_off_by_one": (date + dt.timedelta(days=rng.choice([-1, 1]))).isoformat(),
        "year_off": date.replace(year=date.year + rng.choice([-1, 1]) * rng.randint(1, 10), day=min(date.day, 28)).isoformat(),
        "neighbouring_month": _shift_month(date, rng.choice([-1, 1])).isoformat(),
        "other_format": f"{date.day:02d}/{date.month:02d}/{date.year}",
    }
    if date.day <= 12 and date.day != date.month:
        wrong["day_month_swapped"] = f"{date.year}-{date.day:02d}-{date.month:02d}"
    return {kind: answer for kind, answer in wrong.items() if answer != date.isoformat()}


KINDS = ("day_month_swapped", "day_off_by_one", "year_off", "neighbouring_month", "other_format")


def make_records(rng: random.Random, dates: list[dt.date]) -> list[dict]:
    style_names = list(STYLES)
    rng.shuffle(style_names)
    records = []
    for index, date in enumerate(dates):
        wrong = near_misses(date, rng)
        kind = KINDS[index % len(KINDS)]
        rejected = wrong.get(kind) or wrong[sorted(wrong)[index % len(wrong)]]
        question = f"{INSTRUCTION}\n\n{STYLES[style_names[index % len(style_names)]](date)}"
        records.append({"prompt": [{"role": "user", "content": question}],
                        "chosen": [{"role": "assistant", "content": date.isoformat()}],
                        "rejected": [{"role": "assistant", "content": rejected}]})
    rng.shuffle(records)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--train", type=int, default=400, help="number of training pairs")
    parser.add_argument("--test", type=int, default=100, help="number of held-out pairs")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    dates = sample_dates(rng, args.train + args.test)  # distinct: the splits share no date
    train, test = make_records(rng, dates[: args.train]), make_records(rng, dates[args.train :])
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "test.jsonl", test)
    print(f"wrote {len(train)} train and {len(test)} test pairs to {args.out}")


if __name__ == "__main__":
    main()
