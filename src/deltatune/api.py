"""Functions over an unwrapped model: attach, switch, merge, route, count, detach.

The model is always the user's own object. ``attach`` swaps target modules for
:class:`~deltatune.layer.DeltaLayer` wrappers in place and returns the same model; every other
function reads the state it needs from those wrappers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from . import composition
from .anatomy import analyze, check_model, iter_modules
from .composition import Block, Parallel
from .config import DeltaConfig, check_name, check_positive_int
from .errors import ConfigError
from .layer import DeltaLayer, Routing, delta_layers
from .placement import place
from .quant import guard_cpu_packing
from .targets import in_selected_layers, validate_layers
from .upstream import passed_cache

#: set on the model at the first attach: parameter name -> requires_grad before deltatune froze it
_SAVED_REQUIRES_GRAD = "_deltatune_requires_grad"
#: set on the model while a Parallel block is active: the hook that replicates its inputs
_PARALLEL_HOOK = "_deltatune_parallel_hook"
#: set on the model while AdapterDrop draws layers per training forward: that pre-hook
_ADAPTER_DROP_HOOK = "_deltatune_adapter_drop_hook"


@dataclass
class DeltaInfo:
    """What the module tree says about one named delta."""

    name: str
    config: DeltaConfig
    paths: list[str] = field(default_factory=list)
    active: bool = False
    merged: bool = False
    num_params: int = 0


def deltas(model: nn.Module) -> dict[str, DeltaInfo]:
    """Every delta attached to ``model``, by name, in attach order."""
    check_model("deltas", model)
    found: dict[str, DeltaInfo] = {}
    for path, layer in delta_layers(model).items():
        for name, delta in layer.deltas.items():
            info = found.setdefault(name, DeltaInfo(name, delta.config))
            info.paths.append(path)
            info.active |= name in layer.active
            info.merged |= name in layer.merged
            info.num_params += sum(p.numel() for p in delta.parameters())
    return found


def chosen_names(model: nn.Module, names: str | Iterable[str] | None, default: Iterable[str]) -> list[str]:
    """``names`` (one, several, or None for ``default``), each checked to be attached to ``model``."""
    existing = dict.fromkeys(n for layer in delta_layers(model).values() for n in layer.deltas)
    chosen = [names] if isinstance(names, str) else list(default if names is None else names)
    for name in chosen:
        if name not in existing:
            have = ", ".join(repr(n) for n in existing) or "none"
            raise ConfigError(f"no delta named {name!r} on this model; attached deltas: {have}")
    return chosen


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is referenced: a module can sit at several paths (T5's
    shared embedding is also ``encoder.embed_tokens``), and every reference must see the delta."""
    for parent in list(model.modules()):
        if parent is new:
            continue
        # torch's own table of children: named_children() skips a second name for the same child
        for child_name, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, child_name, new)


def check_model_and_config(what: str, model: object, config: object) -> None:
    """A clear error for the arguments most often swapped or mistyped."""
    check_model(what, model)
    if not isinstance(config, DeltaConfig):
        by_name = f"deltatune.config({config!r:.40})" if isinstance(config, str) else "deltatune.config('lora')"
        raise ConfigError(
            f"{what} needs a delta config (e.g. deltatune.LoRAConfig(), or {by_name} for a method by name), "
            f"got {type(config).__name__}"
        )


