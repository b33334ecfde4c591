"""Saving and loading deltas: safetensors for tensors, JSON for everything else. Never pickle.

A saved delta is a directory with ``delta_config.json`` (method, config, numeric semantics,
library version, base fingerprint) and ``delta.safetensors``, whose keys are the adapted
module's path plus the delta's parameter name (``model.layers.0.self_attn.q_proj.A``). Several
deltas saved together go in one sub-directory each.

``format="peft"`` writes, and :func:`load` recognises, Hugging Face PEFT's adapter directories
instead (:mod:`deltatune.peft_format`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import peft_format
from .anatomy import check_model, iter_modules
from .placement import place
from .api import DeltaInfo, attach, base_model_name, chosen_names, delete, deltas
from .backends import layer_backend
from .config import DeltaConfig, check_choice
from .errors import CheckpointError
from .layer import delta_layers
from .outputs import write_atomically, write_text_atomically

CONFIG_FILE = "delta_config.json"
WEIGHTS_FILE = "delta.safetensors"
FORMAT_VERSION = 1


def _library_version() -> str:
    from . import __version__

    return __version__


def fingerprint(model: nn.Module, paths: Iterable[str]) -> str:
    """A cheap hash of the adapted modules' paths, kinds and shapes (no weights read)."""
    modules = dict(iter_modules(model))
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(f"{path}:{layer_backend(modules[path]).signature()};".encode())
    return digest.hexdigest()[:16]


def _fingerprinted(config: DeltaConfig, paths: Iterable[str]) -> list[str]:
    """The paths whose base shapes must match: not a task head's output layer, whose width the
    head replaces (a classifier loaded with any number of labels takes the delta)."""
    head = config.task_head.module if config.task_head is not None else None
    return [p for p in paths if p != head]


FORMATS = ("deltatune", "peft")


def _refuse_partial(key: str, value: torch.Tensor, delta: nn.Module) -> None:
    """A tensor that is empty, or one process's shard, where the delta's parameters say it has
    values (ZeRO-3 and FSDP leave such placeholders and shards on each process) is never written:
    the file would load as a delta that silently lost what it learned."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        raise CheckpointError(f"refusing to save {key}: it is a sharded tensor ({tuple(value.to_local().shape)} of "
                              f"{tuple(value.shape)} on this process); gather the delta on every process first")
    # DeepSpeed ZeRO-3 empties a partitioned parameter and keeps its true size in ds_numel
    expected = sum(getattr(p, "ds_numel", p.numel()) for p in delta.parameters())
    if value.device.type == "meta" or (value.numel() == 0 and expected > 0):
        raise CheckpointError(
            f"refusing to save {key}: it is {'on the meta device' if value.device.type == 'meta' else 'empty'} "
            f"(shape {tuple(value.shape)}) while its delta holds {expected:,} values; under ZeRO-3 or FSDP each "
            "process holds a part, so gather the parameters (or save from where they are whole) before saving")


def save(
    model: nn.Module, path: str | Path, names: str | Iterable[str] | None = None, *, format: str = "deltatune"
) -> list[Path]:
    """Save deltas (all by default). One delta goes in ``path``; several, in ``path/<name>``.

    ``format="peft"`` writes PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``, which
    ``PeftModel.from_pretrained`` and serving engines load (methods PEFT has: LoRA and its
    variants, (IA)³, prompt tuning, P-tuning, prefix tuning, LLaMA-Adapter)."""
    check_model("save", model)
    check_choice("format", format, FORMATS)
    infos = deltas(model)
    chosen = chosen_names(model, names, infos)
    if not chosen:
        raise CheckpointError("this model has no delta to save; attach one first")
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"cannot save into {str(root)!r}: it is a file; give a directory")
    _refuse_hiding_an_earlier_save(root, several=len(chosen) > 1)
    if format == "peft":
        check_peft_exportable(infos, chosen)  # refuse before writing anything
        return [peft_format.save(model, root if len(chosen) == 1 else root / name, name) for name in chosen]
    written = []
    layers = delta_layers(model)
    for name in chosen:
        info = infos[name]
        target = root if len(chosen) == 1 else root / name
        target.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for module_path in info.paths:
            for key, value in layers[module_path].deltas[name].saved_state().items():
                _refuse_partial(f"{module_path}.{key}", value, layers[module_path].deltas[name])
                tensors[f"{module_path}.{key}"] = value.detach().contiguous().cpu()
        # tensors first, config last, each whole or not at all; the config names the tensors'
        # digest, so an interrupted save never passes for the old config's delta
        write_atomically(target / WEIGHTS_FILE, lambda temporary: save_file(
            tensors, str(temporary), metadata={"format": "pt", "delta": name}))
        meta = {
            "format": "deltatune",
            "format_version": FORMAT_VERSION,
            "library_version": _library_version(),
            "name": name,
            "config": info.config.to_dict(),
            "numerics": _numerics([layers[p].deltas[name] for p in info.paths]),
            # every adapted module, including those whose delta stores no tensor (an input tap)
            "paths": info.paths,
            "base": {
                "architecture": base_model_name(model),
                "fingerprint": fingerprint(model, _fingerprinted(info.config, info.paths)),
                "modules": len(info.paths),
            },
            "weights_sha256": _digest(target / WEIGHTS_FILE),
        }
        write_text_atomically(target / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
        written.append(target)
    return written


def check_peft_exportable(infos: dict[str, DeltaInfo], names: Iterable[str]) -> None:
    """Raise unless PEFT's format can store each named delta (its method exists in PEFT)."""
    for name in names:
        peft_format.exporter_for(infos[name].config.method)
        if infos[name].config.task_head is not None:
            raise CheckpointError(
                f"delta {name!r} has a task head, which PEFT's format cannot store (its classifier copy "
                "keeps the base layer's width); save it in deltatune's format"
            )


