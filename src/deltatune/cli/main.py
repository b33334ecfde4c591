"""``deltatune``: train, evaluate, generate, chat, merge and inspect from the shell.

``deltatune train`` with no arguments fine-tunes the bundled SmolLM2-135M-Instruct on the
bundled date-normalisation data with LoRA, and shows that the held-out score went up.
Method options are flags with the config's field names (``--r 16 --alpha 32``); any other
method option goes through ``--set key=value``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
import yaml
from rich.table import Table

from .common import ModelOpt, app, console, friendly_errors


def _method_options(
    r: Optional[int], alpha: Optional[float], dropout: Optional[float], targets: Optional[str],
    exclude: Optional[str], layers: Optional[str], rslora: Optional[bool], dora: Optional[bool],
    init: Optional[str], bias: Optional[str], sets: List[str],
) -> dict[str, Any]:
    from ..config import load_yaml
    from ..errors import ConfigError

    options: dict[str, Any] = {
        "r": r, "alpha": alpha, "dropout": dropout, "rslora": rslora, "dora": dora, "init": init, "bias": bias,
        "targets": [t for t in targets.split(",") if t] if targets else None,
        "exclude": [t for t in exclude.split(",") if t] if exclude else None,
        "layers": _parse_layers(layers) if layers else None,
    }
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            options[key.strip()] = load_yaml(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({' '.join(str(exc).split())})") from None
    return {k: v for k, v in options.items() if v is not None}


def _parse_layers(text: str) -> Any:
    parts = [p.strip() for p in text.split(",")]
    return [int(p) for p in parts] if all(p.lstrip("-").isdigit() for p in parts) else text


# shared option declarations ------------------------------------------------------------------
ROpt = typer.Option(None, "--r", help="LoRA rank")
AlphaOpt = typer.Option(None, "--alpha", help="LoRA alpha (scale = alpha / r)")
DropoutOpt = typer.Option(None, "--dropout", help="dropout on the delta's input")
TargetsOpt = typer.Option(None, "--targets", help="comma-separated patterns: roles (attn.q, ffn), globs, re:regex, all-linear")
ExcludeOpt = typer.Option(None, "--exclude", help="comma-separated patterns to leave out")
LayersOpt = typer.Option(None, "--layers", help="block indices '20,21', 'top:8', 'bottom:4' or a slice '2:10'")
RsloraOpt = typer.Option(None, "--rslora/--no-rslora", help="scale by alpha/sqrt(r)")
DoraOpt = typer.Option(None, "--dora/--no-dora", help="weight-decomposed LoRA")
InitOpt = typer.Option(None, "--init", help="default | gaussian | pissa")
BiasOpt = typer.Option(None, "--bias", help="none | targets (learn a bias delta)")
SetOpt = typer.Option([], "--set", help="any other method option, key=value (repeatable)")


@app.command()
@friendly_errors("train")
def train(
    model: Optional[str] = ModelOpt,
    task: Optional[str] = typer.Option(None, help="an encoder task with a task head: classify | multilabel | regression | tag (default: the bundled all-MiniLM-L6-v2 on bundled data); none: language modelling"),
    data: Optional[List[str]] = typer.Option(None, help="JSONL/JSON/CSV/Parquet: messages, instruction/input/output, prompt/completion or text; repeat for several tasks (one per file). With --task: text [, text_pair] and label / labels / score, or tokens and tags"),
    eval_data: Optional[List[str]] = typer.Option(None, help="held-out file(s) (default: a seeded 10% of --data, per task)"),
    eval_fraction: Optional[float] = typer.Option(None, help="share of --data held out when there is no --eval-data (default 0.1, per task)"),
    task_field: Optional[str] = typer.Option(None, help="record field naming each example's task (default 'task')"),
    text_field: Optional[str] = typer.Option(None, help="--task: the field holding the text (default 'text'; 'tokens' for tag)"),
    pair_field: Optional[str] = typer.Option(None, help="--task: the field holding a second text (default 'text_pair' when present)"),
    label_field: Optional[str] = typer.Option(None, help="--task: the label field (default label | labels | score | tags by task)"),
    objective: Optional[str] = typer.Option(None, help="sft (default: language modelling on the answers) | dpo | orpo | simpo: preference tuning on prompt/chosen/rejected records (default data: the bundled preference pairs)"),
    beta: Optional[float] = typer.Option(None, help="--objective dpo | simpo: beta (default 0.1 | 2.0)"),
    odds_ratio_weight: Optional[float] = typer.Option(None, help="--objective orpo: lambda, the weight of the odds-ratio loss (default 0.1)"),
    reward_margin: Optional[float] = typer.Option(None, help="--objective simpo: gamma, the target reward margin (default 1.0)"),
    chosen_nll_weight: Optional[float] = typer.Option(None, help="--objective dpo | simpo: alpha, the weight of the chosen answer's mean NLL added to the loss (default 0; keeps greedy answers intact on near-miss pairs)"),
    from_delta: Optional[str] = typer.Option(None, help="start from saved deltas; a hyperformer delta learns new tasks' embeddings only"),
    method: Optional[str] = typer.Option(None, help="delta method (default lora)"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML/JSON file of these options; flags override it"),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="where the delta, checkpoints and summary go"),
    name: Optional[str] = typer.Option(None, help="delta name"),
    epochs: Optional[float] = typer.Option(None, help="passes over the data (default 3)"),
    max_steps: Optional[int] = typer.Option(None, help="optimizer steps (overrides --epochs)"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate (default: the method's, 2e-3 for LoRA)"),
    schedule: Optional[str] = typer.Option(None, help="cosine | linear | constant"),
    warmup_ratio: Optional[float] = typer.Option(None, help="fraction of steps warming up"),
    weight_decay: Optional[float] = typer.Option(None),
    max_grad_norm: Optional[float] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None, help="examples per micro-batch (default 8)"),
    grad_accum: Optional[int] = typer.Option(None, help="micro-batches per optimizer step"),
    max_length: Optional[int] = typer.Option(None, help="tokens per example, longer ones are cut"),
    train_on: Optional[str] = typer.Option(None, help="which tokens of a conversation train: assistant (default: every assistant turn) | last (the final answer) | all (every token, prompts too)"),
    group_by_length: Optional[bool] = typer.Option(None, "--group-by-length/--no-group-by-length", help="batch similar lengths"),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing"),
    quantize: Optional[str] = typer.Option(None, help="train on a quantized base: nf4 (QLoRA, double quantization) | fp4 | int8"),
    optim: Optional[str] = typer.Option(None, help="adamw | adamw_8bit | paged_adamw | paged_adamw_8bit (paged needs CUDA, else runs unpaged and says so)"),
    eval_every: Optional[int] = typer.Option(None, help="held-out loss every N steps"),
    save_every: Optional[int] = typer.Option(None, help="checkpoint every N steps"),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="continue from the newest checkpoint in --output-dir"),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite/--no-overwrite", help="replace an earlier run's results in --output-dir"),
    seed: Optional[int] = typer.Option(None),
    precision: Optional[str] = typer.Option(None, help="auto (default: bf16 where the device multiplies bf16 natively, else fp32) | fp32 | bf16 | fp16 (CUDA); the deltas and optimizer state stay fp32"),
    attention: Optional[str] = typer.Option(None, help="auto (default: the implementation measured fastest on the longest batch) | model | eager | sdpa"),
    packing: Optional[bool] = typer.Option(None, "--packing/--no-packing", help="pack each batch's examples into a few rows, a shared prompt prefix computed once (default: on, where the model computes packed batches exactly)"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the transformer blocks: faster steps after a long first one (default off: on 2 CPU cores compiling takes minutes)"),
    max_new_tokens: Optional[int] = typer.Option(None, help="answer length for exact-match evaluation"),
    eval_limit: Optional[int] = typer.Option(None, help="evaluate generation on at most N held-out examples"),
    num_processes: int = typer.Option(1, "--num-processes", min=1, help="train data-parallel on N processes (torchrun on this machine; --batch-size is each one's share of a global batch of N × batch size)"),
    fsdp: Optional[bool] = typer.Option(None, "--fsdp/--no-fsdp", help="shard the model across the processes with FSDP2 (the deltas are saved whole)"),
    deepspeed: Optional[str] = typer.Option(None, help="DeepSpeed ZeRO through accelerate: zero2 | zero3 | a DeepSpeed JSON config (needs deepspeed installed)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    r: Optional[int] = ROpt, alpha: Optional[float] = AlphaOpt, dropout: Optional[float] = DropoutOpt,
    targets: Optional[str] = TargetsOpt, exclude: Optional[str] = ExcludeOpt, layers: Optional[str] = LayersOpt,
    rslora: Optional[bool] = RsloraOpt, dora: Optional[bool] = DoraOpt, init: Optional[str] = InitOpt,
    bias: Optional[str] = BiasOpt, set_: List[str] = SetOpt,
):
    """Fine-tune a delta; with no arguments, LoRA on the bundled model and data."""
    from ..train.settings import TrainSettings
    from ..train.trainer import Trainer
    from ..outputs import unused_directory
    from ..upstream import warn_if_untested

    warn_if_untested()

    flags = dict(
        model=model, task=task, data=_one_or_many(data), eval_data=_one_or_many(eval_data), eval_fraction=eval_fraction,
        task_field=task_field, text_field=text_field, pair_field=pair_field, label_field=label_field,
        objective=objective, beta=beta, odds_ratio_weight=odds_ratio_weight, reward_margin=reward_margin, chosen_nll_weight=chosen_nll_weight,
        from_delta=from_delta, method=method, output_dir=output_dir, name=name,
        epochs=epochs, max_steps=max_steps, lr=lr, schedule=schedule, warmup_ratio=warmup_ratio,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, batch_size=batch_size, grad_accum=grad_accum,
        max_length=max_length, train_on=train_on, group_by_length=group_by_length,
        gradient_checkpointing=gradient_checkpointing, quantize=quantize, optim=optim, eval_every=eval_every, save_every=save_every,
        resume=resume, overwrite=overwrite, seed=seed, precision=precision, attention=attention, packing=packing, compile=compile, max_new_tokens=max_new_tokens, eval_limit=eval_limit,
        fsdp=fsdp, deepspeed=deepspeed,
    )
    flags.update(_method_options(r, alpha, dropout, targets, exclude, layers, rslora, dora, init, bias, set_))
    if output_dir is None and config is None and not data and not resume:
        # the directory is ours to choose: a new one, so an earlier demo run is never replaced
        kind = task or (objective if objective not in (None, "sft") else None)
        flags["output_dir"] = str(unused_directory(Path(f"runs/demo-{kind}" if kind else "runs/demo")))
    settings = (TrainSettings.from_file(config, **flags) if config else TrainSettings.from_mapping({}, **flags))
    if num_processes > 1:  # settings checked above, once, before any rank starts
        from ..train.distributed import launch, without_option

        arguments = without_option(sys.argv[1:], "--num-processes")
        if output_dir is None and flags.get("output_dir"):  # the demo's new directory, chosen here once
            arguments += ["--output-dir", flags["output_dir"]]
        raise typer.Exit(launch(num_processes, arguments))
    result = Trainer(settings, log=lambda m: console.print(m, highlight=False), progress=progress).run()
    if result.main_process:
        _print_result(result)


def _one_or_many(values: Optional[List[str]]):
    return None if not values else values[0] if len(values) == 1 else list(values)


def _print_result(result) -> None:
    table = Table(title="held-out evaluation", show_edge=False)
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    label = " (mean over tasks)" if result.after.per_task else ""
    if result.after.metrics:
        for metric, after in result.after.metrics.items():
            table.add_row(metric.replace("_", " "), fmt(result.before.metrics.get(metric)), fmt(after))
    else:
        table.add_row(f"exact match{label}", fmt(result.before.exact_match), fmt(result.after.exact_match))
    table.add_row(f"loss{label}", f"{result.before.loss:.4f}", f"{result.after.loss:.4f}")
    for task, after in result.after.per_task.items():
        before = result.before.per_task[task]
        table.add_row(f"{task}: exact match", fmt(before["exact_match"]), fmt(after["exact_match"]))
        table.add_row(f"{task}: loss", f"{before['loss']:.4f}", f"{after['loss']:.4f}")
    console.print(table)
    for before, after in zip(result.before.samples, result.after.samples):
        task = f"[bold]{before['task']}[/] " if "task" in before else ""
        shown = "text" if "text" in before else "prompt"
        console.print(f"{task}[bold]{shown}[/] {before[shown]!r}  [bold]reference[/] {before['reference']!r}", highlight=False)
        console.print(f"   before: {before['prediction']!r}\n   after:  {after['prediction']!r}", highlight=False)
    console.print(result.summary_line, highlight=False)
    console.print(
        f"{result.steps} steps in {result.train_seconds:.0f} s ({result.tokens_per_second:.0f} tokens/s); "
        f"total {result.total_seconds:.0f} s; peak memory {result.training_peak_memory_bytes / 2**20:.0f} MiB "
        f"in training, {result.peak_memory_bytes / 2**20:.0f} MiB with loading (optimizer {result.optimizer}). "
        f"Delta saved to {result.delta_dir}", highlight=False,
    )


def _load_with_delta(model: Optional[str], delta: Optional[Path]):
    from ..io import load
    from ..models import load_model_and_tokenizer

    base, tokenizer = load_model_and_tokenizer(model)
    if delta is not None:
        load(base, delta)
    return base.eval(), tokenizer


def _user_prompt(tokenizer, text: str, history: list[dict[str, str]] | None = None) -> str:
    from ..train.data import Example, build_prompt

    turns = tuple(history or ()) + ({"role": "user", "content": text},)
    return build_prompt(tokenizer, Example(prompt=turns, completion=""))


@app.command()
@friendly_errors("generate")
def generate(
    prompt: List[str] = typer.Argument(..., help="one or more prompts (user turns)"),
    model: Optional[str] = ModelOpt,
    delta: Optional[Path] = typer.Option(None, help="a saved delta directory"),
    max_new_tokens: int = typer.Option(64, min=1),
):
    """Answer prompts greedily with the base model and an optional delta."""
    from ..train.evaluate import generate_completions

    base, tokenizer = _load_with_delta(model, delta)
    answers = generate_completions(base, tokenizer, [_user_prompt(tokenizer, p) for p in prompt], max_new_tokens=max_new_tokens)
    for question, answer in zip(prompt, answers):
        console.print(f"[bold]>[/] {question}\n{answer}", highlight=False)


@app.command()
@friendly_errors("chat")
def chat(
    model: Optional[str] = ModelOpt,
    delta: Optional[Path] = typer.Option(None, help="a saved delta directory"),
    max_new_tokens: int = typer.Option(256, min=1),
):
    """Talk to the model (with an optional delta); an empty line or Ctrl-D ends."""
    from ..train.evaluate import generate_completions

    base, tokenizer = _load_with_delta(model, delta)
    history: list[dict[str, str]] = []
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        (answer,) = generate_completions(base, tokenizer, [_user_prompt(tokenizer, text, history)], max_new_tokens=max_new_tokens)
        console.print(f"model> {answer}", highlight=False)
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


@app.command("eval")
@friendly_errors("eval")
def evaluate_command(
    model: Optional[str] = ModelOpt,
    delta: Optional[Path] = typer.Option(None, help="a saved delta directory"),
    data: Optional[str] = typer.Option(None, help="data file (default: the bundled held-out split)"),
    max_length: int = typer.Option(256, min=1),
    max_new_tokens: int = typer.Option(24, min=1),
):
    """Held-out exact match and loss of the model with an optional delta."""
    from ..train.data import demo_data_path, load_examples, tokenize_examples
    from ..train.objectives import evaluate
    from ..train.settings import TrainSettings

    base, tokenizer = _load_with_delta(model, delta)
    examples = load_examples(data or demo_data_path("test"))
    features = tokenize_examples(tokenizer, examples, max_length)
    result = evaluate(base, tokenizer, examples, features, TrainSettings(max_new_tokens=max_new_tokens))
    score = "n/a" if result.exact_match is None else f"{result.exact_match:.3f}"
    console.print(f"exact match {score}   loss {result.loss:.4f}   ({len(examples)} examples)")


def _check_output(output: Path, model: Optional[str], delta: Path, overwrite: bool) -> None:
    """An output directory is new or empty (or ``--overwrite``), and never the model or delta read."""
    from ..errors import ConfigError
    from ..outputs import check_fresh_directory, refuse_file

    refuse_file(output, "--output")
    for what, source in (("the base model", model), ("the delta", delta)):
        if source is not None and Path(source).exists() and Path(source).resolve() == output.resolve():
            raise ConfigError(f"--output {str(output)!r} is {what} being read; write to another directory")
    check_fresh_directory(output, "--output", overwrite=overwrite)


OverwriteOpt = typer.Option(False, "--overwrite", help="replace what the output directory holds (it is replaced whole, once the new one is written)")


@app.command()
@friendly_errors("merge")
def merge(
    delta: Path = typer.Option(..., help="a saved delta directory"),
    output: Path = typer.Option(..., "--output", "-o", help="directory for the merged transformers model"),
    model: Optional[str] = ModelOpt,
    overwrite: bool = OverwriteOpt,
):
    """Fold a delta into the base weights and write a plain transformers model directory."""
    from ..api import merge_and_detach
    from ..outputs import write_directory_atomically

    _check_output(output, model, delta, overwrite)
    base, tokenizer = _load_with_delta(model, delta)
    merge_and_detach(base)

    def write(directory: Path) -> None:
        base.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    write_directory_atomically(output, write)
    console.print(f"merged model written to {output} (loads with transformers alone)")


@app.command()
@friendly_errors("export")
def export(
    delta: Path = typer.Option(..., help="a saved delta directory (deltatune's format or PEFT's)"),
    output: Path = typer.Option(..., "--output", "-o", help="directory to write"),
    format: str = typer.Option("peft", help="peft (adapter_config.json + adapter_model.safetensors), deltatune, or gguf (llama.cpp / Ollama: the merged model.gguf and a Modelfile)"),
    target: Optional[str] = typer.Option(None, help="with --format peft: vllm | sglang, check that the engine serves the adapter, and fail before writing if not"),
    gguf_type: str = typer.Option("f16", help="with --format gguf: the weights' type, f32 | f16 | bf16 | q8_0"),
    adapter: bool = typer.Option(False, "--adapter", help="with --format gguf: a LoRA delta as llama.cpp adapter.gguf (llama.cpp --lora, Ollama ADAPTER) plus the base.gguf it applies to, instead of the merged model"),
    model: Optional[str] = ModelOpt,
    overwrite: bool = OverwriteOpt,
):
    """Convert a saved delta to another checkpoint format; the base model supplies the layer
    kinds and biases the conversion needs. ``--format gguf`` writes the model for llama.cpp and
    Ollama; ``--target`` checks a PEFT adapter against a serving engine's rules."""
    from ..config import check_choice
    from ..errors import ConfigError
    from ..io import FORMATS, save
    from ..models import DEFAULT_MODEL
    from ..outputs import write_directory_atomically

    check_choice("format", format, (*FORMATS, "gguf"))
    if target is not None and format != "peft":
        raise ConfigError(f"--target checks a PEFT adapter; it needs --format peft, not {format!r}")
    if format != "gguf" and (adapter or gguf_type != "f16"):
        raise ConfigError("--adapter and --gguf-type go with --format gguf")
    if format == "gguf":
        from ..gguf_format import TENSOR_TYPES

        check_choice("gguf-type", gguf_type, tuple(TENSOR_TYPES))
    if target is not None:
        from ..engine_rules import ENGINES

        check_choice("target", target, ENGINES)
    _check_output(output, model, delta, overwrite)
    base, tokenizer = _load_with_delta(model, delta)
    if format == "gguf":
        from ..gguf_format import export as export_gguf

        write_directory_atomically(output, lambda directory: export_gguf(
            base, tokenizer, directory, tensor_type=gguf_type, adapter=adapter, name=model or DEFAULT_MODEL))
        written = "base.gguf + adapter.gguf" if adapter else "model.gguf"
        console.print(f"{written} ({gguf_type}) and an Ollama Modelfile written to {output}")
        return
    if target is not None:
        from ..engine_rules import save_for, serve_rank
        from ..peft_format import CONFIG_FILE

        write_directory_atomically(output, lambda directory: save_for(target, base, directory))
        config = json.loads(next(output.rglob(CONFIG_FILE)).read_text())
        hint = f" (serve with --max-lora-rank {serve_rank(config)})" if target == "vllm" else ""
        console.print(f"PEFT adapter for {target} written to {output}{hint}")
        return
    write_directory_atomically(output, lambda directory: save(base, directory, format=format))
    console.print(f"{format} checkpoint written to {output}")