def attach(
    model: nn.Module,
    config: DeltaConfig,
    name: str = "default",
    *,
    activate: bool = True,
    paths: Sequence[str] | None = None,
    initialize: bool = True,
) -> nn.Module:
    """Attach a new delta called ``name``; returns the same model, changed in place.

    Every base parameter is frozen (the previous ``requires_grad`` flags come back when the last
    delta is detached); the new delta's parameters are trainable. ``paths`` bypasses target
    resolution (used when loading a checkpoint that lists its modules).
    """
    check_model_and_config("attach", model, config)
    check_name("delta name", name)
    if any(name in layer.deltas for layer in delta_layers(model).values()):  # not deltas(): no counting
        raise ConfigError(f"a delta named {name!r} is already attached; detach it first or choose another name")
    placement = place(model, config, paths)
    placement.check_quantized_base()
    # every 4-bit layer, adapted or not, passes gradients to the deltas around it
    guard_cpu_packing(model)
    built = placement.build(initialize)
    block = placement.config.activation_block(name)

    if not delta_layers(model):
        setattr(model, _SAVED_REQUIRES_GRAD, {n: p.requires_grad for n, p in model.named_parameters()})
        for p in model.parameters():
            p.requires_grad_(False)
    for path, delta in built.items():
        current = model.get_submodule(path)
        layer = current if isinstance(current, DeltaLayer) else DeltaLayer(current)
        if layer is not current:
            _replace_module(model, current, layer)
        layer.deltas[name] = delta
        # new modules start in training mode; on a model in eval mode that would switch on dropout
        layer.training = layer.deltas.training = layer.base.training
        delta.train(layer.base.training)
        # a delta that runs inside a block (an AdapterFusion) is activated with its block, below
        layer.set_active(layer.active + (name,) if activate and block is None else layer.active)
    if block is not None and activate:
        try:
            _activate_block(model, block)
        except ConfigError:
            detach(model, [name])
            raise
    _freeze(model, placement.config.builds_on())
    return model


def _freeze(model: nn.Module, names: Iterable[str]) -> None:
    """Stop training the named deltas (a delta over other deltas trains over frozen ones)."""
    chosen = set(names)
    for layer in delta_layers(model).values():
        for name, delta in layer.deltas.items():
            if name in chosen:
                delta.requires_grad_(False)


def detach(model: nn.Module, names: str | Iterable[str] | None = None) -> nn.Module:
    """Remove deltas (all by default), unmerging them first; restores the original modules."""
    check_model("detach", model)
    chosen = set(chosen_names(model, names, deltas(model)))
    block = active_block(model)
    if block is not None and chosen & set(block.names()):
        _switch_off_block(model)  # a block missing a part would mean something else
    for path, layer in delta_layers(model).items():
        for name in [n for n in layer.deltas if n in chosen]:
            layer.remove(name)
        if not layer.deltas:
            _replace_module(model, layer, layer.base)
    if not delta_layers(model):
        _restore_requires_grad(model)
    return model


def delete(model: nn.Module, name: str) -> nn.Module:
    """Remove one named delta; the others stay as they are."""
    check_model("delete", model)
    return detach(model, [name])


def _restore_requires_grad(model: nn.Module) -> None:
    saved = model.__dict__.pop(_SAVED_REQUIRES_GRAD, None)
    if saved is None:
        return
    for n, p in model.named_parameters():
        p.requires_grad_(saved.get(n, p.requires_grad))


def activate(model: nn.Module, names: str | Iterable[str] | Block, *, exclusive: bool = True) -> nn.Module:
    """Make ``names`` active: only them (``exclusive``, i.e. switch) or in addition to the others.

    ``names`` may be a composition block (``dt.Stack("lang", "task")``, ``dt.Fuse(...)``...,
    see :mod:`deltatune.composition`): its deltas become the active ones, combined as it says,
    on every layer holding any of them. Activating plain names switches a block off.
    """
    check_model("activate", model)
    if isinstance(names, Block):
        if not exclusive:
            raise ConfigError("a composition block is activated on its own (exclusive=True); put every delta in it")
        return _activate_block(model, names)
    chosen = chosen_names(model, names, ())
    infos = deltas(model)
    for name in chosen:
        block = infos[name].config.activation_block(name)
        if block is not None:
            raise ConfigError(
                f"delta {name!r} is a {infos[name].config.method} delta; it runs inside its block: "
                f"dt.activate(model, dt.{block!r})"
            )
    if active_block(model) is not None:
        if not exclusive:
            raise ConfigError("a composition block is active; add deltas to the block, or switch to plain names")
        _switch_off_block(model)
    for layer in delta_layers(model).values():
        keep = () if exclusive else layer.active
        dropped = [n for n in layer.merged if n not in chosen] if exclusive else []
        if dropped:
            raise ConfigError(f"delta {dropped[0]!r} is merged into the weights; unmerge it before switching away")
        layer.set_active(tuple(dict.fromkeys((*keep, *chosen))))
    return model


