"""deltatune: parameter-efficient fine-tuning for any transformer, one composable core."""

from importlib.metadata import PackageNotFoundError, version

from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .analysis.advise import advise
from .analysis.compare import compare_training
from .analysis.memory import estimate_memory
from .analysis.subspace import amplification_factor, subspace_similarity
from .api import (
    activate,
    active_block,
    adapter_drop,
    attach,
    calibrate,
    count_parameters,
    deactivate,
    delete,
    deltas,
    detach,
    disabled,
    fold,
    merge,
    merge_and_detach,
    route,
    trainable_parameters,
    unmerge,
)
from .combine import combine
from .composition import Average, BatchSplit, Block, Fuse, Parallel, Stack
from .config import DeltaConfig, config, methods
from .heads import TaskHead
from .errors import CheckpointError, ConfigError, DataError, DeltatuneError, ModelLoadError, TargetError
from .io import load, save
from .methods.adapters import HoulsbyConfig, ParallelAdapterConfig, PfeifferConfig
from .methods.compacter import CompacterConfig, CompacterPlusPlusConfig
from .methods.far import FARConfig
from .methods.fusion import FusionConfig
from .methods.ia3 import IA3Config
from .methods.krona import KronAConfig, KronAResConfig
from .methods.hybrids import MAMConfig, UniPELTConfig
from .methods.hyper import HyperFormerConfig, add_task, materialize, set_task, task_route
from .methods.lora import LoRAConfig
from .methods.prefix import LlamaAdapterConfig, PrefixTuningConfig
from .methods.prompt import PromptTuningConfig, PTuningConfig
from .methods.selective import BitFitConfig, LNTuningConfig, TopLayersConfig
from .methods.sparse_adapter import SparseAdapterConfig
from .quant import merge_and_requantize, prepare_for_kbit_training, quantize, quantized_storage
from .report import compare, plan, summary

try:
    __version__ = version("deltatune")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

__all__ = [
    "merge_and_requantize",
    "prepare_for_kbit_training",
    "quantize",
    "quantized_storage",
    "Average",
    "BatchSplit",
    "BitFitConfig",
    "Block",
    "CheckpointError",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "ConfigError",
    "DataError",
    "DeltaConfig",
    "DeltatuneError",
    "FARConfig",
    "Fuse",
    "FusionConfig",
    "HoulsbyConfig",
    "HyperFormerConfig",
    "IA3Config",
    "KronAConfig",
    "KronAResConfig",
    "LNTuningConfig",
    "LlamaAdapterConfig",
    "LoRAConfig",
    "MAMConfig",
    "ModelLoadError",
    "Parallel",
    "ParallelAdapterConfig",
    "PfeifferConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "PTuningConfig",
    "SparseAdapterConfig",
    "Stack",
    "TargetError",
    "TaskHead",
    "TopLayersConfig",
    "UniPELTConfig",
    "activate",
    "active_block",
    "adapter_drop",
    "add_task",
    "advise",
    "amplification_factor",
    "attach",
    "calibrate",
    "combine",
    "compare",
    "compare_training",
    "config",
    "count_parameters",
    "deactivate",
    "delete",
    "deltas",
    "detach",
    "disabled",
    "estimate_memory",
    "fold",
    "load",
    "materialize",
    "merge",
    "merge_and_detach",
    "methods",
    "plan",
    "route",
    "save",
    "set_task",
    "subspace_similarity",
    "summary",
    "task_route",
    "trainable_parameters",
    "unmerge",
]
