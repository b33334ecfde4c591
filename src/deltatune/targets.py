"""One pattern language for choosing modules, used by targets, exclusions and per-module options.

A pattern is one of:

* a role from :mod:`deltatune.anatomy` (``attn.q``, ``ffn.down``, ``embed``...) or a role group
  (``attn``, ``ffn``), found in any supported architecture;
* ``all-linear``: every Linear / Conv1D layer except the output head;
* ``re:<regex>``: a regular expression that must match a whole dotted module path;
* a glob over dotted paths (``model.layers.*.self_attn.q_proj``, ``*.q_proj``), which also
  matches any dotted suffix, so ``mlp.*_proj`` works without a leading ``*.``;
* a plain name (``q_proj``, ``self_attn.q_proj``): the path itself or any path ending in it.

``layers`` then keeps only modules inside chosen transformer blocks: a list of indices, or
``"top:N"``, ``"bottom:N"``, or a Python-style ``"start:stop"`` slice, counted per stack.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, TypeVar

import regex
from torch import nn

from .anatomy import ROLE_GROUPS, ROLES, Anatomy, analyze, is_linear_like, iter_modules
from .errors import ConfigError, TargetError

ALL_LINEAR = "all-linear"
#: how long one ``re:`` pattern may take on one module path: far above any sane pattern's
#: microseconds, far below a hang
REGEX_SECONDS = 1.0
_LAYER_SPEC = re.compile(r"^(top|bottom):(\d+)$|^(-?\d*):(-?\d*)$")
T = TypeVar("T")


def validate_pattern(pattern: str) -> None:
    if not isinstance(pattern, str) or not pattern.strip():
        raise ConfigError(f"target pattern must be a non-empty string, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            regex.compile(pattern[3:])
        except regex.error as exc:
            raise ConfigError(f"bad regular expression in target {pattern!r}: {exc}") from exc


def validate_layers(layers: object) -> None:
    if layers is None:
        return
    if isinstance(layers, tuple):
        if not layers or not all(isinstance(i, int) and i >= 0 for i in layers):
            raise ConfigError(f"layers must be non-negative block indices, got {list(layers)}")
        return
    if isinstance(layers, str) and _LAYER_SPEC.match(layers.strip()):
        return
    raise ConfigError(
        f"layers={layers!r} is not a layer selection; use a list of indices like [20, 21], "
        "'top:8', 'bottom:4' or a slice like '2:10'"
    )


def _kind(pattern: str) -> str:
    if pattern == ALL_LINEAR:
        return "all-linear"
    if pattern.startswith("re:"):
        return "regex"
    if pattern in ROLES or pattern in ROLE_GROUPS:
        return "role"
    if any(c in pattern for c in "*?["):
        return "glob"
    return "name"


def pattern_matches(pattern: str, path: str, module: nn.Module, anatomy: Anatomy) -> bool:
    """Does ``pattern`` select the module at ``path``?"""
    kind = _kind(pattern)
    if kind == "all-linear":
        return is_linear_like(module) and path != anatomy.head
    if kind == "regex":
        try:
            return regex.fullmatch(pattern[3:], path, timeout=REGEX_SECONDS) is not None
        except TimeoutError:
            raise ConfigError(
                f"target pattern {pattern!r} took over {REGEX_SECONDS:g} s to match {path!r}: it backtracks "
                "catastrophically (nested repetition such as (a+)+); write it without the nesting"
            ) from None
    if kind == "role":
        role = anatomy.role_of.get(path)
        return role is not None and (role == pattern or role in ROLE_GROUPS.get(pattern, ()))
    if kind == "glob":
        return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, "*." + pattern)
    return path == pattern or path.endswith("." + pattern)


def _selected_layer_indices(layers: tuple[int, ...] | str, num_layers: int) -> set[int]:
    if isinstance(layers, tuple):
        return set(layers)
    m = _LAYER_SPEC.match(layers.strip())
    assert m is not None  # validated when the config was built
    if m.group(1):
        n = int(m.group(2))
        return set(range(max(0, num_layers - n), num_layers)) if m.group(1) == "top" else set(range(min(n, num_layers)))
    start = int(m.group(3)) if m.group(3) else None
    stop = int(m.group(4)) if m.group(4) else None
    return set(range(num_layers)[slice(start, stop)])


def in_selected_layers(path: str, layers: tuple[int, ...] | str | None, anatomy: Anatomy) -> bool:
    if layers is None:
        return True
    index = anatomy.layer_of.get(path)
    if index is None:
        return False
    stack = max((s for s in anatomy.stacks if path.startswith(s + ".")), key=len)
    return index in _selected_layer_indices(layers, anatomy.num_layers[stack])


@dataclass(frozen=True)
class Selection:
    """The modules a spec selects, in model order, and which pattern picked each."""

    paths: tuple[str, ...]
    matched_by: Mapping[str, str]
    anatomy: Anatomy


def suggest(pattern: str, model: nn.Module, anatomy: Anatomy, limit: int = 5) -> str:
    """A sentence naming the existing module names and roles closest to ``pattern``."""
    leaf_names: dict[str, None] = {}
    for path, _ in iter_modules(model):
        if path:
            parts = path.split(".")
            leaf_names.setdefault(parts[-1])
            if len(parts) > 1:
                leaf_names.setdefault(".".join(parts[-2:]))
    roles_here = sorted({r for r in anatomy.role_of.values()})
    key = pattern[3:] if pattern.startswith("re:") else pattern.strip("*.")
    close = difflib.get_close_matches(key, list(leaf_names) + roles_here, n=limit, cutoff=0.4)
    if not close:
        close = [n for n in leaf_names if not n.isdigit() and "." not in n][:limit]
    role_text = f" Roles found in this model: {', '.join(roles_here)}." if roles_here else ""
    return f"Closest existing names: {', '.join(close)}.{role_text}"


def select(
    model: nn.Module,
    targets: Sequence[str],
    *,
    exclude: Sequence[str] = (),
    layers: tuple[int, ...] | str | None = None,
    accepts: Callable[[nn.Module, str | None], bool],
    each_must_match: bool = True,
    what: str = "this method",
    adapts: str = "Linear / Conv1D / Embedding layers",
    anatomy: Anatomy | None = None,
) -> Selection:
    """Resolve patterns to module paths.

    ``accepts(module, role)`` says which modules the method can adapt; a pattern that matches only
    modules of other kinds is an error naming them. With ``each_must_match`` every pattern must
    select something (explicit user targets); otherwise only the union must (method defaults).
    """
    anatomy = anatomy or analyze(model)
    matched_by: dict[str, str] = {}
    rejected: dict[str, list[str]] = {}
    for path, module in iter_modules(model):
        if not path:
            continue
        for pattern in targets:
            if pattern_matches(pattern, path, module, anatomy):
                if any(pattern_matches(x, path, module, anatomy) for x in exclude):
                    break
                if not in_selected_layers(path, layers, anatomy):
                    break
                if accepts(module, anatomy.role_of.get(path)):
                    matched_by[path] = pattern
                else:
                    rejected.setdefault(pattern, []).append(f"{path} ({type(module).__name__})")
                break

    used = set(matched_by.values())
    unmatched = [p for p in targets if p not in used]
    if not each_must_match and not matched_by and rejected:
        raise TargetError(f"{what} found nothing to adapt in this model with its default targets: it adapts {adapts}")
    if each_must_match or not matched_by:
        for pattern in unmatched if each_must_match else targets:
            if pattern in rejected:
                examples = ", ".join(rejected[pattern][:3])
                raise TargetError(
                    f"target {pattern!r} matched only modules {what} cannot adapt: {examples}. "
                    f"It adapts {adapts}."
                )
            limits = []
            if exclude:
                limits.append(f"exclude={list(exclude)}")
            if layers is not None:
                limits.append(f"layers={layers!r}")
            scope = f" (with {', '.join(limits)})" if limits else ""
            raise TargetError(f"target {pattern!r} matched no module{scope}. {suggest(pattern, model, anatomy)}")
    return Selection(paths=tuple(matched_by), matched_by=matched_by, anatomy=anatomy)


def lookup(
    patterns: Mapping[str, T], path: str, module: nn.Module, anatomy: Anatomy, default: T
) -> T:
    """Per-module option: the value of the first pattern in ``patterns`` matching ``path``."""
    for pattern, value in patterns.items():
        if pattern_matches(pattern, path, module, anatomy):
            return value
    return default