def deactivate(model: nn.Module, names: str | Iterable[str] | None = None) -> nn.Module:
    """Make deltas inactive (all by default); their parameters stay attached. Deactivating any
    delta of an active composition block switches the whole block off."""
    check_model("deactivate", model)
    chosen = set(chosen_names(model, names, deltas(model)))
    for layer in delta_layers(model).values():
        merged = [n for n in layer.merged if n in chosen]
        if merged:
            raise ConfigError(f"delta {merged[0]!r} is merged into the weights; unmerge it before deactivating")
    block = active_block(model)
    if block is not None and chosen & set(block.names()):
        _switch_off_block(model)
    for layer in delta_layers(model).values():
        layer.set_active(n for n in layer.active if n not in chosen)
    return model


def active_block(model: nn.Module) -> Block | None:
    """The composition block active on ``model``, or None when its active deltas run plainly."""
    check_model("active_block", model)
    return next((layer.composition for layer in delta_layers(model).values() if layer.composition is not None), None)


def _switch_off_block(model: nn.Module) -> None:
    """Turn the active block off as a whole: none of its deltas stays active."""
    block = active_block(model)
    names = set(block.names()) if block is not None else set()
    for layer in delta_layers(model).values():
        layer.composition = None
        layer.set_active(n for n in layer.active if n not in names)
    hook = model.__dict__.pop(_PARALLEL_HOOK, None)
    if hook is not None:
        hook.remove()


def _activate_block(model: nn.Module, block: Block) -> nn.Module:
    names = chosen_names(model, block.names(), ())
    layers = delta_layers(model)
    if any(layer.routing is not None for layer in layers.values()):
        raise ConfigError("a mixed batch is being routed (dt.route); activate a block outside the route() block")
    merged = [n for layer in layers.values() for n in layer.merged if n not in names]
    if merged:
        raise ConfigError(f"delta {merged[0]!r} is merged into the weights; unmerge it before switching away")
    composition.check(block, layers)
    _switch_off_block(model)
    for layer in layers.values():
        held = [n for n in names if n in layer.deltas]
        layer.composition = block if held else None
        layer.set_active(held)
    if isinstance(block, Parallel):
        holder = next(layer for layer in layers.values() if layer.composition is block)
        hook = model.register_forward_pre_hook(_replicate_inputs(block, holder), with_kwargs=True)
        model.__dict__[_PARALLEL_HOOK] = hook
    return model


#: keyword arguments whose first dimension is not the batch even when it happens to equal it
_NOT_BATCHED = frozenset({"cache_position"})
_BATCH_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")


def _replicate_inputs(block: Parallel, holder: DeltaLayer):
    """A forward pre-hook on the model: repeat every batched input k times, replica by replica,
    while ``block`` is active (checked on ``holder``, a layer it runs on)."""
    copies = len(block.children)

    def hook(module, args, kwargs):
        if holder.composition is not block:  # switched off meanwhile (dt.disabled)
            return None
        if passed_cache(kwargs) is not None:
            raise ConfigError(
                f"{block!r} replicates the batch in one forward and cannot continue from a cache "
                "(generate): repeat the prompts once per branch and generate with "
                "dt.route(model, [name_1] * B + [name_2] * B + ...) instead"
            )
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        tensors += [kwargs[k] for k in _BATCH_KEYS if isinstance(kwargs.get(k), torch.Tensor)]
        if not tensors:
            return None
        batch = tensors[0].shape[0]

        def repeat(value, key=None):
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch and key not in _NOT_BATCHED:
                return torch.cat([value] * copies)
            return value

        return tuple(repeat(a) for a in args), {k: repeat(v, k) for k, v in kwargs.items()}

    return hook


