"""Train every method on the bundled task with one fixed budget; write README's results table.

A thin caller of :func:`deltatune.compare_training` (the library behind ``deltatune compare``)
with every registered method and the budget README quotes; ``--write README.md`` replaces the
section between the ``method-results`` markers with the comparison's Markdown table. A finished
method's run under ``--output`` is reused, so an interrupted comparison continues where it
stopped (``--fresh`` retrains).

    python scripts/compare_methods.py [--steps 40] [--eval-limit 50] [--methods lora,ia3] [--write README.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import deltatune as dt
from deltatune.config import standalone_methods
from readme_section import replace_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-limit", type=int, default=50)
    parser.add_argument("--methods", help="comma-separated (default: every method that trains alone)")
    parser.add_argument("--output", type=Path, default=Path("runs/compare"))
    parser.add_argument("--fresh", action="store_true", help="retrain methods that already have results")
    parser.add_argument("--write", type=Path, help="a Markdown file whose method-results section to replace")
    args = parser.parse_args()
    comparison = dt.compare_training(
        args.methods.split(",") if args.methods else standalone_methods(), steps=args.steps, batch_size=args.batch_size,
        eval_limit=args.eval_limit, output_dir=args.output, fresh=args.fresh, progress=False,
    )
    text = comparison.markdown()
    print(text)
    if args.write is not None:
        replace_section(args.write, "method-results", text, "scripts/compare_methods.py")


if __name__ == "__main__":
    main()
