"""Reading and writing Hugging Face PEFT adapter directories, exactly.

A PEFT adapter is a directory with ``adapter_config.json`` (``peft_type`` and the method's
options) and ``adapter_model.safetensors`` (or the legacy pickled ``adapter_model.bin``, read
here only with ``torch.load(weights_only=True)``). Keys of module-level methods are
``base_model.model.<module path>.<PEFT parameter name>``; prompt-learning methods store a few
un-prefixed tensors (``prompt_embeddings``).

The mapping between checkpoint keys and deltatune tensors is built from the model's structure,
never by editing strings: each converter lists, for every module of the model it could adapt,
the keys PEFT would write there and the deltatune tensor each one is. That table is a bijection
(a key that two modules could claim is an error), so a module whose name contains ``weight``,
``lora`` or an adapter's name round-trips like any other. A key the table does not hold is an
error naming it.

Config fields are sorted into three kinds by each converter: those it translates, those that
only matter when training starts (initialisation schemes, which the saved weights make moot),
and those that would change the numerics: a value deltatune cannot honour there is an error
naming the field. Fields nobody knows (a newer PEFT's) are ignored with a :class:`PeftFormatNote`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..anatomy import ROLE_GROUPS, ROLES, iter_modules
from ..api import deltas
from ..config import DeltaConfig, did_you_mean
from ..errors import CheckpointError
from ..outputs import write_atomically, write_text_atomically

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"
#: where PEFT's wrappers put the user's model: PeftModel.base_model (the tuner) .model
KEY_PREFIX = "base_model.model."
#: fields every PEFT config has that describe the file, not the computation
METADATA_FIELDS = frozenset({
    "peft_type", "peft_version", "task_type", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping",
})


class PeftFormatNote(UserWarning):
    """Something in a PEFT checkpoint that deltatune ignores because it cannot change the outputs."""


@dataclass
class Imported:
    """A PEFT adapter translated: the config and, per module path, the delta's saved state."""

    config: DeltaConfig
    states: dict[str, dict[str, Tensor]]
    notes: list[str] = field(default_factory=list)


@dataclass
class Exported:
    """A deltatune delta translated: PEFT's config fields and its checkpoint tensors."""

    config: dict[str, Any]
    tensors: dict[str, Tensor]


class KeyTable:
    """The bijection between checkpoint keys and (module path, deltatune tensor name)."""

    def __init__(self) -> None:
        self.by_key: dict[str, tuple[str, str]] = {}

    def add(self, key: str, path: str, tensor: str) -> None:
        previous = self.by_key.setdefault(key, (path, tensor))
        if previous != (path, tensor):
            raise CheckpointError(
                f"checkpoint key {key!r} is ambiguous in this model: it names both {previous[1]} of "
                f"{previous[0]!r} and {tensor} of {path!r}"
            )

    def split(self, tensors: dict[str, Tensor], prefix: str = KEY_PREFIX) -> dict[str, dict[str, Tensor]]:
        """Group checkpoint tensors by module path, under their deltatune names."""
        grouped: dict[str, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            entry = self.by_key.get(key.removeprefix(prefix))
            if entry is None:
                raise CheckpointError(f"checkpoint key {key!r} matches nothing this model could hold.{_closest(key, self)}")
            path, name = entry
            grouped.setdefault(path, {})[name] = value
        return grouped


def _closest(key: str, table: KeyTable) -> str:
    return did_you_mean(key.removeprefix(KEY_PREFIX), list(table.by_key))


class Converter:
    """Translates one PEFT method both ways. Subclasses fill in the class fields and methods."""

    peft_type: ClassVar[str] = ""
    #: deltatune methods this converter writes
    methods: ClassVar[tuple[str, ...]] = ()
    #: fields the converter reads
    translated: ClassVar[frozenset[str]] = frozenset()
    #: fields that only shape initialisation or training, never a loaded adapter's outputs
    training_only: ClassVar[frozenset[str]] = frozenset()
    #: field -> the values deltatune can honour (any other value is an error naming the field)
    honoured_values: ClassVar[dict[str, tuple]] = {}

    def read(self, model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]) -> Imported:
        raise NotImplementedError

    def write(self, model: nn.Module, name: str) -> Exported:
        raise NotImplementedError

    def check_fields(self, config: dict[str, Any], where: str) -> list[str]:
        """Raise on a numerics-changing value deltatune cannot honour; return notes for unknown fields."""
        for key, allowed in self.honoured_values.items():
            if key in config and config[key] not in allowed:
                raise CheckpointError(
                    f"{where}: {key}={config[key]!r} changes the adapter's outputs in a way deltatune does not "
                    f"implement; supported: {', '.join(repr(v) for v in allowed)}"
                )
        known = METADATA_FIELDS | self.translated | self.training_only | set(self.honoured_values)
        unknown = sorted(set(config) - known)
        return [f"{where}: ignoring unknown field(s) {', '.join(unknown)}"] if unknown else []


CONVERTERS: dict[str, Converter] = {}


def register(converter: type[Converter]) -> type[Converter]:
    CONVERTERS[converter.peft_type] = converter()
    return converter


def exporter_for(method: str) -> Converter:
    for converter in CONVERTERS.values():
        if method in converter.methods:
            return converter
    writable = sorted(m for c in CONVERTERS.values() for m in c.methods)
    raise CheckpointError(
        f"method {method!r} has no equivalent in PEFT's format; it can be written for: {', '.join(writable)}. "
        "Save it in deltatune's format instead"
    )