def adapter_drop(
    model: nn.Module, layers: Sequence[int] | str | None = None, *, random_max: int | None = None
) -> nn.Module:
    """AdapterDrop (Rücklé et al., 2021, "AdapterDrop: On the Efficiency of Adapters in
    Transformers"): skip every delta inside some transformer blocks.

    ``layers`` (the pattern language's layer selection: ``[0, 1]``, ``"bottom:3"``,
    ``"2:5"``, counted per stack) are skipped in every forward, training and inference, until
    ``adapter_drop(model, None)``. ``random_max=n`` additionally skips, in each training-mode
    forward of the model, the deltas of the first m blocks of each stack, with m drawn
    uniformly from 0..n (torch's generator; one draw per forward, shared by all layers and
    kept through gradient checkpointing's re-runs); in eval mode it does nothing. A skipped
    layer runs its base module alone; deltas outside the blocks (prompts on the embeddings, a
    head copy) are never skipped. Each call replaces the previous setting; deltas attached
    afterwards are not covered until the next call.
    """
    check_model("adapter_drop", model)
    if isinstance(layers, list):
        layers = tuple(layers)
    validate_layers(layers)
    if random_max is not None:
        check_positive_int("random_max", random_max, "the most blocks dropped in a training forward")
    hook = model.__dict__.pop(_ADAPTER_DROP_HOOK, None)
    if hook is not None:
        hook.remove()
    found = delta_layers(model)
    for layer in found.values():
        layer.dropped = False
    if layers is None and random_max is None:
        return model
    anatomy = analyze(model)
    in_blocks = {path: layer for path, layer in found.items() if path in anatomy.layer_of}
    fixed = {path for path in in_blocks if layers is not None and in_selected_layers(path, layers, anatomy)}
    reach = {path for path in in_blocks if random_max is not None and anatomy.layer_of[path] < random_max}
    for path in sorted(fixed | reach):
        if in_blocks[path].merged:
            raise ConfigError(
                f"delta {in_blocks[path].merged[0]!r} is merged into the weights of {path}, so it cannot be "
                "skipped; unmerge it first"
            )
    for path in fixed:
        in_blocks[path].dropped = True
    if random_max is not None:
        blocks = [(layer, anatomy.layer_of[path], path in fixed) for path, layer in in_blocks.items()]

        def draw(module, args):
            depth = int(torch.randint(0, random_max + 1, ())) if module.training else 0
            for layer, index, always in blocks:
                layer.dropped = always or index < depth

        model.__dict__[_ADAPTER_DROP_HOOK] = model.register_forward_pre_hook(draw)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: every delta off (merged ones taken out) inside the block."""
    check_model("disabled", model)
    layers = delta_layers(model)
    saved = {path: (layer.active, layer.merged, layer.composition) for path, layer in layers.items()}
    for layer in layers.values():
        layer.unmerge(layer.merged)
        layer.set_active(())
        layer.composition = None
    try:
        yield model
    finally:
        for path, layer in layers.items():
            active, merged, layer.composition = saved[path]
            layer.merge(merged)
            layer.set_active(active)


def _check_mergeable(model: nn.Module, names: list[str]) -> None:
    if active_block(model) is not None:
        raise ConfigError("a composition block is active; its outputs cannot be merged into the weights. "
                          "Activate plain delta names first")
    infos = deltas(model)
    for name in names:
        if not infos[name].config.supports_merge:
            why = infos[name].config.merge_refusal
            raise ConfigError(f"delta {name!r} uses method {infos[name].config.method!r}, which cannot be merged"
                              + (f": {why}" if why else ""))
    owners: dict[int, list[str]] = {}
    for path, module in iter_modules(model):
        for param_name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(f"{path}.{param_name}" if path else param_name)
    for path, layer in delta_layers(model).items():
        for name in names:
            reason = layer.deltas[name].merge_blocker(layer.backend) if name in layer.deltas else None
            if reason:
                raise ConfigError(f"cannot merge delta {name!r} into {path}: {reason}")
        if any(n in layer.deltas for n in names) and layer.backend.weight is not None:
            sharers = [o for o in owners.get(id(layer.backend.weight), []) if not o.startswith(path + ".")]
            if sharers:
                raise ConfigError(
                    f"cannot merge into {path}: its weight is shared with {sharers[0]} (tied embeddings), "
                    "so merging would change both. Keep the delta unmerged, or untie the weights first."
                )


def merge(model: nn.Module, names: str | Iterable[str] | None = None, *, keep_exact: bool | None = None) -> nn.Module:
    """Fold deltas (the active ones by default) into the base weights: zero inference overhead.

    Unmerging restores the weights exactly for half-precision bases, and to float rounding for
    fp32 bases unless ``keep_exact=True`` (which keeps a copy of each touched weight).
    """
    check_model("merge", model)
    infos = deltas(model)
    chosen = chosen_names(model, names, [n for n, i in infos.items() if i.active])
    _check_mergeable(model, chosen)
    for layer in delta_layers(model).values():
        layer.merge([n for n in chosen if n in layer.deltas], keep_exact=keep_exact)
        layer.set_active(tuple(dict.fromkeys((*layer.active, *(n for n in chosen if n in layer.deltas)))))
    return model


def unmerge(model: nn.Module, names: str | Iterable[str] | None = None) -> nn.Module:
    """Take merged deltas (all by default) back out of the weights; they stay active."""
    check_model("unmerge", model)
    chosen = chosen_names(model, names, [n for n, i in deltas(model).items() if i.merged])
    for layer in delta_layers(model).values():
        layer.unmerge(chosen)
    return model


def merge_and_detach(model: nn.Module, names: str | Iterable[str] | None = None) -> nn.Module:
    """Merge deltas (the active ones by default) and remove every deltatune module.

    Returns the same model object, now plain: its state dict has the original keys and can be
    saved with ``save_pretrained`` and loaded without deltatune.
    """
    check_model("merge_and_detach", model)
    infos = deltas(model)
    chosen = chosen_names(model, names, [n for n, i in infos.items() if i.active])
    _check_mergeable(model, chosen)
    for path, layer in delta_layers(model).items():
        layer.merge([n for n in chosen if n in layer.deltas], keep_exact=False)
        layer.forget_original()  # the merge is final: no way back, no copy kept
        _replace_module(model, layer, layer.base)
    _restore_requires_grad(model)
    return model


@contextlib.contextmanager
def route(model: nn.Module, names_per_sample: Sequence[str | None], *, stacks: dict | None = None) -> Iterator[nn.Module]:
    """Mixed batch: sample i goes through delta ``names_per_sample[i]`` (None: the base model).

    Works with ``generate`` (beams and multiple sequences per prompt included). Merged deltas
    must be unmerged first, since their update is in the shared weights. Without gradients,
    the low-rank factors stacked and gathered for the rows are kept for the block's next
    forward (a decoding loop's steps): change no delta's weights inside one ``route`` block.

    ``stacks``: a dict, empty at first, that keeps each layer's stacked low-rank factors (all its
    low-rank deltas) beyond this block; pass the same dict to later ``route`` calls (a server
    whose batch's rows change from step to step): a layer restacks only for a delta its stack
    lacks, and a batch of few of many deltas takes their slots out of the stack. The contract
    extends to it: clear it after changing, deleting or replacing any delta's weights.
    """
    check_model("route", model)
    wanted = [n for n in dict.fromkeys(names_per_sample) if n is not None]
    chosen_names(model, wanted, ())
    layers = list(delta_layers(model).values())
    configs = {n: d.config for layer in layers for n, d in layer.deltas.items()}
    for name in wanted:
        if not configs[name].supports_mixed_batch:
            raise ConfigError(f"method {configs[name].method!r} of delta {name!r} does not support mixed batches")
    merged = [n for layer in layers for n in layer.merged]
    if merged:
        raise ConfigError(f"delta {merged[0]!r} is merged into the weights; unmerge it before routing a mixed batch")
    if active_block(model) is not None:
        raise ConfigError(
            f"composition block {active_block(model)!r} is active and decides what each row runs; activate plain "
            "names before route(), or split the batch with dt.BatchSplit instead"
        )
    routing = Routing(list(names_per_sample), stacks)
    if any(d.per_sample_tasks is not None for layer in layers for d in layer.deltas.values()):
        raise ConfigError("deltatune.task_route is active: a delta's per-sample tasks cannot be "
                          "combined with route(); route its tasks with task_route alone")
    for layer in layers:
        layer.routing = routing
    try:
        yield model
    finally:
        for layer in layers:
            layer.routing = None


def trainable_parameters(model: nn.Module, names: str | Iterable[str] | None = None) -> list[nn.Parameter]:
    """Parameters of the named deltas (the active ones by default), for an optimizer."""
    check_model("trainable_parameters", model)
    infos = deltas(model)
    chosen = set(chosen_names(model, names, [n for n, i in infos.items() if i.active]))
    params: list[nn.Parameter] = []
    for layer in delta_layers(model).values():
        for name, delta in layer.deltas.items():
            if name in chosen:
                params.extend(p for p in delta.parameters() if p.requires_grad)
    return params


def calibrate(
    model: nn.Module,
    batches: Iterable,
    *,
    loss_fn=None,
    names: str | Iterable[str] | None = None,
) -> int:
    """Let deltas that choose their structure from data decide it (FAR's trainable columns,
    SparseAdapter's gradient pruning): run ``batches`` forward and backward, accumulating the
    gradients each delta asks for, then have each delta decide. Returns how many deltas did.

    ``loss_fn(model, batch)`` defaults to ``model(**batch).loss``. Base weights that a delta
    reads gradients of are made to require grad only during the call.
    """
    check_model("calibrate", model)
    infos = deltas(model)
    chosen = set(chosen_names(model, names, [n for n, i in infos.items() if i.active]))
    waiting = [
        (layer, delta)
        for layer in delta_layers(model).values()
        for name, delta in layer.deltas.items()
        if name in chosen and delta.needs_calibration
    ]
    if not waiting:
        return 0
    loss_fn = loss_fn or (lambda m, batch: m(**batch).loss)
    tensors = {id(t): t for layer, delta in waiting for t in delta.calibration_tensors(layer.backend)}
    saved = {key: (t.requires_grad, t.grad) for key, t in tensors.items()}
    for t in tensors.values():
        t.grad = None
        t.requires_grad_(True)
    for _, delta in waiting:
        delta.calibrating = True
    try:
        for batch in batches:
            loss = loss_fn(model, batch)
            if loss.requires_grad:  # deltas that only read activations need no backward pass
                loss.backward()
        for layer, delta in waiting:
            delta.finish_calibration(layer.backend)
            delta.needs_calibration = False
    finally:
        for _, delta in waiting:
            delta.calibrating = False
        for key, t in tensors.items():
            t.requires_grad_(saved[key][0])
            t.grad = saved[key][1]
        for layer, _ in waiting:
            layer.deltas.zero_grad(set_to_none=True)
    return len(waiting)


def fold(model: nn.Module, names: str | Iterable[str] | None = None) -> int:
    """Replace training-time reparameterisations (prefix tuning's MLP, P-tuning's prompt
    encoder) by the plain tensors they produce now: the outputs stay the same, the encoders'
    parameters are dropped. Saving always stores the folded form. Returns how many deltas folded."""
    check_model("fold", model)
    chosen = set(chosen_names(model, names, deltas(model)))
    folded = 0
    for layer in delta_layers(model).values():
        for name, delta in layer.deltas.items():
            if name in chosen and delta.fold():
                folded += 1
    return folded


def after_optimizer_step(model: nn.Module, step: int, total_steps: int) -> None:
    """Tell every delta that an optimizer step finished (the trainer calls this)."""
    for layer in delta_layers(model).values():
        for delta in layer.deltas.values():
            delta.after_optimizer_step(step, total_steps)


def training_penalty(model: nn.Module, names: str | Iterable[str] | None = None) -> torch.Tensor | float:
    """The sum of the named deltas' (the active ones by default) training penalties, to add to
    the training loss; 0.0 when none has one (the trainer adds it)."""
    infos = deltas(model)
    chosen = set(chosen_names(model, names, [n for n, i in infos.items() if i.active]))
    terms = [term for layer in delta_layers(model).values() for name, delta in layer.deltas.items()
             if name in chosen and (term := delta.training_penalty()) is not None]
    return torch.stack([t.float() for t in terms]).sum() if terms else 0.0


def consistency_weight(model: nn.Module, names: str | Iterable[str] | None = None) -> float:
    """The largest :attr:`~deltatune.layer.Delta.consistency_weight` among the named deltas (the
    active ones by default): above 0, a training step runs each batch twice and adds that weight
    times the symmetric KL divergence between the two passes' predictions; 0.0 when none asks."""
    infos = deltas(model)
    chosen = set(chosen_names(model, names, [n for n, i in infos.items() if i.active]))
    weights = [float(delta.consistency_weight) for layer in delta_layers(model).values()
               for name, delta in layer.deltas.items() if name in chosen]
    return max(weights, default=0.0)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; shared (tied) parameters count once."""
    check_model("count_parameters", model)
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def base_model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    names = getattr(config, "architectures", None) if config is not None else None
    return names[0] if names else type(model).__name__
