"""The training loop behind ``deltatune train``: attach a delta, tune it, prove it helped.

The recipe, a file each: what a run is given (:mod:`.settings`), its data and how its tasks
map to deltas (:mod:`.tasks`), what it optimises and how it is scored (:mod:`.objectives`),
and here the run itself, in three phases over one :class:`RunState`: ``_set_up`` (data,
model, deltas, optimizer, the evaluation before training, a resumed state), ``_train_loop``
(the optimizer steps, checkpoints) and ``_finish`` (the trained delta saved first, then the
evaluation after training and the summary).

Built on accelerate for one process or several (:mod:`.distributed`: data-parallel, FSDP2,
DeepSpeed ZeRO): the ranks take their parts of each global batch, the main process prints and
writes files, and evaluates (under FSDP every rank computes the evaluation, as sharded
weights need all of them, and the main process reports it).

Nothing is lost: the output directory is checked and held before any work
(:mod:`deltatune.outputs`); Ctrl-C (or SIGTERM) writes a checkpoint of the delta, the
optimizer, the schedule and the step, and in any other phase says what is on disk; the trained
delta is saved before the evaluation after training; ``--resume`` continues from the newest
readable checkpoint with the same data order, and refuses other settings.

Several tasks train in one run when the data names them (several ``--data`` files, one task
each, or a task field in the records): a method whose config ``serves_all_tasks``
(``--method hyperformer``: one shared hypernetwork) trains one delta for all of them, routed
through its config's multi-task hooks; with any other method each task gets its own delta,
named after the task, and each batch routes every sample to its task's delta
(:func:`deltatune.route`). Evaluation is per task. ``--from-delta`` starts from saved deltas;
a delta serving every task, given tasks it does not know, learns only what is new for them.

``--task classify|multilabel|regression|tag`` trains an encoder (or a decoder used as a
classifier) on labelled data instead: the base is loaded as a sequence or token
classification model, the delta gets a task head (:mod:`deltatune.heads`) sized to the
training data's labels, and evaluation reports the task's metrics (:mod:`.labelled`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import shutil
import signal
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..analysis.memory import peak_memory_bytes, reset_peak_memory
from ..api import after_optimizer_step, calibrate, consistency_weight, trainable_parameters, training_penalty
from ..errors import ConfigError, Interrupted
from ..io import save as save_delta
from ..layer import delta_layers
from ..outputs import RunLock, check_output_dir, clear_run, write_atomically, write_text_atomically
from ..precision import describe as describe_precision
from ..precision import resolve as resolve_precision
from ..quant import prepare_for_kbit_training, quantized_storage
from ..report import summary
from .attention_choice import choose_attention
from .compiled import compile_blocks
from .data import batch_indices
from .distributed import (average_gradients, broadcast_from_main, deepspeed_config, distributed_state,
                          frozen_values, loss_weight, make_accelerator, mean_over_ranks, rank_share, shard_model)
from .objectives import Evaluation, describe, objective_for, two_pass_loss
from .optim import OptimizerFallbackWarning, make_optimizer
from .settings import TrainSettings, resumed_settings
from .tasks import TaskDeltas, attach_for_tasks, task_names


#: the output directory's folder of checkpoints, and the file in each holding the optimizer and step
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"


@dataclass
class TrainResult:
    settings: TrainSettings
    before: Evaluation
    after: Evaluation
    steps: int
    train_seconds: float
    total_seconds: float
    tokens_per_second: float
    delta_dir: Path
    summary_line: str
    optimizer: str = "adamw"  # the one used (a paged optimizer without CUDA runs unpaged)
    peak_memory_bytes: int = 0  # whole run, loading included (see peak_memory_bytes())
    training_peak_memory_bytes: int = 0  # from the first training step on: weights, activations, optimizer
    train_losses: list[float] = field(default_factory=list)  # each optimizer step's mean loss, this process's steps
    baseline: dict[str, Any] = field(default_factory=dict)  # an encoder task's floor (majority class)
    precision: str = "fp32"  # what the run computed in (settings.precision resolved on its device)
    attention: str = "model"  # the attention implementation it trained with
    packing: str = ""  # how its language-modelling batches were laid out ("packed, ..." or "padded (why)")
    processes: int = 1  # ranks that trained together
    process_peak_memory_bytes: list[int] = field(default_factory=list)  # each rank's training peak
    main_process: bool = True  # False on the other ranks, whose evaluations are None
    frozen_values_on_main_process: int = 0  # the base's values this process holds (a shard under FSDP)


def micro_batches(lengths: list[int], settings: TrainSettings, rank: int, world: int) -> Iterator[list[int]]:
    """Endless, seeded stream of this process's micro-batches; epoch e uses seed + e. Each is
    this rank's part of a global batch of ``batch_size × world`` examples, the batch one process
    with that batch size takes, so the data order is the same for any number of processes (a
    last global batch with fewer examples than ranks is left out)."""
    epoch = 0
    while True:
        batches = batch_indices(lengths, settings.batch_size * world, seed=settings.seed + epoch,
                                group_by_length=settings.group_by_length)
        yield from (rank_share(batch, rank, world) for batch in batches if len(batch) >= world)
        epoch += 1


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = sorted((output_dir / CHECKPOINTS).glob("step-*"))
    return found[-1] if found else None


@dataclass
class RunState:
    """What the three phases of one run (set-up, train loop, finish) share."""

    accelerator: Any
    objective: Any  # LanguageModeling, LabelledTask or PreferenceTuning (objectives.py)
    log: Callable[[str], None]
    main: bool  # the main process: it evaluates, prints and writes files
    started: float
    model: nn.Module  # as accelerate prepared it
    plain_model: nn.Module  # the same model, unwrapped: what deltas, evaluation and saving see
    tokenizer: Any
    task_deltas: TaskDeltas
    eval_examples: list
    train_features: list
    eval_features: list
    collate: Callable
    params: list
    optimizer: Any
    optimizer_used: str
    scheduler: Any
    total_steps: int
    precision: str  # the one resolved for this device (deltatune.precision.resolve)
    attention: str  # the implementation trained with (train/attention_choice.py)
    sharded: bool = False  # FSDP: every rank takes part in each forward, evaluation included
    frozen_held: int = 0  # the frozen base's values this process holds between steps (a shard under FSDP)
    before: Evaluation | None = None
    step: int = 0
    tokens_seen: int = 0
    train_losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    run_peak_memory: int = 0
    training_peak_memory: int = 0
    process_peaks: list[int] = field(default_factory=list)  # each rank's training peak, rank order


class Trainer:
    """One training run; ``run()`` does everything and returns a :class:`TrainResult`."""

    def __init__(self, settings: TrainSettings, *, log: Callable[[str], None] = print, progress: bool = True):
        self.settings = settings
        self.log = log
        self.progress = progress
        self.output_dir = Path(settings.output_dir)
        self.phase = "while loading"  # what the run is doing, for the message on interruption
        self.saved = ""  # what an interruption leaves on disk
        self.attention = "model"  # the attention implementation chosen in set-up
        self._checkpoint_found: tuple[Path, dict] | None = None

    def run(self) -> TrainResult:
        """Check the output directory, hold it for this run, train. Ctrl-C or SIGTERM in any
        phase ends the run with a line saying what was saved."""
        s = self.settings
        state = distributed_state()  # the Accelerator is built in set-up, once the tasks are known
        if not state.is_main_process:
            return self._run()
        check_output_dir(self.output_dir, resume=s.resume, overwrite=s.overwrite)
        previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            with RunLock(self.output_dir):
                if s.overwrite and not s.resume:
                    clear_run(self.output_dir)
                return self._run()
        except Interrupted:  # the training loop has said which checkpoint it saved
            raise
        except KeyboardInterrupt:
            message = f"interrupted {self.phase}; {self.saved or 'nothing was trained yet, nothing saved'}"
            self.log(f"\n{message}")
            raise Interrupted(message) from None
        finally:
            signal.signal(signal.SIGTERM, previous_handler)

    def _run(self) -> TrainResult:
        run = self._set_up()
        self._train_loop(run)
        return self._finish(run)

    # the phases of a run ----------------------------------------------------------------------

    def _set_up(self) -> "RunState":
        """Data, model, deltas, optimizer and schedule; the evaluation before training; the
        resumed state, if any."""
        from accelerate.utils import set_seed
        from transformers import get_scheduler

        s = self.settings
        objective = objective_for(s)
        started = time.perf_counter()
        state = distributed_state()
        main, device = state.is_main_process, state.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        log = self.log if main else (lambda _msg: None)
        set_seed(s.seed)

        train_examples, eval_examples = objective.split()
        for note in objective.notes:
            log(f"warning: {note}")
        tasks = task_names(train_examples)
        # batches routed to several tasks' deltas may leave one unused, which DDP must be told
        accelerator = make_accelerator(
            fp16=s.precision == "fp16", find_unused_parameters=len(tasks) > 1,
            deepspeed=deepspeed_config(s.deepspeed, batch_size=s.batch_size, grad_accum=s.grad_accum) if s.deepspeed else None)
        if accelerator.num_processes > 1:
            how = "FSDP2" if s.fsdp else f"DeepSpeed {s.deepspeed}" if s.deepspeed else "data-parallel"
            log(f"{accelerator.num_processes} processes ({how}, {accelerator.distributed_type.value}), each "
                f"{s.batch_size} examples of a global batch of {s.batch_size * accelerator.num_processes}")
        delta_config = objective.delta_config(train_examples)
        precision = resolve_precision(s.precision, accelerator.device)
        log(f"loading model {objective.model_name}; {describe_precision(precision, accelerator.device)}")
        model, tokenizer = objective.load(torch.bfloat16 if precision == "bf16" else torch.float32)
        if s.quantize:
            prepare_for_kbit_training(model, gradient_checkpointing=s.gradient_checkpointing)
            log(f"quantized base: {quantized_storage(model)}")

        names, task_deltas = attach_for_tasks(model, s, tasks, log, delta_config)
        if not s.quantize:  # set-up measures and checks on the training device (a quantized load is placed already)
            model.to(accelerator.device)
        self.names = names
        if main:
            check_output_dir(self.output_dir, resume=True, needed_bytes=_bytes_to_write(model, names, s.keep_checkpoints))
        objective.attached(model, names)
        train_features = objective.features(tokenizer, train_examples, "training data")
        eval_features = objective.features(tokenizer, eval_examples, "held-out data")
        log(f"data: {len(train_features)} training examples, {len(eval_features)} held out")
        if "majority_class" in objective.baseline:
            log(f"majority class {objective.baseline['majority_class']!r}: "
                f"{objective.baseline['majority_train_share']:.1%} of the training data")
        if s.gradient_checkpointing and not s.quantize:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        collate = objective.collator(tokenizer)
        if not (s.resume and latest_checkpoint(Path(s.output_dir))):  # a resumed delta has its structure
            self._calibrate(model, delta_config, train_features, collate, objective.loss)
        log(str(summary(model)))
        # a resumed run computes as the run it continues did, whatever a new measurement says
        recorded = self._readable_checkpoint()[1].get("attention") if s.resume else None
        longest = sorted(train_features, key=lambda f: len(f["input_ids"]), reverse=True)[: s.batch_size]
        longest_batch = {k: v.to(accelerator.device) for k, v in collate(longest).items()}
        self.attention, timings = choose_attention(model, recorded or s.attention, longest_batch, objective.loss)
        chosen_by_main = broadcast_from_main(self.attention, accelerator)  # the ranks compute alike
        if chosen_by_main != self.attention:
            self.attention, _ = choose_attention(model, chosen_by_main, longest_batch, objective.loss)
        if timings:
            measured = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in timings.items())
            log(f"attention: {self.attention} (a step of the longest batch: {measured})")
        layout = objective.choose_layout(model, tokenizer, train_features, task_deltas, accelerator.device)
        if layout:
            log(f"batches: {layout}")
            collate = objective.collator(tokenizer)
        if s.compile:
            log(f"compiled {compile_blocks(model)} transformer blocks with torch.compile (the first steps wait for it)")

        sharded = s.fsdp and accelerator.num_processes > 1
        if s.fsdp and not sharded:
            log("--fsdp: one process, nothing to shard across; training unsharded")
        if sharded:  # before the optimizer is built, as with any change to the parameters
            blocks = shard_model(model)
            held, total = frozen_values(model)
            log(f"FSDP2: the frozen base of {blocks} blocks and the rest sharded across {accelerator.num_processes} "
                f"processes ({held:,} of its {total:,} values on this one); the deltas whole on each")
        params = trainable_parameters(model, names)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", OptimizerFallbackWarning)
            optimizer, optimizer_used = make_optimizer(s.optim, params, lr=s.learning_rate,
                                                       weight_decay=s.weight_decay)
        for warning in caught:
            log(f"optimizer: {warning.message}")
        micro_per_epoch = math.ceil(len(train_features) / s.batch_size / accelerator.num_processes)
        steps_per_epoch = max(1, micro_per_epoch // s.grad_accum)
        total_steps = s.max_steps or max(1, math.ceil(s.epochs * steps_per_epoch))
        scheduler = get_scheduler(s.schedule, optimizer, num_warmup_steps=int(s.warmup_ratio * total_steps),
                                  num_training_steps=total_steps)
        if sharded:  # sharded already: accelerate would wrap it in DDP again
            optimizer = accelerator.prepare(optimizer)
        else:
            model, optimizer = accelerator.prepare(model, optimizer)
        run = RunState(
            accelerator=accelerator, objective=objective, log=log, main=main, started=started,
            model=model, plain_model=accelerator.unwrap_model(model), tokenizer=tokenizer, task_deltas=task_deltas,
            eval_examples=eval_examples, train_features=train_features, eval_features=eval_features,
            collate=collate, params=params, optimizer=optimizer, optimizer_used=optimizer_used, scheduler=scheduler,
            total_steps=total_steps, precision=precision, attention=self.attention, sharded=sharded,
            frozen_held=frozen_values(model)[0],
        )

        # before the resumed state loads, so that "before" scores what an uninterrupted run's did
        self.phase = "during the evaluation before training"
        run.before = self._evaluate(run)
        if main:
            log(describe("before", run.before))
        if s.resume:
            run.step = self._resume(run.plain_model, optimizer, scheduler, accelerator.num_processes)
            log(f"resumed from step {run.step}")
        return run

    def _train_loop(self, run: "RunState") -> None:
        """Optimizer steps until ``total_steps``; Ctrl-C or SIGTERM writes a checkpoint."""
        s, accelerator, log = self.settings, run.accelerator, run.log
        model, plain_model, optimizer, scheduler = run.model, run.plain_model, run.optimizer, run.scheduler
        stream = micro_batches([len(f["input_ids"]) for f in run.train_features], s,
                               accelerator.process_index, accelerator.num_processes)
        for _ in range(run.step * s.grad_accum):
            next(stream)  # same data order as an uninterrupted run

        bar = None
        if run.main and self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=run.total_steps, initial=run.step, desc="training", unit="step", dynamic_ncols=True)
        self.phase = "training"
        run.run_peak_memory = peak_memory_bytes(accelerator.device)
        reset_peak_memory(accelerator.device)
        train_started = time.perf_counter()
        smoothed = None
        consistency = consistency_weight(plain_model, self.names)
        model.train()
        try:
            while run.step < run.total_steps:
                step_loss = 0.0
                for _ in range(s.grad_accum):
                    chosen = [run.train_features[i] for i in next(stream)]
                    batch = {k: v.to(accelerator.device) for k, v in run.collate(chosen).items()}
                    # this rank's share of the global batch's mean loss (distributed.loss_weight)
                    weight = loss_weight(run.objective.loss_terms(batch), accelerator)
                    with accelerator.autocast(), run.task_deltas.batch(plain_model, [f.get("task") for f in chosen]):
                        if consistency:
                            loss, agreement = two_pass_loss(run.objective, model, plain_model, batch, consistency)
                        else:
                            loss, agreement = run.objective.loss(model, batch), 0.0
                    accelerator.backward((weight * (loss + agreement) + training_penalty(plain_model, self.names)) / s.grad_accum)
                    run.tokens_seen += sum(run.objective.tokens(f) for f in chosen)
                    global_loss = mean_over_ranks(weight * loss.item(), accelerator)
                    smoothed = global_loss if smoothed is None else 0.9 * smoothed + 0.1 * global_loss
                    step_loss += global_loss / s.grad_accum
                if run.sharded:  # FSDP averages only what it shards; the deltas it keeps whole, here
                    average_gradients(run.params, accelerator)
                if s.max_grad_norm:
                    accelerator.clip_grad_norm_(run.params, s.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                run.step += 1
                run.train_losses.append(step_loss)
                after_optimizer_step(plain_model, run.step, run.total_steps)
                elapsed = time.perf_counter() - train_started
                if bar is not None:
                    bar.set_postfix(loss=f"{smoothed:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                                    tok_s=f"{run.tokens_seen * accelerator.num_processes / elapsed:.0f}")
                    bar.update(1)
                if ((run.main or run.sharded) and s.eval_every and run.step % s.eval_every == 0
                        and run.step < run.total_steps):
                    loss_now = run.objective.held_out_loss(plain_model, run.tokenizer, run.eval_features)
                    log(f"step {run.step}: held-out loss {loss_now:.4f}")
                    model.train()
                if run.main and s.save_every and run.step % s.save_every == 0:
                    try:
                        self._checkpoint(run)
                    except (OSError, ConfigError) as exc:  # training goes on; the final save still comes
                        log(f"step {run.step}: checkpoint not written ({exc}); training continues")
        except KeyboardInterrupt:
            if run.main:
                path = self._checkpoint(run)
                message = f"interrupted at step {run.step}; saved {path}. Continue with the same command plus --resume"
                log(f"\n{message}")
                raise Interrupted(message) from None
            raise
        finally:
            if bar is not None:
                bar.close()
        run.train_seconds = time.perf_counter() - train_started
        run.training_peak_memory = peak_memory_bytes(accelerator.device)
        run.process_peaks = [int(peak) for peak in accelerator.gather(
            torch.tensor([run.training_peak_memory], device=accelerator.device)).tolist()]

    def _finish(self, run: "RunState") -> TrainResult:
        """Save the trained delta first, then the evaluation after training and the summary."""
        s, accelerator = self.settings, run.accelerator
        self.phase = "while saving the trained delta"
        accelerator.wait_for_everyone()
        delta_dir = self.output_dir / "delta"
        if run.main:
            # the trained delta exists from here on: whatever happens next, it is saved first
            delta_dir = self._save_final(run.plain_model, delta_dir)
            self.saved = f"the trained delta is saved in {delta_dir}"
            run.tokenizer.save_pretrained(self.output_dir / "tokenizer")
        self.phase = "during the evaluation after training"
        after = self._evaluate(run)
        if run.main:
            run.log(describe("after", after))
        result = TrainResult(
            settings=s, before=run.before, after=after, steps=run.step, train_seconds=run.train_seconds,
            total_seconds=time.perf_counter() - run.started,
            tokens_per_second=run.tokens_seen * accelerator.num_processes / max(run.train_seconds, 1e-9),
            delta_dir=delta_dir, summary_line=summary(run.plain_model).headline(),
            optimizer=run.optimizer_used, training_peak_memory_bytes=run.training_peak_memory,
            train_losses=run.train_losses,
            peak_memory_bytes=max(run.run_peak_memory, peak_memory_bytes(accelerator.device)),
            baseline=run.objective.baseline, precision=run.precision, attention=run.attention,
            packing=run.objective.packing_note, processes=accelerator.num_processes,
            process_peak_memory_bytes=run.process_peaks, main_process=run.main,
            frozen_values_on_main_process=run.frozen_held,
        )
        if run.main:
            self._write_summary(result)
        accelerator.wait_for_everyone()  # the other ranks leave once the main process is done
        return result

    def _evaluate(self, run: "RunState") -> Evaluation | None:
        """The held-out evaluation (the main process's; None on the others, which under FSDP
        compute it too: each forward needs every rank's shard)."""
        if not run.main and not run.sharded:
            return None
        return run.objective.evaluate(run.plain_model, run.tokenizer, run.eval_examples, run.eval_features,
                                      run.task_deltas)

    # the pieces ---------------------------------------------------------------------------------

    def _calibrate(self, model, delta_config, features, collate, loss_fn) -> None:
        """Deltas that choose their structure from data (FAR, gradient-pruned SparseAdapter)
        see the first few training batches before the optimizer is built."""
        count = delta_config.calibration_batches
        if not count:
            return
        s = self.settings
        device = next(model.parameters()).device
        batches = (
            {k: v.to(device) for k, v in collate([features[i] for i in range(start, min(start + s.batch_size, len(features)))]).items()}
            for start in range(0, min(count * s.batch_size, len(features)), s.batch_size)
        )
        done = calibrate(model, batches, loss_fn=loss_fn, names=self.names)
        if done:
            self.log(f"calibrated {done} modules on {count} batches")

    def _save_final(self, model, delta_dir: Path) -> Path:
        """Save the trained delta; if the output directory fails (full, gone read-only), save it
        in a fresh temporary directory instead and say where, then report the failure."""
        try:
            try:
                save_delta(model, delta_dir, self.names)
            except KeyboardInterrupt:  # the save is what keeps the training: finish it, then stop
                self.log("\ninterrupted while saving the trained delta; finishing the save first "
                         "(interrupt again to abandon it)")
                save_delta(model, delta_dir, self.names)
                message = f"interrupted after training; the trained delta is saved in {delta_dir}"
                self.log(message)
                raise Interrupted(message) from None
            return delta_dir
        except (OSError, ConfigError) as exc:
            rescue = Path(tempfile.mkdtemp(prefix="deltatune-rescued-")) / "delta"
            save_delta(model, rescue, self.names)
            raise ConfigError(f"could not save the delta in {delta_dir} ({exc}); it is safe in {rescue}") from None

    def _checkpoint(self, run: "RunState") -> Path:
        """Write a checkpoint atomically (temp dir, then rename); keep the newest few. The main
        process writes it: every rank holds the whole delta and optimizer state."""
        model, step = run.plain_model, run.step
        root = self.output_dir / CHECKPOINTS
        target = root / f"step-{step:06d}"
        staging = root / f".tmp-step-{step:06d}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_delta(model, staging / "delta", self.names)
        # the delta directory holds the inference form (folded prompt encoders); resuming needs
        # the training form, whose parameters the optimizer state belongs to
        training_form = {
            name: {path: layer.deltas[name].state_dict() for path, layer in delta_layers(model).items() if name in layer.deltas}
            for name in self.names
        }
        state = {"step": step, "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                 "torch_rng": torch.get_rng_state(), "delta": training_form,
                 "settings": json.dumps(resumed_settings(self.settings, run.accelerator.num_processes)),
                 "attention": self.attention}
        write_atomically(staging / STATE_FILE, lambda temporary: torch.save(state, temporary))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        # the one just written always stays, whatever other runs left in the directory
        older = [p for p in sorted(root.glob("step-*")) if p != target]
        for old in older[: max(0, len(older) - (self.settings.keep_checkpoints - 1))]:
            shutil.rmtree(old)
        self.saved = f"checkpoint {target} holds step {step}"
        return target

    def _readable_checkpoint(self) -> tuple[Path, dict]:
        """The newest checkpoint whose state reads back whole; damaged newer ones are named and
        skipped (once: the answer is kept for the run)."""
        if self._checkpoint_found is None:
            self._checkpoint_found = self._newest_readable_checkpoint()
        return self._checkpoint_found

    def _newest_readable_checkpoint(self) -> tuple[Path, dict]:
        found = sorted((self.output_dir / CHECKPOINTS).glob("step-*"), reverse=True)
        if not found:
            raise ConfigError(f"--resume: no checkpoint under {self.output_dir / CHECKPOINTS}")
        for checkpoint in found:
            try:
                state = torch.load(checkpoint / STATE_FILE, weights_only=True)
                if all(key in state for key in ("step", "optimizer", "scheduler", "torch_rng", "delta")):
                    return checkpoint, state
                problem = "an incomplete state"
            except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
                problem = " ".join(str(exc).split())[:120]
            self.log(f"--resume: skipping {checkpoint.name}, which cannot be read ({problem})")
        raise ConfigError(f"--resume: none of the checkpoints under {self.output_dir / CHECKPOINTS} can be read")

    def _resume(self, model, optimizer, scheduler, processes: int) -> int:
        """Load the newest checkpoint; written by any number of processes, it resumes with any
        other whose global batch (batch size × processes) is the same."""
        checkpoint, state = self._readable_checkpoint()
        if "settings" in state:
            saved, now = json.loads(state["settings"]), resumed_settings(self.settings, processes)
            changed = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
            if changed:
                raise ConfigError(
                    f"--resume: {checkpoint} was trained with other settings ({'; '.join(changed)}); "
                    "resume with the same ones, or start a new run in another directory (or with --overwrite)"
                )
        layers = delta_layers(model)
        if set(state["delta"]) != set(self.names):
            raise ConfigError(f"--resume: {checkpoint} holds deltas {sorted(state['delta'])}, this run has {self.names}")
        for name, per_path in state["delta"].items():
            if set(per_path) != {p for p, layer in layers.items() if name in layer.deltas}:
                raise ConfigError(f"--resume: {checkpoint} adapts other modules than this run's delta {name!r}")
            for path, tensors in per_path.items():
                layers[path].deltas[name].load_state_dict(tensors)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        return int(state["step"])

    def _write_summary(self, result: TrainResult) -> None:
        data = {
            "settings": dataclasses.asdict(result.settings),
            "before": dataclasses.asdict(result.before),
            "after": dataclasses.asdict(result.after),
            "steps": result.steps,
            "train_seconds": round(result.train_seconds, 2),
            "total_seconds": round(result.total_seconds, 2),
            "tokens_per_second": round(result.tokens_per_second, 1),
            "optimizer": result.optimizer,
            "precision": result.precision,
            "attention": result.attention,
            **({"packing": result.packing} if result.packing else {}),
            "processes": result.processes,
            "frozen_values_on_main_process": result.frozen_values_on_main_process,
            "peak_memory_mib": round(result.peak_memory_bytes / 2**20, 1),
            "training_peak_memory_mib": round(result.training_peak_memory_bytes / 2**20, 1),
            "training_peak_memory_mib_per_process": [round(b / 2**20, 1) for b in result.process_peak_memory_bytes],
            "train_losses": [round(loss, 5) for loss in result.train_losses],
            **({"baseline": result.baseline} if result.baseline else {}),
            "parameters": result.summary_line,
            "delta": str(result.delta_dir),
        }
        write_text_atomically(self.output_dir / "summary.json", json.dumps(data, indent=2) + "\n")


def _bytes_to_write(model: nn.Module, names: list[str], checkpoints: int) -> int:
    """About what the run writes: the delta, and per checkpoint the delta again plus the
    optimizer's two fp32 moments of every trainable value."""
    params = trainable_parameters(model, names)
    values = sum(p.numel() for p in params)
    delta = sum(p.numel() * p.element_size() for p in params)
    return delta + checkpoints * (2 * delta + 8 * values)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
