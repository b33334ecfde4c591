"""`deltatune search` on a tiny local model: the staged plan, the report naming the picked
design, resuming after an interruption, and training the picked design."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from deltatune.analysis.search import START, design_key, stages
from deltatune.cli.main import app

runner = CliRunner()


def search(tiny_dir, data_file, out, *extra):
    args = ["search", "--model", tiny_dir, "--data", data_file, "-o", out, "--steps-per-trial", 2, "--batch-size", 4,
            "--eval-limit", 1, "--max-length", 64, "--set", "num_virtual_tokens=2", "--set", "r=2", "--no-progress", *extra]
    return runner.invoke(app, [str(a) for a in args])


def test_the_stages_follow_the_paper_and_build_on_the_best_so_far():
    best = {**START, "strategies": list(START["strategies"])}
    plan = stages(best)
    stage, grouping = next(plan)
    assert stage == "grouping" and [d["grouping"] for d in grouping] == ["spindle", "uniform", "increasing",
                                                                           "decreasing", "bottleneck"]
    best.update(grouping=grouping[0]["grouping"])  # the search keeps a winner before the next stage is built
    stage, allocation = next(plan)
    assert stage == "allocation" and {d["grouping"] for d in allocation} == {"spindle"}
    assert [d["allocation"] for d in allocation] == ["uniform", "increasing", "decreasing"]
    stage, tuned = next(plan)
    assert stage == "tuned groups" and [d["strategies"] for d in tuned][1] == ["-", "A+P", "A+P+B", "P+B+L"]
    stage, g1 = next(plan)
    # one method toggled at a time in the paper's G1 (A+L); the current design comes first
    assert stage == "strategy G1" and [d["strategies"][0] for d in g1] == ["A+L", "L", "A+P+L", "A+B+L", "A"]
    assert design_key(g1[1]) == "spindle-uniform-L_AP_APB_PBL"


def test_search_reports_the_picked_design_resumes_and_the_design_trains(tiny_dir, data_file, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "search"
    first = search(tiny_dir, data_file, out, "--trials", 3)
    assert first.exit_code == 0, first.output
    assert "trial 1, grouping: spindle-uniform-AL_AP_APB_PBL, 2 steps" in first.output
    assert "trial cap stopped the search" in first.output
    record = json.loads((out / "trials.json").read_text())
    assert len(record["trials"]) == 3 and record["settings"]["max_steps"] == 2
    for name in ("search.md", "report.html", "search_trials.png", "best_design.json", "loss_curves.png"):
        assert (out / name).is_file(), name
    design = json.loads((out / "best_design.json").read_text())
    assert design["method"] == "s4" and design["r"] == 2 and len(design["strategies"]) == 4
    markdown = (out / "search.md").read_text()
    assert "picked design" in markdown and "◀ picked" in markdown and len(re.findall(r"^\| \d( ◀ picked)? \| grouping \|", markdown, re.M)) == 3

    # as if interrupted after three trials: the same command with a larger cap continues
    again = search(tiny_dir, data_file, out, "--trials", 5)
    assert again.exit_code == 0, again.output
    assert again.output.count("finished earlier") == 3, again.output
    assert "trial 4, grouping" in again.output and "trial 5, grouping" in again.output
    assert len(json.loads((out / "trials.json").read_text())["trials"]) == 5

    # other settings are another search: refused rather than mixed in
    changed = search(tiny_dir, data_file, out, "--trials", 5, "--seed", 1)
    assert changed.exit_code == 2 and "seed differ" in changed.output, changed.output

    trained = runner.invoke(app, [str(a) for a in (
        "train", "--model", tiny_dir, "--data", data_file, "--config", out / "best_design.json", "-o",
        tmp_path / "run", "--max-steps", 1, "--batch-size", 4, "--eval-limit", 1, "--max-new-tokens", 2,
        "--no-progress")])
    assert trained.exit_code == 0, trained.output
    saved = json.loads((tmp_path / "run" / "delta" / "delta_config.json").read_text())["config"]
    assert {k: saved[k] for k in ("method", "grouping", "allocation", "strategies")} == {
        k: design[k] for k in ("method", "grouping", "allocation", "strategies")}