def _refuse_hiding_an_earlier_save(root: Path, several: bool) -> None:
    """One directory holds one delta, or several in sub-directories: writing the other layout
    over an earlier save would leave it beside the new one, and loading would pick one silently."""
    if several and (root / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{str(root)!r} holds a delta saved on its own; saving several deltas there (one sub-directory "
            "each) would leave it in the way: choose another directory, or delete it first"
        )
    if not several and root.is_dir() and any(root.glob(f"*/{CONFIG_FILE}")):
        raise CheckpointError(
            f"{str(root)!r} holds several deltas in sub-directories; saving one delta over them would hide "
            "them: choose another directory, or delete them first"
        )


def _numerics(module_deltas: list[nn.Module]) -> dict:
    first = next((p for d in module_deltas for p in d.parameters()), None)
    described = {"param_dtype": str(first.dtype).removeprefix("torch.") if first is not None else None}
    config = getattr(module_deltas[0], "config", None)
    return described | (config.numerics() if config is not None else {})


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_tensors(directory: Path, meta: dict) -> dict[str, torch.Tensor]:
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{directory} has a config but no {WEIGHTS_FILE}")
    expected = meta.get("weights_sha256")
    if expected is not None and _digest(weights_path) != expected:
        raise CheckpointError(
            f"{weights_path} is not the file {CONFIG_FILE} was saved with (a save interrupted between "
            "the two, or a damaged file); save the delta again or use an earlier checkpoint"
        )
    try:
        return load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights_path} cannot be read as safetensors ({exc}); it is damaged or truncated") from None


def _read_meta(directory: Path) -> dict:
    config_path = directory / CONFIG_FILE
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != "deltatune" or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{config_path} is not a deltatune delta config")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path} has format version {meta['format_version']}; this deltatune reads up to "
            f"{FORMAT_VERSION} — upgrade deltatune"
        )
    return meta


def read_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of the delta saved in ``directory``, checked against its config's digest."""
    directory = Path(directory)
    return _read_tensors(directory, _read_meta(directory))


def read_config(directory: str | Path) -> DeltaConfig:
    """The config of the delta saved in ``directory`` (deltatune's format)."""
    return DeltaConfig.from_dict(_read_meta(Path(directory))["config"])


