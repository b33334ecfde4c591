"""``deltatune compare``, ``deltatune analyze subspace`` / ``intrinsic-dim`` and ``deltatune advise``: which method,
and will it fit. Registered on the main app by an import at the bottom of :mod:`.main`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .common import ModelOpt, app, console, friendly_errors

analyze_app = typer.Typer(help="Analyses of trained deltas.", no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")


@app.command("compare")
@friendly_errors("compare")
def compare_command(
    model: Optional[str] = ModelOpt,
    data: Optional[str] = typer.Option(None, help="training data as for `deltatune train` (default: the bundled date task)"),
    eval_data: Optional[str] = typer.Option(None, help="held-out file (default: a seeded 10% of --data)"),
    methods: Optional[str] = typer.Option(None, help="comma-separated methods, or 'all' (default: lora,ia3,prompt,prefix,houlsby,bitfit,top_layers)"),
    steps: int = typer.Option(30, help="optimizer steps per method"),
    batch_size: int = typer.Option(8, help="examples per step"),
    eval_limit: int = typer.Option(30, help="held-out examples whose generated answer is scored (exact match)"),
    max_length: int = typer.Option(256, min=1, help="tokens per example, longer ones are cut"),
    seed: int = typer.Option(0),
    output_dir: Path = typer.Option(Path("runs/compare"), "--output-dir", "-o", help="one folder per method, plus the report"),
    fresh: bool = typer.Option(False, "--fresh", help="retrain methods that already finished with these settings"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="a progress bar per method"),
):
    """Train several methods on the same model, data and budget; write a report (table, loss
    curves, metric vs trainable %, HTML page). Finished methods are reused on a rerun."""
    from ..config import standalone_methods
    from ..analysis.compare import DEFAULT_METHODS, compare_training
    from ..outputs import refuse_file

    refuse_file(output_dir, "--output-dir")

    chosen = standalone_methods() if methods == "all" else [m for m in methods.split(",") if m] if methods else list(DEFAULT_METHODS)
    comparison = compare_training(
        chosen, model=model, data=data, eval_data=eval_data, steps=steps, batch_size=batch_size,
        eval_limit=eval_limit, max_length=max_length, seed=seed, output_dir=output_dir, fresh=fresh,
        progress=progress, log=lambda message: console.print(message, highlight=False),
    )
    table = Table(*comparison.HEADER, title=comparison.budget, title_justify="left")
    for row in comparison.rows():
        table.add_row(*row)
    console.print(table)
    written = comparison.write_report(output_dir)
    console.print(f"report: {written['html']} (also {written['markdown']}, {written['json']}, "
                  f"{written['loss_curves']}, {written['metric_vs_trainable']})", highlight=False)


@app.command("search")
@friendly_errors("search")
def search_command(
    model: Optional[str] = ModelOpt,
    task: Optional[str] = typer.Option(None, help="an encoder task with a head: classify | multilabel | regression | tag (default: language modelling)"),
    data: Optional[str] = typer.Option(None, help="training data as for `deltatune train` (default: the bundled data of --task, or the date task)"),
    eval_data: Optional[str] = typer.Option(None, help="held-out file (default: a seeded 10% of --data)"),
    steps_per_trial: int = typer.Option(20, min=1, help="optimizer steps per trial"),
    trials: int = typer.Option(12, min=1, help="at most this many designs are trained"),
    batch_size: int = typer.Option(8, min=1, help="examples per step"),
    eval_limit: int = typer.Option(20, min=1, help="held-out examples whose generated answer is scored (language modelling)"),
    max_length: int = typer.Option(256, min=1, help="tokens per example, longer ones are cut"),
    lr: Optional[float] = typer.Option(None, help="learning rate of every trial (default: S4's)"),
    seed: int = typer.Option(0),
    set_: List[str] = typer.Option([], "--set", help="an S4 option every trial shares, key=value (r, alpha, bottleneck, num_virtual_tokens)"),
    output_dir: Path = typer.Option(Path("runs/search"), "--output-dir", "-o", help="one folder per trial, the record and the report"),
    fresh: bool = typer.Option(False, "--fresh", help="forget earlier trials in --output-dir and start over"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="a progress bar per trial"),
):
    """Search S4's design space (Chen et al. 2023) on your data: grouping, allocation, tuned
    groups, then each group's methods, a short training run per design. Rerunning the same
    command continues; the report names the design picked, and best_design.json trains it
    (deltatune train --config best_design.json)."""
    from ..analysis.search import search_design
    from ..config import load_yaml
    from ..errors import ConfigError
    from ..outputs import refuse_file

    refuse_file(output_dir, "--output-dir")
    options = {}
    for item in set_:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        options[key.strip()] = load_yaml(value)
    found = search_design(
        model=model, task=task, data=data, eval_data=eval_data, steps_per_trial=steps_per_trial, trials=trials,
        batch_size=batch_size, eval_limit=eval_limit, max_length=max_length, seed=seed, lr=lr, options=options,
        output_dir=output_dir, fresh=fresh, progress=progress, log=lambda message: console.print(message, highlight=False),
    )
    table = Table(*found.HEADER, title=found.budget, title_justify="left")
    for row in found.rows():
        table.add_row(*row)
    console.print(table)
    written = found.write_report(output_dir)
    console.print(found.picked_sentence(), highlight=False)
    console.print(f"report: {written['search']} and {written['html']} (plot {written['plot']}); "
                  f"train it: deltatune train --config {written['design']}", highlight=False)


@analyze_app.command("subspace")
@friendly_errors("analyze subspace")
def subspace_command(
    first: Path = typer.Argument(..., help="a saved LoRA delta (deltatune or PEFT directory)"),
    second: Path = typer.Argument(..., help="another LoRA delta of the same base (other rank or seed)"),
    modules: Optional[str] = typer.Option(None, help="only modules whose path contains this (e.g. self_attn.q_proj)"),
    of: str = typer.Option("A", "--of", help="A: the subspaces of the A matrices (the paper's); delta: of the updates ΔW = B A"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="the base model: also print each module's amplification factor for FIRST"),
    output_dir: Path = typer.Option(Path("."), "--output-dir", "-o", help="where the heatmap PNG and the numbers (JSON) go"),
):
    """Subspace similarity φ(A₁, A₂, i, j) = ‖U_{A₁}^{i⊤} U_{A₂}^j‖²_F / min(i, j) of two LoRA deltas
    (Hu et al. 2021, §7.2): per module φ(1,1) and φ(r₁,r₂), and the i×j grid averaged over modules
    as a heatmap; with --model, ‖ΔW‖_F / ‖UᵀWV‖_F per module (§7.3). Random subspaces give
    about max(i, j)/k for inputs of size k."""
    import json

    from ..analysis.subspace import compare_subspaces, lora_amplification
    from ..outputs import refuse_file

    refuse_file(output_dir, "--output-dir")
    report = compare_subspaces(first, second, modules, of)
    amplification = {}
    if model is not None:
        from .. import load
        from ..models import load_model_and_tokenizer

        base, _ = load_model_and_tokenizer(model)
        name = load(base, first)[0]
        amplification = lora_amplification(base, name)
    table = Table("module", "φ(1,1)", "φ(r₁,r₂)", *(["amplification"] if amplification else []))
    for path, top, full in report.table():
        table.add_row(path, f"{top:.3f}", f"{full:.3f}", *([f"{amplification.get(path, float('nan')):.2f}"] if amplification else []))
    console.print(table)
    mean = report.mean_grid
    console.print(f"mean over {len(report.grids)} modules: φ(1,1) = {float(mean[0, 0]):.3f}, "
                  f"φ({mean.shape[0]},{mean.shape[1]}) = {float(mean[-1, -1]):.3f}", highlight=False)
    output_dir.mkdir(parents=True, exist_ok=True)
    png = report.heatmap(output_dir / "subspace_similarity.png",
                         f"φ(i, j) of {'A' if of == 'A' else 'ΔW'}, mean of {len(report.grids)} modules\n{first} vs {second}")
    numbers = output_dir / "subspace_similarity.json"
    numbers.write_text(json.dumps({
        "first": str(first), "second": str(second), "of": of, "mean_grid": mean.tolist(),
        "modules": {p: {"phi_1_1": t, "phi_r1_r2": f} for p, t, f in report.table()},
        "amplification": amplification,
    }, indent=1) + "\n")
    console.print(f"heatmap: {png}; numbers: {numbers}", highlight=False)


@analyze_app.command("intrinsic-dim")
@friendly_errors("analyze intrinsic-dim")
def intrinsic_dim_command(
    model: Optional[str] = ModelOpt,
    task: str = typer.Option("classify", help="classify | multilabel | regression | tag (an encoder task with a head), or none: language modelling"),
    data: Optional[str] = typer.Option(None, help="training data as for `deltatune train` (default: the bundled data of --task)"),
    eval_data: Optional[str] = typer.Option(None, help="held-out file (default: a seeded 10% of --data)"),
    dimensions: str = typer.Option("10,100,1000,4000,10000", help="comma-separated ladder of d"),
    steps: int = typer.Option(100, min=1, help="optimizer steps per run"),
    batch_size: int = typer.Option(8, min=1, help="examples per step"),
    lr: Optional[float] = typer.Option(None, help="Intrinsic SAID's learning rate (default: the method's)"),
    metric: Optional[str] = typer.Option(None, help="held-out metric to compare (default: the task's first, e.g. accuracy; exact_match for language modelling)"),
    full_metric: Optional[float] = typer.Option(None, help="full fine-tuning's metric, if known (skips that run)"),
    threshold: float = typer.Option(0.9, help="the share of full fine-tuning's metric d must reach (0.9: d90)"),
    seed: int = typer.Option(0),
    output_dir: Path = typer.Option(Path("runs/intrinsic-dim"), "--output-dir", "-o", help="one folder per run, the plot and the numbers"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Intrinsic dimension (Aghajanyan et al. 2021): train Intrinsic SAID at each d of a ladder
    and full fine-tuning (every block's weights) with the same budget; print d90, the smallest d
    reaching 90% of full fine-tuning's held-out metric, and plot metric against d."""
    from ..analysis.intrinsic_dim import intrinsic_dimension
    from ..errors import ConfigError
    from ..outputs import refuse_file

    refuse_file(output_dir, "--output-dir")
    try:
        ladder = [int(d) for d in dimensions.split(",") if d.strip()]
    except ValueError:
        raise ConfigError(f"--dimensions must be comma-separated integers, got {dimensions!r}") from None
    found = intrinsic_dimension(
        ladder, model=model, task=None if task == "none" else task, data=data, eval_data=eval_data, steps=steps,
        batch_size=batch_size, lr=lr, metric=metric, full_metric=full_metric, threshold=threshold, seed=seed,
        output_dir=output_dir, progress=progress, log=lambda message: console.print(message, highlight=False),
    )
    console.print(str(found), highlight=False)
    plot = found.plot(output_dir / "intrinsic_dim.png")
    console.print(f"plot: {plot}; numbers: {output_dir / 'intrinsic_dim.json'}", highlight=False)


