"""Every method's trainable parameters, side by side, on the bundled model and on BERT-base.

Both models are built on the meta device from their configs (no weights are read), and each
method is planned with its default options, so the table is what ``deltatune inspect --method
all`` prints. ``--write README.md`` replaces the table between the ``method-table`` markers.

    python scripts/method_table.py [--write README.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers as tf

import deltatune as dt
from deltatune.models import DEFAULT_MODEL, bundled_model_dir
from readme_section import replace_section


def meta_models() -> dict[str, torch.nn.Module]:
    bundled = tf.AutoConfig.for_model(**json.loads((bundled_model_dir() / "config.json").read_text()))
    with torch.device("meta"):
        return {
            f"{DEFAULT_MODEL} (bundled, Llama architecture)": tf.AutoModelForCausalLM.from_config(bundled),
            "BERT-base (bert-base-uncased config, sequence classification, 2 labels)":
                tf.BertForSequenceClassification(tf.BertConfig(num_labels=2)),
        }


def configs() -> list[dt.DeltaConfig]:
    """Every registered method with its defaults, plus BitFit adding the biases Llama lacks."""
    chosen = [dt.config(name) for name in dt.methods()]
    chosen.insert(dt.methods().index("bitfit") + 1, dt.config("bitfit", add_missing=True))
    return chosen


def render() -> str:
    parts = []
    for title, model in meta_models().items():
        table = dt.compare(model, configs())
        lines = table.markdown().splitlines()
        for i, cfg in enumerate(configs()):  # label the non-default row
            if cfg.method == "bitfit" and cfg.add_missing:
                lines[i + 2] = lines[i + 2].replace("`bitfit`", "`bitfit` (add_missing)")
        parts.append(f"**{title}**: {table.model_params:,} parameters\n\n" + "\n".join(lines))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="a Markdown file whose method-table section to replace")
    args = parser.parse_args()
    text = render()
    if args.write is None:
        print(text)
        return
    replace_section(args.write, "method-table", text, "scripts/method_table.py")
    print(f"updated {args.write}")


if __name__ == "__main__":
    main()
