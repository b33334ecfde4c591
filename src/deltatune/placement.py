"""Where a config goes on a model, and the deltas it builds there, resolved once per call.

:func:`place` resolves a config against a model: its task head found (or checked) in the
model, the config's own :meth:`~deltatune.config.DeltaConfig.placement` (a method over other
deltas goes where they are), its targets matched (or given paths checked), and the modules
``modules_to_save`` or the head train as full copies. The :class:`Placement` it returns holds
the anatomy and module table it computed, and :meth:`Placement.build` makes the deltas from
them. ``attach``, ``plan``, loading a checkpoint and the PEFT converters all go through it, so
they agree on where every config goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from .anatomy import Anatomy, analyze, is_linear_like, iter_modules
from .backends import Backend, backend_for, layer_backend
from .config import DeltaConfig, master_dtype
from .errors import ConfigError, TargetError
from .heads import HeadLayer
from .heads import resolve as resolve_head
from .layer import Delta, base_of, delta_layers, has_own_parameters
from .targets import lookup, pattern_matches, select


class ParameterCopy(Delta):
    """Runs the module with trainable copies of its own parameters (initialised to theirs);
    merging writes the copies into the module (see :class:`~deltatune.layer.Delta`). What
    ``modules_to_save`` trains, and what LN tuning and top-layer tuning build."""

    acts_on = "parameters"

    def __init__(self, config: DeltaConfig, module: nn.Module, initialize: bool, device: torch.device | None):
        super().__init__()
        self.config = config
        self.copies = nn.ParameterDict()
        for name, param in module.named_parameters(recurse=False):
            copy = torch.empty(param.shape, dtype=master_dtype(param.dtype), device=device or param.device)
            if initialize:
                copy.copy_(param.detach())
            self.copies[name] = nn.Parameter(copy)

    def parameter_values(self, backend: Backend) -> dict[str, Tensor]:
        own = dict(backend.module.named_parameters(recurse=False))
        return {name: copy.to(own[name].dtype) for name, copy in self.copies.items()}


@dataclass(frozen=True)
class Placement:
    """A config resolved against one model: what :func:`place` returns."""

    #: the config, with its task head resolved to module paths
    config: DeltaConfig
    #: the modules it adapts, in order: the method's own, then full copies and the head
    paths: tuple[str, ...]
    anatomy: Anatomy
    #: path -> module of the model, as it was when placed
    modules: Mapping[str, nn.Module]

    def trains_copy(self, path: str) -> bool:
        """Whether ``path`` is (inside) one of ``modules_to_save``, or one of the task head's
        other layers, trained as a full copy."""
        return trains_copy(self.config, path, self.modules, self.anatomy)

    def check_quantized_base(self) -> None:
        """Refuse what cannot train on a quantized layer: a full copy of one, or a method
        whose ``quantized_base_blocker`` says why it cannot."""
        for path in self.paths:
            backend = backend_for(base_of(self.modules[path]))
            if backend is None or not backend.quantized:
                continue
            if self.trains_copy(path):
                raise ConfigError(
                    f"modules_to_save: {path} is {backend.kind}, and a quantized weight cannot be trained as a "
                    "full copy (quantize with skip=[...] to keep it in full precision)"
                )
            if self.config.quantized_base_blocker is not None:
                raise ConfigError(
                    f"method {self.config.method!r} is not supported on a quantized base ({path} is {backend.kind}): "
                    f"{self.config.quantized_base_blocker}"
                )

    def build(self, initialize: bool = True, device: torch.device | None = None) -> dict[str, Delta]:
        """One delta per path (``device``: e.g. meta, for dry runs). ``build``'s options carry
        the per-module values (rank patterns...), the role and the anatomy; ``config.link``
        then wires deltas that work together (a parallel adapter's input tap, shared factors)."""
        config, anatomy = self.config, self.anatomy
        built, copies = {}, {}
        for path in self.paths:
            module = self.modules[path]
            options = {
                key: lookup(patterns, path, module, anatomy, getattr(config, key, None))
                for key, patterns in config.per_module_options().items()
            }
            options["role"] = anatomy.role_of.get(path)
            options["anatomy"] = anatomy
            if device is not None:
                options["device"] = device
            if config.task_head is not None and path == config.task_head.module:
                copies[path] = HeadLayer(config, layer_backend(base_of(module)), initialize, device)
            elif self.trains_copy(path):
                copies[path] = ParameterCopy(config, base_of(module), initialize, device)
            else:
                built[path] = config.build(path, module, options, initialize=initialize)
        config.link(built, anatomy)
        return built | copies


def place(model: nn.Module, config: DeltaConfig, paths: Sequence[str] | None = None) -> Placement:
    """Resolve ``config`` on ``model``. ``paths`` (from a checkpoint, which lists its modules)
    skips target matching and the head's search; each is checked to be something the config
    can adapt there."""
    anatomy = analyze(model)
    if config.task_head is not None and paths is None:
        config = config.replace(task_head=resolve_head(model, config.task_head, anatomy))
    modules = dict(iter_modules(model))
    paths = config.paths_from_attached(delta_layers(model), paths)
    if paths is None:
        chosen = _matched_paths(model, config, anatomy)
    else:
        for path in paths:
            _check_given_path(config, path, modules, anatomy)
        chosen = list(paths)
    return Placement(config, tuple(chosen), anatomy, modules)


def _matched_paths(model: nn.Module, config: DeltaConfig, anatomy: Anatomy) -> list[str]:
    head = config.task_head
    saved = _saved_paths(model, config, anatomy) if config.modules_to_save else []
    if head is not None:
        saved = [p for p in saved if p not in head.paths()] + list(head.paths())
    selection = select(
        model,
        config.target_spec,
        exclude=config.exclude,
        layers=config.layer_spec,
        accepts=config.accepts,
        each_must_match=config.targets is not None,
        what=f"method {config.method!r}",
        adapts=config.adapts,
        anatomy=anatomy,
    )
    # a module trained as a full copy (or a head) needs no other delta of the same config
    adapted = [p for p in config.expand(list(selection.paths), anatomy) if p not in saved]
    return adapted + saved


def _check_given_path(config: DeltaConfig, path: str, modules: Mapping[str, nn.Module], anatomy: Anatomy) -> None:
    if path not in modules:
        raise TargetError(f"module {path!r} does not exist in this model")
    module = modules[path]
    if config.task_head is not None and path == config.task_head.module:
        if not is_linear_like(base_of(module)):
            raise TargetError(f"task_head module {path} is {type(base_of(module)).__name__}, not a linear layer")
    elif trains_copy(config, path, modules, anatomy):
        if not has_own_parameters(module):
            raise TargetError(f"modules_to_save: {path} ({type(module).__name__}) has no parameters of its own")
    elif not config.accepts(module, anatomy.role_of.get(path)):
        raise TargetError(f"method {config.method!r} cannot adapt {path} ({type(module).__name__})")


def trains_copy(config: DeltaConfig, path: str, modules: Mapping[str, nn.Module], anatomy: Anatomy) -> bool:
    """Whether ``path`` is (inside) one of ``config``'s ``modules_to_save``, or one of its task
    head's other layers, trained as a full copy."""
    if config.task_head is not None and path in (config.task_head.train or ()):
        return True
    if not config.modules_to_save:
        return False
    parts = path.split(".")
    ancestors = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    return any(
        pattern_matches(p, a, modules[a], anatomy) for a in ancestors if a in modules for p in config.modules_to_save
    )


def _saved_paths(model: nn.Module, config: DeltaConfig, anatomy: Anatomy) -> list[str]:
    """The modules ``modules_to_save`` trains: each match and every module inside it that has
    parameters of its own (a classification head made of several layers is copied whole)."""
    chosen = select(
        model, config.modules_to_save, accepts=lambda m, r: next(base_of(m).parameters(), None) is not None,
        what="modules_to_save", adapts="modules with parameters", anatomy=anatomy,
    ).paths
    return [
        path for path, module in iter_modules(model)
        if any(path == c or path.startswith(c + ".") for c in chosen) and has_own_parameters(module)
    ]
