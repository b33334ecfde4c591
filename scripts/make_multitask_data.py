"""Generate deltatune's bundled multi-task demo data: three small rewriting tasks, one file each.

* ``dates``: the bundled date task (``scripts/make_demo_data.py``), a subset of its splits;
* ``times``: a time of day in words or 12-hour notation -> 24-hour ``HH:MM``
  ("quarter past three in the afternoon" -> "15:15");
* ``numbers``: a number written in English words -> digits
  ("four hundred and twenty-seven" -> "427").

Like the date task, each rule is small and fully learnable, answers are short (exact match is
the metric), the bundled SmolLM2-135M-Instruct gets few of them right before tuning, and the
train and test splits never share a value (a time or a number), in any style. The files are
written per task (``train/<task>.jsonl``, ``test/<task>.jsonl``), so the task of each example is
its file's name: ``deltatune train --method hyperformer --data train/dates.jsonl --data
train/times.jsonl``.

Deterministic: the same seed gives byte-identical files. From the repository root::

    python scripts/make_multitask_data.py   # writes src/deltatune/data/multitask/
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src" / "deltatune" / "data"
DEFAULT_OUT = ROOT / "multitask"
DEFAULT_SEED = 20261123

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def words_below_100(n: int) -> str:
    if n < 20:
        return ONES[n]
    return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])


def number_words(n: int, with_and: bool) -> str:
    """1 <= n <= 9999 in English words, British ("and") or American style."""
    parts = []
    if n >= 1000:
        parts.append(f"{ONES[n // 1000]} thousand")
        n %= 1000
    if n >= 100:
        parts.append(f"{ONES[n // 100]} hundred")
        n %= 100
    if n:
        rest = words_below_100(n)
        parts.append(f"and {rest}" if with_and and parts else rest)
    return " ".join(parts)


NUMBER_STYLES = [
    lambda n: number_words(n, with_and=True),
    lambda n: number_words(n, with_and=False),
    lambda n: number_words(n, with_and=True).capitalize(),
]


def hour_word(hour12: int) -> str:
    return ONES[hour12] if hour12 < 20 else words_below_100(hour12)


def day_part(hour: int) -> str:
    if hour < 12:
        return "in the morning"
    if hour < 18:
        return "in the afternoon"
    return "in the evening"


def time_styles(hour: int, minute: int) -> list[str]:
    """The ways this time can be written unambiguously (which depend on the minute)."""
    hour12 = hour % 12 or 12
    suffix = "am" if hour < 12 else "pm"
    styles = [f"{hour12}:{minute:02d} {suffix}", f"{hour12}.{minute:02d}{suffix}",
              f"{hour12}:{minute:02d} {'a.m.' if hour < 12 else 'p.m.'}"]
    if minute == 0:
        styles.append(f"{hour_word(hour12)} o'clock {day_part(hour)}")
    elif minute == 15:
        styles.append(f"quarter past {hour_word(hour12)} {day_part(hour)}")
    elif minute == 30:
        styles.append(f"half past {hour_word(hour12)} {day_part(hour)}")
    elif minute == 45:
        following = (hour + 1) % 24
        if day_part(following) == day_part(hour):
            styles.append(f"quarter to {hour_word(following % 12 or 12)} {day_part(hour)}")
    elif minute % 5 == 0:
        styles.append(f"{words_below_100(minute)} minutes past {hour_word(hour12)} {day_part(hour)}")
    return styles


def split(values: list, train: int, test: int, rng: random.Random) -> tuple[list, list]:
    values = list(values)
    rng.shuffle(values)
    return values[:train], values[train:train + test]


def make_times(train: int, test: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    # word styles exist for multiples of 5 minutes: draw from those more often
    times = [(h, m) for h in range(24) for m in range(0, 60, 5)] + [(h, m) for h in range(24) for m in range(60) if m % 5]
    rng.shuffle(times)
    round_first = sorted(times, key=lambda t: (t[1] % 5 != 0, rng.random()))
    train_times, test_times = split(round_first[: 2 * (train + test)], train, test, rng)

    def record(t):
        return {"instruction": "Rewrite the time in 24-hour format (HH:MM).", "input": rng.choice(time_styles(*t)),
                "output": f"{t[0]:02d}:{t[1]:02d}"}

    return [record(t) for t in train_times], [record(t) for t in test_times]


def make_numbers(train: int, test: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    train_numbers, test_numbers = split(range(1, 10000), train, test, rng)

    def record(n):
        return {"instruction": "Write the number in digits.", "input": rng.choice(NUMBER_STYLES)(n), "output": str(n)}

    return [record(n) for n in train_numbers], [record(n) for n in test_numbers]


def take_dates(train: int, test: int) -> tuple[list[dict], list[dict]]:
    def read(split_name: str) -> list[dict]:
        lines = (ROOT / "demo" / f"{split_name}.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    return read("train")[:train], read("test")[:test]


def write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--train", type=int, default=240, help="training examples per task")
    parser.add_argument("--test", type=int, default=50, help="held-out examples per task")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tasks = {
        "dates": take_dates(args.train, args.test),
        "times": make_times(args.train, args.test, rng),
        "numbers": make_numbers(args.train, args.test, rng),
    }
    for task, (train, test) in tasks.items():
        write(args.out / "train" / f"{task}.jsonl", train)
        write(args.out / "test" / f"{task}.jsonl", test)
        print(f"{task}: {len(train)} train, {len(test)} test -> {args.out}")


if __name__ == "__main__":
    main()
