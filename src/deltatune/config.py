"""Delta configurations: frozen dataclasses validated when built, with a JSON/YAML round trip.

Each method registers its config class under its name, so ``config("lora", r=16)`` and
``LoRAConfig(r=16)`` build the same object. Field names are the CLI flag names.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from importlib import import_module
from pathlib import Path
from typing import Any, ClassVar, Hashable, Mapping, Sequence

import yaml

from .errors import ConfigError

_REGISTRY: dict[str, type["DeltaConfig"]] = {}


def register(cls: type["DeltaConfig"]) -> type["DeltaConfig"]:
    """Class decorator: make a config class reachable by its ``method`` name."""
    _REGISTRY[cls.method] = cls
    return cls


def _registry() -> dict[str, type["DeltaConfig"]]:
    """Every registered config class by method name; the built-in methods register on import."""
    import_module(".methods", __package__)
    return _REGISTRY


def registered_classes() -> list[type["DeltaConfig"]]:
    """Every registered config class, in method-name order."""
    return [_registry()[m] for m in methods()]


def methods() -> list[str]:
    """Names of every registered method."""
    return sorted(_registry())


def standalone_methods() -> list[str]:
    """The methods that train on a bare model (not, e.g., an AdapterFusion over attached adapters)."""
    return [m for m in methods() if _registry()[m].standalone]


def did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def config_class(method: str | type["DeltaConfig"]) -> type["DeltaConfig"]:
    """The config class registered for ``method`` (a name, case-insensitive, or the class)."""
    if isinstance(method, type) and issubclass(method, DeltaConfig):
        return method
    key = str(method).lower().replace("-", "_")
    if key not in _registry():
        raise ConfigError(
            f"unknown method {method!r}; available methods: {', '.join(methods())}."
            + did_you_mean(key, methods())
        )
    return _REGISTRY[key]


def config(method: str | type["DeltaConfig"], **options: Any) -> "DeltaConfig":
    """Build a validated config: ``config("lora", r=16, alpha=32, targets=["q_proj"])``."""
    cls = config_class(method)
    cls.check_option_names(options)
    return cls(**options)


@dataclasses.dataclass(frozen=True)
class DeltaConfig:
    """What every delta config has: where it goes, and how it serialises.

    ``targets`` and ``exclude`` use the one pattern language of :mod:`deltatune.targets`;
    ``layers`` limits them to some transformer blocks (``[20, 21]``, ``"top:8"``,
    ``"bottom:4"`` or a ``"start:stop"`` slice). ``targets=None`` means the method's default.
    ``modules_to_save`` (same patterns, as PEFT's field of that name) trains a full copy of
    each module it matches, in the same delta as the method's modules. ``task_head``
    (a :class:`~deltatune.heads.TaskHead`) gives the delta a new output layer for a
    classification, regression or tagging task, of the task's own width (:mod:`deltatune.heads`).
    """

    method: ClassVar[str] = ""
    #: the target spec used when ``targets`` is None; its patterns may match nothing singly
    default_targets: ClassVar[tuple[str, ...]] = ()
    #: capabilities, checked when the config is attached
    supports_merge: ClassVar[bool] = False
    #: why a method that cannot merge cannot, for the refusal (None: the error names the method only)
    merge_refusal: ClassVar[str | None] = None
    supports_mixed_batch: ClassVar[bool] = False
    #: why the method cannot train on a quantized (4-bit / 8-bit) layer; None when it can
    quantized_base_blocker: ClassVar[str | None] = None
    #: what the method adapts, in words, for "matched only modules it cannot adapt" errors
    adapts: ClassVar[str] = "Linear / Conv1D / Embedding layers"
    #: the peak learning rate ``deltatune train`` uses when none is given; methods differ by
    #: orders of magnitude (a scale vector wants ~1e-2, full copies of whole blocks ~1e-4)
    default_lr: ClassVar[float] = 2e-3
    #: False for a method that works over other attached deltas and cannot be trained alone
    standalone: ClassVar[bool] = True
    #: one delta serves every task of a multi-task run, conditioned on each sample's task (a
    #: hypernetwork); it implements the multi-task hooks below and always trains with task names
    serves_all_tasks: ClassVar[bool] = False

    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    layers: tuple[int, ...] | str | None = None
    modules_to_save: tuple[str, ...] = ()
    task_head: Any = None

    def __post_init__(self) -> None:
        from .heads import TaskHead

        object.__setattr__(self, "task_head", TaskHead.from_value(self.task_head))
        for name in ("targets", "exclude", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = tuple(p.strip() for p in value.split(",") if p.strip())
            elif isinstance(value, (list, tuple)):
                value = tuple(value)
            elif value is not None:
                raise ConfigError(f"{name} must be a pattern or a list of patterns (strings), got {value!r}")
            elif name == "modules_to_save":
                value = ()
            if value is not None and not all(isinstance(p, str) for p in value):
                raise ConfigError(f"{name} must be a pattern or a list of patterns (strings), got {list(value)!r}")
            object.__setattr__(self, name, value)
        if isinstance(self.layers, (list, tuple)):
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
                raise ConfigError(f"layers must be block indices (integers), got {list(self.layers)!r}")
            object.__setattr__(self, "layers", tuple(self.layers))
        check_field_types(self)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the bad value and the allowed ones."""
        from .targets import validate_layers, validate_pattern

        if self.targets is not None:
            if not self.targets:
                raise ConfigError("targets is empty; give at least one pattern, or None for the default")
            for pattern in self.targets:
                validate_pattern(pattern)
        for pattern in self.exclude + self.modules_to_save:
            validate_pattern(pattern)
        validate_layers(self.layers)

    @property
    def target_spec(self) -> tuple[str, ...]:
        return self.targets if self.targets is not None else self.default_targets

    @property
    def layer_spec(self) -> tuple[int, ...] | str | None:
        """The blocks targets are limited to (a method may default to some, e.g. the top L)."""
        return self.layers

    # the strategy: which modules, what delta for each, how they work together ----------------

    def accepts(self, module: Any, role: str | None = None) -> bool:
        """Whether this method can adapt ``module`` (whose anatomy role is ``role``)."""
        raise NotImplementedError

    def build(self, path: str, module: Any, options: dict[str, Any], initialize: bool = True) -> Any:
        """The :class:`~deltatune.layer.Delta` for one module. ``options`` holds the per-module
        values of :meth:`per_module_options`, the module's ``role`` and possibly a ``device``."""
        raise NotImplementedError

    def per_module_options(self) -> dict[str, dict[str, Any]]:
        """Option name -> {target pattern: value}, resolved per module into ``build``'s options
        (the first matching pattern wins; otherwise the config's field of that name, or None)."""
        return {}

    def expand(self, paths: list[str], anatomy: Any) -> list[str]:
        """The modules to adapt given the selected ones: a method may add companions (a
        parallel adapter's input tap). Not called when loading, whose paths are complete."""
        return paths

    def link(self, built: dict[str, Any], anatomy: Any) -> None:
        """Wire the deltas of one attach together, after all are built (default: nothing)."""

    def paths_from_attached(self, layers: Mapping[str, Any], paths: Sequence[str] | None) -> Sequence[str] | None:
        """The paths to adapt when they follow from the deltas already attached (``layers``:
        path -> DeltaLayer), or ``paths`` unchanged (None: match the targets). A method over
        other deltas (AdapterFusion) goes where they are."""
        return paths

    def numerics(self) -> dict[str, str]:
        """What a saved delta_config.json records of how the method computes (e.g. LoRA's
        scale rule), for readers of the file; default nothing."""
        return {}

    # deltas over other deltas -----------------------------------------------------------------

    def builds_on(self) -> tuple[str, ...]:
        """Names of the attached deltas this one works over (they load first and stay frozen
        while it trains); default none."""
        return ()

    def activation_block(self, name: str) -> Any:
        """The composition block a delta called ``name`` runs inside (it is never active on its
        own), or None for a delta that is activated by name (default)."""
        return None

    # training ---------------------------------------------------------------------------------

    @property
    def calibration_batches(self) -> int:
        """How many training batches :func:`deltatune.calibrate` shows the deltas before the
        optimizer is built (a method that decides its structure from data; a method makes it
        a field); default 0."""
        return 0

    # multi-task runs: by default one delta per task, routed by name; a method with
    # ``serves_all_tasks`` trains one delta conditioned on each sample's task instead

    def for_tasks(self, tasks: Sequence[str]) -> "DeltaConfig":
        """With ``serves_all_tasks``: this config for one delta serving ``tasks``."""
        raise NotImplementedError(f"method {self.method!r} trains one delta per task")

    def known_tasks(self) -> tuple[str, ...]:
        """With ``serves_all_tasks``: the tasks a delta of this config serves."""
        raise NotImplementedError(f"method {self.method!r} trains one delta per task")

    def add_tasks(self, model: Any, name: str, tasks: Sequence[str]) -> str:
        """With ``serves_all_tasks``: teach the attached delta ``name`` new ``tasks``, training
        only what is new for them; says what that is, for the run's log."""
        raise NotImplementedError(f"method {self.method!r} trains one delta per task")

    def task_batch(self, model: Any, name: str, tasks: Sequence[str | None]) -> Any:
        """With ``serves_all_tasks``: the context a batch runs in whose sample i is of task
        ``tasks[i]``, through the delta ``name``."""
        raise NotImplementedError(f"method {self.method!r} trains one delta per task")

    def select_task(self, model: Any, name: str, task: str) -> None:
        """With ``serves_all_tasks``: run the delta ``name`` as task ``task`` from now on."""
        raise NotImplementedError(f"method {self.method!r} trains one delta per task")

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def check_option_names(cls, options: Mapping[str, Any]) -> None:
        valid = cls.option_names()
        for key in options:
            if key not in valid:
                raise ConfigError(
                    f"unknown option {key!r} for method {cls.method!r}; valid options: "
                    f"{', '.join(valid)}." + did_you_mean(key, valid)
                )

    def replace(self, **changes: Any) -> "DeltaConfig":
        self.check_option_names(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif hasattr(value, "to_dict"):
                value = value.to_dict()
            out[f.name] = value
        return out

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "DeltaConfig":
        if "method" not in data:
            raise ConfigError(f"config has no 'method' field; available methods: {', '.join(methods())}")
        options = {k: v for k, v in data.items() if k != "method"}
        return config(data["method"], **options)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        """Write as YAML (``.yaml``/``.yml``) or JSON (anything else)."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=True))
        else:
            path.write_text(self.to_json() + "\n")

    @staticmethod
    def load(path: str | Path) -> "DeltaConfig":
        return DeltaConfig.from_dict(read_mapping(path))


def check_field_types(instance: Any) -> None:
    """Every field of a dataclass annotated ``int``, ``float``, ``bool`` or ``str`` (or one of
    them ``| None``) holds exactly that: no bool for a number, no 1.5 for a count, no string for
    a number, and floats finite. One rule for the API, YAML/JSON files and ``--set`` alike."""
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        expected, optional = _scalar_type(hints.get(field.name))
        value = getattr(instance, field.name)
        if expected is None or (optional and value is None):
            continue
        if expected is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok and not math.isfinite(value):
                raise ConfigError(f"{field.name} must be a finite number, got {value!r}")
        elif expected is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, expected)
        if not ok:
            raise ConfigError(f"{field.name} must be {_TYPE_WORDS[expected]}{' or null' if optional else ''}, got {value!r}")


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _scalar_type(annotation: Any) -> tuple[type | None, bool]:
    """(int | float | bool | str, whether None is allowed) for a simple annotation, else (None, False)."""
    if annotation in _TYPE_WORDS:
        return annotation, False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1 and members[0] in _TYPE_WORDS and len(typing.get_args(annotation)) == 2:
            return members[0], True
    return None, False


class _Yaml12Loader(yaml.SafeLoader):
    """YAML as people write it: ``1e-3`` is a number (YAML 1.1, PyYAML's default, wants ``1.0e-3``);
    a key given twice is an error (PyYAML keeps the last one without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # SafeLoader's own error names an unhashable key
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice; keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML safely (no tags that build objects), with YAML 1.2's numbers."""
    return yaml.load(text, Loader=_Yaml12Loader)


#: what a delta's trained values are stored in; "auto": fp32 on a half-precision base, else the base's dtype
PARAM_DTYPES = ("auto", "float32", "bfloat16", "float16")

#: a delta's (or task's) name: it becomes a directory name and a state-dict key
NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def master_dtype(dtype):
    """The dtype trained values keep beside a base in ``dtype``: fp32 on a half-precision base
    (stable optimizer updates), else the base's own."""
    import torch

    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def param_dtype(choice: str, base_dtype):
    """A config's ``param_dtype`` (one of :data:`PARAM_DTYPES`) for a layer whose base is in ``base_dtype``."""
    import torch

    return master_dtype(base_dtype) if choice == "auto" else getattr(torch, choice)


def check_name(what: str, value: object) -> None:
    """Raise ConfigError unless ``value`` is a name (:data:`NAME`)."""
    if not isinstance(value, str) or not NAME.match(value):
        raise ConfigError(f"{what} must be letters, digits, '_' or '-', got {value!r}")


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise ConfigError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not valid; allowed: {', '.join(map(str, allowed))}")


def check_positive_int(name: str, value: object, what: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer{f' ({what})' if what else ''}, got {value!r}")


def check_number(name: str, value: object, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a real number in the given (closed or open) range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "(-inf" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "inf)" if high is None else f"{high}{')' if high_open else ']'}"
        raise ConfigError(f"{name} must be a finite number in {lo}, {hi}, got {value!r}")


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML file holding one mapping, with an error naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; give the YAML or JSON file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{str(path)!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        if path.suffix.lower() not in (".yaml", ".yml", ".json"):
            raise ConfigError(f"config file {str(path)!r}: unknown format {path.suffix or '(no suffix)'!r}; "
                              "use .yaml, .yml or .json")
        data = load_yaml(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:  # the parser's message says where
        raise ConfigError(f"cannot parse {str(path)!r}: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r} must hold a mapping of option names to values, got {type(data).__name__}")
    return data