def delta_directories(path: str | Path) -> list[Path]:
    """The delta directories under ``path``: itself, or its sub-directories for a multi-delta save."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"no saved delta at {str(root)!r}: the path does not exist")
    if (root / CONFIG_FILE).is_file():
        return [root]
    found = sorted(p.parent for p in root.glob(f"*/{CONFIG_FILE}"))
    if not found:
        raise CheckpointError(f"{str(root)!r} holds no {CONFIG_FILE} (nor sub-directories with one)")
    return found


def load(
    model: nn.Module,
    path: str | Path,
    name: str | None = None,
    *,
    strict: bool = True,
    activate: bool = True,
) -> list[str]:
    """Attach saved deltas to ``model`` and fill in their weights; returns the names attached.

    With ``strict`` (the default) a checkpoint made for another base is refused: a module it
    adapts that is missing here, or of another shape, or another architecture. ``strict=False``
    loads what fits and warns about the rest.

    A PEFT adapter directory (``adapter_config.json``) is recognised and attached as the
    equivalent deltatune delta, named ``name``, or "default" (its sub-directories, PEFT's other
    adapters, by their directory names). PEFT checkpoints are always loaded strictly.
    """
    check_model("load", model)
    root = Path(path)
    if root.is_dir() and not (root / CONFIG_FILE).is_file():
        adapters = peft_format.peft_directories(root)
        if adapters:
            if name is not None and len(adapters) > 1:
                raise CheckpointError(f"{str(path)!r} holds {len(adapters)} PEFT adapters; load them without a name")
            single = adapters == [root]
            names = []
            for directory in adapters:
                imported = peft_format.read(model, directory)
                for note in imported.notes:
                    warnings.warn(note, peft_format.PeftFormatNote, stacklevel=2)
                delta_name = name or ("default" if single else directory.name)
                _attach_filled(model, imported.config, delta_name, imported.states, directory, activate)
                names.append(delta_name)
            return names
    directories = delta_directories(path)
    if name is not None and len(directories) > 1:
        raise CheckpointError(f"{str(path)!r} holds {len(directories)} deltas; load them without a name")
    names = []
    read = [(d, meta, DeltaConfig.from_dict(meta["config"])) for d in directories for meta in [_read_meta(d)]]
    # a delta over other deltas (an AdapterFusion over its adapters) loads after them
    for directory, meta, config in sorted(read, key=lambda item: bool(item[2].builds_on())):
        delta_name = name or meta.get("name", "default")
        tensors = _read_tensors(directory, meta)
        per_module = _group_by_module(tensors, model)
        order = {p: i for i, p in enumerate(meta.get("paths", ()))}
        for module_path in order:
            per_module.setdefault(module_path, {})
        per_module = dict(sorted(per_module.items(), key=lambda item: order.get(item[0], len(order))))
        paths = _check_fit(model, config, meta, per_module, directory, strict)
        _attach_filled(model, config, delta_name, {p: per_module[p] for p in paths}, directory, activate)
        names.append(delta_name)
    return names


def _attach_filled(
    model: nn.Module, config: DeltaConfig, name: str, per_module: dict[str, dict[str, torch.Tensor]],
    directory: Path, activate: bool,
) -> None:
    """Attach ``config`` as ``name`` on exactly the modules of ``per_module`` and load their tensors."""
    attach(model, config, name, activate=activate, paths=list(per_module), initialize=False)
    layers = delta_layers(model)
    try:
        for module_path, state in per_module.items():
            layers[module_path].deltas[name].load_saved_state(state, f"{directory}: {config.method} delta on {module_path}")
    except CheckpointError:
        delete(model, name)  # never leave a delta with uninitialised weights behind
        raise


def _group_by_module(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    # keys are "<module path>.<parameter name>"; module paths may contain dots and any word,
    # so split at the longest prefix that is a module path in this model, else at the last dot
    modules = {p for p, _ in iter_modules(model)}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        parts = key.split(".")
        split = next((i for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in modules), len(parts) - 1)
        grouped.setdefault(".".join(parts[:split]), {})[".".join(parts[split:])] = value
    return grouped


def _check_fit(model, config, meta, per_module, directory, strict) -> list[str]:
    modules = dict(iter_modules(model))
    base = meta.get("base", {})
    here = base_model_name(model)
    problems = []
    fits = []
    for module_path in per_module:
        module = modules.get(module_path)
        if module is None or layer_backend(module) is None:
            problems.append(f"{module_path} does not exist here")
        else:
            fits.append(module_path)
    if not problems and base.get("fingerprint") not in (None, fingerprint(model, _fingerprinted(config, fits))):
        problems.append("the adapted modules have other shapes here")
    if base.get("architecture") not in (None, here):
        problems.append(f"it was made for {base['architecture']}, this model is {here}")
    if problems:
        message = (
            f"the delta in {directory} does not fit this model: {'; '.join(problems[:4])}"
            + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else "")
        )
        if strict:
            raise CheckpointError(message + ". Pass strict=False to load what fits.")
        warnings.warn(message + "; loading the modules that fit", stacklevel=3)
        fits = _same_shapes(model, config, fits, per_module)
    if not fits:
        raise CheckpointError(f"none of the modules of the delta in {directory} fit this model")
    return fits


def _same_shapes(model, config, paths, per_module) -> list[str]:
    """The paths whose saved tensors have the shapes this config's delta has there."""
    built = place(model, config, paths).build(initialize=False, device=torch.device("meta"))
    fitting = []
    for p in paths:
        # a delta that stores a compressed form (SparseAdapter) is checked by key only
        expected = {k: tuple(v.shape) for k, v in built[p].state_dict().items()}
        saved = per_module[p]
        if set(saved) == set(built[p].saved_state()) and all(
            tuple(v.shape) == expected[k] for k, v in saved.items() if k in expected
        ):
            fitting.append(p)
    return fitting


