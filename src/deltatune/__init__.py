"""deltatune: parameter-efficient fine-tuning for any transformer, one composable core.

Names are imported on first use (PEP 562), so ``import deltatune`` and the CLI's start are
cheap and torch loads only when something needs it. Every registered method's config class is
public under its own name (``dt.LoRAConfig``): the registry, not a list here, says which exist.
"""

import sys
import types
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deltatune")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

#: public name -> the module under deltatune that defines it (method config classes come from the registry)
_DEFINED_IN = {
    **dict.fromkeys(["advise"], "analysis.advise"),
    **dict.fromkeys(["compare_training"], "analysis.compare"),
    **dict.fromkeys(["estimate_memory"], "analysis.memory"),
    **dict.fromkeys(["amplification_factor", "subspace_similarity"], "analysis.subspace"),
    **dict.fromkeys([
        "activate", "active_block", "adapter_drop", "attach", "calibrate", "consistency_weight", "count_parameters", "deactivate",
        "delete", "deltas", "detach", "disabled", "fold", "merge", "merge_and_detach", "route",
        "trainable_parameters", "training_penalty", "unmerge",
    ], "api"),
    **dict.fromkeys(["combine"], "combine"),
    **dict.fromkeys(["Average", "BatchSplit", "Block", "Fuse", "Parallel", "Stack"], "composition"),
    **dict.fromkeys(["DeltaConfig", "config", "methods"], "config"),
    **dict.fromkeys(["TaskHead"], "heads"),
    **dict.fromkeys(
        ["CheckpointError", "ConfigError", "DataError", "DeltatuneError", "ModelLoadError", "TargetError"], "errors"),
    **dict.fromkeys(["load", "save"], "io"),
    **dict.fromkeys(["add_task", "materialize", "set_task", "task_route"], "methods.hyper"),
    **dict.fromkeys(["merge_and_requantize", "prepare_for_kbit_training", "quantize", "quantized_storage"], "quant"),
    **dict.fromkeys(["compare", "plan", "summary"], "report"),
}


def _config_classes() -> dict[str, type]:
    from .config import registered_classes

    return {cls.__name__: cls for cls in registered_classes()}


def __getattr__(name: str):
    if name == "__all__":
        value = sorted([*_DEFINED_IN, *_config_classes()])
    elif name in _DEFINED_IN:
        value = getattr(import_module(f".{_DEFINED_IN[name]}", __name__), name)
    else:
        classes = _config_classes() if not name.startswith("__") else {}
        if name not in classes:
            raise AttributeError(f"module 'deltatune' has no attribute {name!r}")
        value = classes[name]
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__getattr__("__all__")])


class _Package(types.ModuleType):
    """Importing a submodule binds it on its package; ``config``, ``combine`` and ``methods`` are
    both submodules and public functions, and the function is the public name."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and name in _DEFINED_IN:
            return  # the submodule stays reachable as sys.modules["deltatune.<name>"]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