@app.command("advise")
@friendly_errors("advise")
def advise_command(
    examples: int = typer.Option(..., "--examples", "-n", help="how many training examples you have"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="HF model id, directory or config.json (default: bundled SmolLM2-135M); only its config is read"),
    memory: str = typer.Option("24GB", help="memory available: 24GB, 16GiB, 800MB"),
    device: str = typer.Option("cuda", help="cuda | cpu: which overhead to count (and bf16 vs fp32 by default)"),
    dtype: Optional[str] = typer.Option(None, help="fp32 | bf16 | fp16 (default: what deltatune train chooses: bf16 on cuda and on a CPU with native bf16, else fp32)"),
    batch_size: int = typer.Option(8),
    seq_len: int = typer.Option(512, help="tokens per example, at most"),
    example_length: Optional[int] = typer.Option(None, help="tokens per example on average: prices packed batches (deltatune train's default)"),
    processes: int = typer.Option(1, "--processes", min=1, help="devices training together; --memory and --batch-size are each one's"),
    sharding: str = typer.Option("ddp", help="how they share the work: ddp | fsdp (the frozen base sharded) | zero2 | zero3"),
):
    """Which method for N examples, and how to fit it in the memory you have: the rule of thumb
    by data size, then the memory estimate of each way to run it, and what it costs."""
    from ..analysis.advise import advise

    console.print(str(advise(examples, model, memory=memory, device=device, dtype=dtype, batch_size=batch_size,
                             seq_len=seq_len, example_length=example_length, processes=processes,
                             sharding=sharding)), highlight=False)