@app.command()
@friendly_errors("inspect")
def inspect(
    model: Optional[str] = ModelOpt,
    config_json: Optional[Path] = typer.Option(None, "--config", help="a transformers config.json: sized on the meta device, no weights"),
    method: str = typer.Option("lora", help="a method name, or 'all' to compare every method"),
    batch_size: int = typer.Option(8),
    seq_len: int = typer.Option(256),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    quantize: Optional[str] = typer.Option(None, help="also show the weights' memory quantized: nf4 | fp4 | int8 (table of fp32, bf16, int8, NF4, NF4+DQ)"),
    optim: str = typer.Option("adamw", help="optimizer whose state the memory table counts"),
    memory: bool = typer.Option(False, "--memory", help="the memory estimate with each line's formula, and full fine-tuning's for comparison"),
    dtype: Optional[str] = typer.Option(None, help="fp32 | bf16 | fp16: the weights' dtype for the memory estimate (default: the model's)"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda: whose overhead the estimate counts (default: cuda if available)"),
    master_weights: bool = typer.Option(False, "--master-weights", help="mixed precision: fp32 master copy and moments of 16-bit trainable weights"),
    task: Optional[str] = typer.Option(None, help="size a task head too: classify | multilabel | regression | tag (the model loads as that task's model; default model: the bundled encoder)"),
    labels: int = typer.Option(2, min=1, help="with --task: how many labels the head has (regression: one output)"),
    r: Optional[int] = ROpt, alpha: Optional[float] = AlphaOpt, dropout: Optional[float] = DropoutOpt,
    targets: Optional[str] = TargetsOpt, exclude: Optional[str] = ExcludeOpt, layers: Optional[str] = LayersOpt,
    rslora: Optional[bool] = RsloraOpt, dora: Optional[bool] = DoraOpt, init: Optional[str] = InitOpt,
    bias: Optional[str] = BiasOpt, set_: List[str] = SetOpt,
):
    """Dry run: the model's anatomy, what a delta would touch, parameter counts, memory.

    ``--method all`` lists every method's trainable parameters on this model side by side;
    ``--task`` adds a task head to the method (or to each, with ``all``)."""
    import torch

    from .. import config as make_config
    from ..analysis.memory import DTYPES, estimate_training_memory, human_bytes, weight_memory
    from ..config import check_choice, standalone_methods
    from ..anatomy import analyze
    from ..api import attach
    from ..report import compare, plan, summary

    from ..heads import TASKS, TaskHead, model_kind
    from ..models import DEFAULT_ENCODER, load_model_and_tokenizer

    options = _method_options(r, alpha, dropout, targets, exclude, layers, rslora, dora, init, bias, set_)
    if task is not None:
        check_choice("task", task, TASKS)
        options["task_head"] = TaskHead(task, labels=() if task == "regression" else tuple(str(i) for i in range(labels)))
        kind, width = model_kind(task), options["task_head"].num_outputs
        base = (meta_model(config_json, kind, num_labels=width) if config_json
                else load_model_and_tokenizer(model or DEFAULT_ENCODER, task=kind, num_labels=width)[0].eval())
    else:
        base = meta_model(config_json) if config_json else _load_with_delta(model, None)[0]
    if dtype is not None:
        check_choice("dtype", dtype, tuple(DTYPES))
        base.to(DTYPES[dtype])
    console.print(analyze(base).describe(), highlight=False)
    if method == "all":
        head = {"task_head": options["task_head"]} if task is not None else {}
        console.print(str(compare(base, [make_config(m, **head) for m in standalone_methods()] if head else None)),
                      highlight=False)
        return
    delta_config = make_config(method, **options)
    console.print(str(plan(base, delta_config)), highlight=False)
    estimate_settings = dict(batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing,
                             quantize=quantize, master_weights=master_weights, optimizer=optim,
                             device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if memory:
        trainable_before = {id(p): p.requires_grad for p in base.parameters()}
        full = estimate_training_memory(base.requires_grad_(True), **estimate_settings)
        for p in base.parameters():
            p.requires_grad_(trainable_before[id(p)])
    attach(base, delta_config)
    console.print(str(summary(base)), highlight=False)
    console.print("\ntraining memory estimate (formulas: deltatune.analysis.memory):", highlight=False)
    console.print(str(estimate_training_memory(base, **estimate_settings)), highlight=False)
    if memory:
        console.print(f"full fine-tuning, same settings: {human_bytes(full.total)} (weights {human_bytes(full['model weights'])}, "
                      f"gradients {human_bytes(full['gradients'])}, optimizer {human_bytes(full.lines[2][1])})", highlight=False)
    if quantize is not None:
        from ..quant import check_scheme
        from ..train.optim import check_optimizer

        check_scheme(quantize)
        check_optimizer(optim)
        console.print(f"\nweights, deltas and optimizer state by storage format (--quantize {quantize}; "
                      "fp4 stores like nf4):", highlight=False)
        console.print(str(weight_memory(base, optimizer=optim)), highlight=False)


def meta_model(config_path: Path, kind: str = "causal-lm", num_labels: int | None = None):
    """A model (of ``kind``, a key of ``models.TASK_MODEL_CLASSES``) built from a config.json on
    the meta device: shapes without weights."""
    import torch
    from transformers import AutoConfig

    from ..errors import ModelLoadError
    from ..models import TASK_MODEL_CLASSES

    if not config_path.is_file():
        raise ModelLoadError(f"config file {str(config_path)!r} does not exist")
    try:
        model_config = AutoConfig.for_model(**json.loads(config_path.read_text()))
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_path} is not a transformers config.json: {exc}") from exc
    if num_labels is not None:
        model_config.num_labels = num_labels
    with torch.device("meta"):
        return TASK_MODEL_CLASSES[kind].from_config(model_config)


from . import analysis_commands  # noqa: E402, F401  (registers compare, analyze, advise on app)
from . import serve_command  # noqa: E402, F401  (registers serve on app)


def main() -> None:
    app(prog_name="deltatune")


if __name__ == "__main__":
    sys.exit(main())