def restore(model: nn.Module, path: str | Path) -> list[str]:
    """Fill the deltas already attached to ``model``, in place, from a save of those same deltas
    (deltatune's format or PEFT's); returns their names.

    Where :func:`load` attaches new deltas, this keeps the parameter objects an optimizer holds,
    which is what resuming a training run needs. The save must hold exactly the model's deltas,
    each on the modules it adapts here. A single PEFT adapter fills the model's only delta,
    whatever its name; several fill the deltas named like their sub-directories.
    """
    check_model("restore", model)
    root = Path(path)
    attached = deltas(model)
    saved: dict[str, tuple[Path, dict[str, dict[str, torch.Tensor]]]] = {}
    peft_adapters = peft_format.peft_directories(root) if root.is_dir() and not (root / CONFIG_FILE).is_file() else []
    for directory in peft_adapters:
        name = next(iter(attached)) if peft_adapters == [root] and len(attached) == 1 else directory.name
        saved[name] = (directory, peft_format.read(model, directory).states)
    if not peft_adapters:
        for directory in delta_directories(root):
            meta = _read_meta(directory)
            per_module = _group_by_module(_read_tensors(directory, meta), model)
            for module_path in meta.get("paths", ()):
                per_module.setdefault(module_path, {})  # a delta that stores no tensor there
            saved[meta.get("name", "default")] = (directory, per_module)
    if set(saved) != set(attached):
        raise CheckpointError(
            f"{str(root)!r} holds the deltas {sorted(saved)}, but this model has {sorted(attached)}; restore "
            "into a model with the same deltas attached, or use load() to attach new ones"
        )
    layers = delta_layers(model)
    for name, (directory, per_module) in saved.items():
        missing, extra = set(attached[name].paths) - set(per_module), set(per_module) - set(attached[name].paths)
        if missing or extra:
            raise CheckpointError(
                f"the delta {name!r} in {directory} adapts other modules than the attached one: "
                f"missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}"
            )
        for module_path, state in per_module.items():
            layers[module_path].deltas[name].load_saved_state(state, f"{directory}: delta {name!r} on {module_path}")
    return list(saved)
