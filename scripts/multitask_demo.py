"""The multi-task demo: one hypernetwork learns two tasks, then a third by its embedding alone.

On the bundled SmolLM2-135M-Instruct and the bundled multi-task data
(``scripts/make_multitask_data.py``: dates -> ISO 8601, times -> 24-hour HH:MM, numbers in words
-> digits, 240 training and 50 held-out examples each):

1. ``hyperformer`` trains on ``dates`` and ``times`` together, every batch mixing the two;
2. ``numbers`` is added to the trained delta (``--from-delta``): only its task embedding learns,
   the hypernetwork stays frozen, so the first two tasks keep exactly their outputs.

Both steps are ``deltatune train`` runs; this script runs them with the options below (the
equivalent command lines are printed), then prints per-task held-out exact match and loss before
and after each step. A finished step's ``summary.json`` is reused (``--fresh`` reruns).
``--write README.md`` replaces the section between the ``multitask-results`` markers.

    python scripts/multitask_demo.py [--steps 160] [--new-task-steps 40] [--write README.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from importlib import resources
from pathlib import Path

import torch

from deltatune.train.settings import TrainSettings
from deltatune.train.trainer import Trainer
from readme_section import replace_section

DATA = Path(str(resources.files("deltatune") / "data" / "multitask"))


#: what a new task trains, for the table
NEW_TASK_TRAINS = {"hyperformer": "embedding", "ipt": "intrinsic vector"}


def files(split: str, tasks: list[str]) -> list[str]:
    return [str(DATA / split / f"{task}.jsonl") for task in tasks]


def run_step(output: Path, fresh: bool, **options) -> dict:
    summary_path = output / "summary.json"
    if summary_path.is_file() and not fresh:
        return json.loads(summary_path.read_text())
    shutil.rmtree(output, ignore_errors=True)
    flags = " ".join(
        f"--{k.replace('_', '-')} {v}" if not isinstance(v, list) else " ".join(f"--{k.replace('_', '-')} {x}" for x in v)
        for k, v in options.items()
    )
    print(f"\n$ deltatune train -o {output} {flags}", flush=True)
    Trainer(TrainSettings(output_dir=str(output), **options), progress=False).run()
    return json.loads(summary_path.read_text())


def rows(step: str, summary: dict) -> list[str]:
    lines = []
    for task, after in summary["after"]["per_task"].items():
        before = summary["before"]["per_task"][task]
        lines.append(
            f"| {step} | `{task}` | {before['exact_match']:.2f} → **{after['exact_match']:.2f}** "
            f"| {before['loss']:.3f} → {after['loss']:.3f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/multitask"))
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--new-task-steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--new-task-lr", type=float, default=3e-2)
    parser.add_argument("--eval-limit", type=int, default=50)
    parser.add_argument("--method", default="hyperformer", help="a method serving every task: hyperformer | ipt")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--write", type=Path, help="a README whose multitask-results section to replace")
    args = parser.parse_args()

    common = dict(method=args.method, batch_size=8, eval_limit=args.eval_limit, seed=0)
    joint = run_step(args.output / "joint", args.fresh, data=files("train", ["dates", "times"]),
                     eval_data=files("test", ["dates", "times"]), max_steps=args.steps, lr=args.lr, **common)
    new = run_step(args.output / "new-task", args.fresh, data=files("train", ["numbers"]),
                   eval_data=files("test", ["numbers"]), from_delta=str(args.output / "joint" / "delta"),
                   max_steps=args.new_task_steps, lr=args.new_task_lr, **common)

    table = [
        f"{joint['steps']} steps of batch 8 mixing both tasks (lr {args.lr}), then {new['steps']} steps on the new task "
        f"(lr {args.new_task_lr}); exact match on {args.eval_limit} held-out examples per task, greedy. "
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}.",
        "",
        "| step | task | held-out exact match before → after | held-out loss before → after |",
        "|---|---|---:|---:|",
        *rows(f"1: joint training ({joint['parameters'].split('||')[0].removeprefix('trainable params: ').strip()} "
              f"trained, {joint['train_seconds']:.0f} s)", joint),
        *rows(f"2: new task, {NEW_TASK_TRAINS.get(args.method, 'its own part')} only ({new['parameters'].split('||')[0].removeprefix('trainable params: ').strip()} "
              f"trained, {new['train_seconds']:.0f} s)", new),
    ]
    text = "\n".join(table)
    print("\n" + text)
    if args.write:
        replace_section(args.write, "multitask-results", text, "scripts/multitask_demo.py")


if __name__ == "__main__":
    main()