# names in PEFT's target lists ---------------------------------------------------------------------


def peft_name_pattern(name: str) -> str:
    """A deltatune pattern selecting what a PEFT ``target_modules`` list entry selects: the
    module of that name or any module whose path ends in ``.<name>``."""
    if name in ROLES or name in ROLE_GROUPS or name == "all-linear" or name.startswith("re:") or any(c in name for c in "*?["):
        return f"re:(?:.*\\.)?{re.escape(name)}"
    return name


def peft_targets(value: Any) -> tuple[str, ...] | None:
    """PEFT's ``target_modules`` (a list of names, a regex string matched in full, or
    'all-linear') as deltatune patterns."""
    if value is None:
        return None
    if isinstance(value, str):
        return ("all-linear",) if value == "all-linear" else (f"re:{value}",)
    return tuple(peft_name_pattern(str(v)) for v in value)


def peft_selects(value: Any, path: str) -> bool:
    """Whether PEFT's module selection ``value`` (a list of names, or a regex matched in full)
    selects ``path``."""
    if not value:
        return False
    if isinstance(value, str):
        return re.fullmatch(value, path) is not None
    return any(path == n or path.endswith("." + n) for n in value)


def peft_pattern_key(patterns: dict[str, Any], path: str) -> str | None:
    """The key of PEFT's ``rank_pattern``/``alpha_pattern`` that applies to ``path`` (PEFT's rule:
    the first key matching a dotted suffix of the path as a regex)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


def exact_names(paths: list[str], candidates: list[str]) -> list[str] | str:
    """The shortest PEFT ``target_modules`` value selecting exactly ``paths`` among
    ``candidates`` (every module of the kinds the method adapts): leaf names when they do, else
    a regex alternation of the full paths (PEFT matches a string in full)."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    selected = {c for c in candidates if c.rsplit(".", 1)[-1] in leaves}
    if selected == set(paths):
        return leaves
    return "(" + "|".join(re.escape(p) for p in paths) + ")"


def task_type(model: nn.Module) -> str | None:
    """PEFT's task type for a transformers model class (which PeftModel subclass to build)."""
    name = type(model).__name__
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
        ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"), ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
    ):
        if name.endswith(suffix):
            return task
    return None


def base_model_path(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


# directories --------------------------------------------------------------------------------------


def is_peft_directory(path: str | Path) -> bool:
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        return False
    try:
        return "peft_type" in json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc


def peft_directories(path: str | Path) -> list[Path]:
    """PEFT adapters under ``path``: itself, or its sub-directories (PEFT saves every adapter but
    'default' in a sub-directory of its name)."""
    root = Path(path)
    if is_peft_directory(root):
        return [root]
    return sorted(p.parent for p in root.glob(f"*/{CONFIG_FILE}") if is_peft_directory(p.parent))


def read_tensors(directory: Path) -> dict[str, Tensor]:
    """The adapter's tensors: safetensors, or the legacy pickle read with ``weights_only`` (plain
    tensors only, no code runs)."""
    if (directory / WEIGHTS_FILE).is_file():
        try:
            return load_file(str(directory / WEIGHTS_FILE))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{directory / WEIGHTS_FILE} cannot be read as safetensors ({exc}); it is damaged or truncated") from None
    legacy = directory / LEGACY_WEIGHTS_FILE
    if legacy.is_file():
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses anything but tensors and plain containers
            raise CheckpointError(f"{legacy} cannot be read as plain tensors (weights_only=True): {exc}") from exc
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(f"{legacy} does not hold a mapping of names to tensors")
        return state
    raise CheckpointError(f"{directory} has {CONFIG_FILE} but neither {WEIGHTS_FILE} nor {LEGACY_WEIGHTS_FILE}")


def read(model: nn.Module, directory: str | Path) -> Imported:
    """Translate the PEFT adapter in ``directory`` for ``model`` (nothing is attached)."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    peft_type = config.get("peft_type")
    converter = CONVERTERS.get(peft_type)
    if converter is None:
        raise CheckpointError(
            f"{directory}: peft_type {peft_type!r} has no deltatune equivalent; readable types: "
            f"{', '.join(sorted(CONVERTERS))}"
        )
    notes = converter.check_fields(config, str(directory / CONFIG_FILE))
    imported = converter.read(model, config, read_tensors(directory))
    imported.notes[:0] = notes
    return imported


def save(model: nn.Module, path: str | Path, name: str) -> Path:
    """Write the delta ``name`` as a PEFT adapter directory at ``path``."""
    converter = exporter_for(deltas(model)[name].config.method)
    exported = converter.write(model, name)
    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in exported.tensors.items()}
    write_atomically(target / WEIGHTS_FILE, lambda temporary: save_file(tensors, str(temporary), metadata={"format": "pt"}))
    config = {
        "peft_type": converter.peft_type,
        "task_type": task_type(model),
        "base_model_name_or_path": base_model_path(model),
        "revision": None,
        "inference_mode": True,
        **exported.config,
    }
    write_text_atomically(target / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return target


def model_modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(iter_modules(model))


from . import lora as _lora  # noqa: E402,F401  (registers the converters)
from . import prompts as _prompts  # noqa: E402,F401
