"""Find the transformer roles (attention projections, feed-forward layers, norms...) in any model.

There is no per-architecture code here.  :func:`analyze` works in three steps:

1. **Stacks.**  The repeated transformer blocks are the ``ModuleList`` / ``Sequential``
   containers whose elements are all composite modules of one class and hold parameters.
   Stacks are searched top-down and never inside one another, so an encoder-decoder yields
   two stacks (encoder and decoder) and a block's inner lists are not mistaken for stacks.
2. **Roles.**  Every linear-like leaf inside a block (``nn.Linear`` and subclasses, and
   GPT-2's ``Conv1D``) is matched against :data:`ROLE_ALIASES`, a small ordered table of
   glob patterns over its dotted path; the first match wins.  Norms are recognised by
   class name, the embedding and the output head by asking the model.
3. **Shape check.**  Where the model's config states the hidden size, a projection that
   should read the residual stream (q/k/v/qkv, ffn up/gate) must have that many input
   features, and one that writes it (attention output, ffn down) that many output
   features.  A module failing the check gets no role, so a wrong alias cannot silently
   mislabel a layer.

Cross-attention projections (T5 ``EncDecAttention``, BART ``encoder_attn``) get the same
``attn.*`` roles as self-attention: they are attention projections of the same shapes, and
methods that target "attention" are meant to adapt them too.

Delta wrappers (any module whose class sets ``is_delta_layer = True`` and keeps the
original module at ``.base``) are seen through everywhere, so attaching deltas changes
neither the paths nor the roles.  Unknown models never make :func:`analyze` fail; they
just get fewer roles, and users target modules by name instead.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterator, Mapping

from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from .errors import ConfigError


def check_model(what: str, model: object) -> None:
    """A clear error for a model argument that is not a module (a path, a name, a config)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{what} needs the model as a torch.nn.Module, got {type(model).__name__} {model!r:.60}")

ROLES: tuple[str, ...] = (
    "embed", "head", "block", "norm",
    "attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv",
    "ffn.up", "ffn.gate", "ffn.down",
)

ROLE_GROUPS: dict[str, tuple[str, ...]] = {
    group: tuple(role for role in ROLES if role.startswith(group + "."))
    for group in ("attn", "ffn")
}

# (role, glob patterns over the dotted module path), for linear-like leaves inside blocks.
# Order matters: the first matching row wins, so the specific BERT attention output
# (``attention.output.dense``) comes before the generic FFN ``output.dense``.
# Architectures in comments are examples that need the alias, not an exhaustive list.
ROLE_ALIASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attn.qkv", (
        "*.c_attn",            # GPT-2
        "*.query_key_value",   # GPT-NeoX, BLOOM, Falcon
        "*.qkv_proj",          # Phi-3
        "*.Wqkv",              # MPT
        "*attn.qkv",           # ViT-style fused attention
    )),
    ("attn.q", ("*.q_proj", "*.query", "*.q_lin", "*Attention.q")),   # T5: SelfAttention.q
    ("attn.k", ("*.k_proj", "*.key", "*.k_lin", "*Attention.k")),
    ("attn.v", ("*.v_proj", "*.value", "*.v_lin", "*Attention.v")),
    ("attn.o", (
        "*.o_proj",                  # Llama family
        "*attn.out_proj",            # OPT, BART (self_attn and encoder_attn), CLIP
        "*attention.output.dense",   # BERT, RoBERTa
        "*attn.c_proj",              # GPT-2
        "*attention.dense",          # GPT-NeoX attention.dense, BLOOM/Falcon self_attention.dense
        "*attn.dense",               # Phi self_attn.dense
        "*attention.out_lin",        # DistilBERT
        "*Attention.o",              # T5 SelfAttention.o / EncDecAttention.o
    )),
    ("ffn.gate", ("*.gate_proj", "*.wi_0")),
    ("ffn.up", (
        "*.up_proj", "*.fc1", "*.c_fc", "*.dense_h_to_4h", "*intermediate.dense",
        "*.lin1", "*.wi", "*.wi_1",
    )),
    ("ffn.down", (
        "*.down_proj", "*.fc2", "*mlp.c_proj", "*.dense_4h_to_h",
        "*output.dense",             # BERT's FFN output (its attention output matched above)
        "*.lin2", "*.wo",
    )),
)

# Roles whose layer reads the residual stream (in_features == hidden size) ...
_READS_HIDDEN = frozenset({"attn.q", "attn.k", "attn.v", "attn.qkv", "ffn.up", "ffn.gate"})
# ... and whose layer writes it (out_features == hidden size).
_WRITES_HIDDEN = frozenset({"attn.o", "ffn.down"})

# Config attribute names that hold the residual-stream width, across model families.
_HIDDEN_SIZE_FIELDS = ("hidden_size", "d_model", "n_embd", "dim")


def unwrap(module: nn.Module) -> nn.Module:
    """The original module behind any delta wrappers around ``module``."""
    while getattr(module, "is_delta_layer", False):
        module = module.base
    return module


def iter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Like ``model.named_modules()``, but seeing through delta wrappers.

    A wrapper is reported as its base module, at the wrapper's path, and the walk goes on
    into the base's children rather than the wrapper's, so every path is the same as it
    was before deltas were attached.  As in ``named_modules``, a module reachable under
    several paths is reported once, at the first.
    """
    seen: set[int] = set()

    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        module = unwrap(module)
        if id(module) in seen:
            return
        seen.add(id(module))
        yield prefix, module
        for name, child in module.named_children():
            if child is not None:
                yield from walk(f"{prefix}.{name}" if prefix else name, child)

    yield from walk("", model)


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``module`` (or the base behind its delta wrappers) is a Linear or a Conv1D."""
    return isinstance(unwrap(module), (nn.Linear, Conv1D))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear or GPT-2 ``Conv1D`` (weight stored as (in, out))."""
    module = unwrap(module)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return in_features, out_features
    raise TypeError(f"{type(module).__name__} is not a linear-like module")


@dataclass(frozen=True)
class Anatomy:
    """Where the transformer parts of one model are.

    Attributes:
        stacks: dotted paths of the containers of repeated blocks, in model order
            (``"model.layers"``; an encoder-decoder has an encoder and a decoder stack).
        role_of: module path -> role, for every module that has one.
        layer_of: module path -> index of its block within its stack, for every module
            inside a block, the block itself included.
        num_layers: stack path -> number of blocks.
        head: path of the output head (``model.get_output_embeddings()``), or None.
    """

    stacks: tuple[str, ...]
    role_of: Mapping[str, str]
    layer_of: Mapping[str, int]
    num_layers: Mapping[str, int]
    head: str | None

    def paths_with_role(self, role_or_group: str) -> list[str]:
        """Paths of the modules with a role, or with any role of a group (``"attn"``), in model order."""
        if role_or_group in ROLE_GROUPS:
            wanted = set(ROLE_GROUPS[role_or_group])
        elif role_or_group in ROLES:
            wanted = {role_or_group}
        else:
            known = ", ".join((*ROLES, *ROLE_GROUPS))
            raise ValueError(f"unknown role {role_or_group!r}; known roles and groups: {known}")
        return [path for path, role in self.role_of.items() if role in wanted]

    def describe(self) -> str:
        """A short human-readable report: the stacks and how many modules have each role."""
        if self.stacks:
            stacks = ", ".join(f"{s} ({self.num_layers[s]} blocks)" for s in self.stacks)
        else:
            stacks = "none found"
        counts = Counter(self.role_of.values())
        found = "  ".join(f"{role} {counts[role]}" for role in ROLES if counts[role])
        missing = ", ".join(role for role in ROLES if not counts[role])
        lines = [f"stacks: {stacks}", f"roles:  {found or 'none found'}"]
        if missing:
            lines.append(f"absent: {missing}")
        lines.append(f"head:   {self.head or 'none'}")
        return "\n".join(lines)


def is_block_stack(module: nn.Module) -> bool:
    """Whether ``module`` is a list of repeated transformer blocks.

    The elements must be composite modules (so a Sequential of bare layers is not
    mistaken for a stack) of a single class, and hold parameters.
    """
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
        return False
    blocks = [unwrap(child) for child in module]
    return (
        len({type(block) for block in blocks}) == 1
        and all(next(block.children(), None) is not None for block in blocks)
        and next(module.parameters(), None) is not None
    )


def _hidden_sizes(model: nn.Module) -> set[int]:
    """Residual-stream widths stated by the model's config and its sub-configs (text, vision...)."""
    config = getattr(model, "config", None)
    if config is None:
        return set()
    configs = [config, *(v for v in vars(config).values() if isinstance(v, PretrainedConfig))]
    sizes = set()
    for cfg in configs:
        for field in _HIDDEN_SIZE_FIELDS:
            value = getattr(cfg, field, None)
            if isinstance(value, int) and not isinstance(value, bool):
                sizes.add(value)
                break
    return sizes


def _alias_role(path: str) -> str | None:
    """The first role whose alias patterns match ``path``."""
    for role, patterns in ROLE_ALIASES:
        if any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns):
            return role
    return None


def _fits_hidden_size(role: str, module: nn.Module, hidden_sizes: set[int]) -> bool:
    """Whether a linear layer's shape agrees with its role (always true when the width is unknown)."""
    if not hidden_sizes:
        return True
    in_features, out_features = linear_shape(module)
    if role in _READS_HIDDEN:
        return in_features in hidden_sizes
    if role in _WRITES_HIDDEN:
        return out_features in hidden_sizes
    return True


def _enclosing_block(path: str, block_index: Mapping[str, int]) -> str | None:
    """The block that ``path`` is (or lies inside), found by trying each dotted prefix."""
    parts = path.split(".")
    for end in range(1, len(parts) + 1):
        prefix = ".".join(parts[:end])
        if prefix in block_index:
            return prefix
    return None


def _model_module_path(model: nn.Module, getter: str, modules: list[tuple[str, nn.Module]]) -> str | None:
    """Path of the module returned by ``model.<getter>()`` (input/output embeddings), if any."""
    try:
        found = getattr(model, getter)()
    except (AttributeError, NotImplementedError, TypeError):
        # Plain nn.Modules lack the getter; some transformers models raise instead of returning None.
        return None
    if not isinstance(found, nn.Module):
        return None
    found = unwrap(found)
    return next((path for path, module in modules if module is found), None)


def _embedding_users(embed: str | None, modules: list[tuple[str, nn.Module]], head: str | None) -> set[str]:
    """The input-embedding modules the forward actually calls.

    Encoder-decoders (T5, BART) keep a ``shared`` embedding that only holds the weight, while
    ``encoder.embed_tokens`` and ``decoder.embed_tokens`` are separate modules tied to it and are
    the ones called; a delta on the holder would never run. So when other embeddings share the
    input embedding's weight, they carry the role instead of it.
    """
    if embed is None:
        return set()
    weight = getattr(dict(modules)[embed], "weight", None)
    sharers = {
        path for path, module in modules
        if path not in (embed, head) and isinstance(module, nn.Embedding) and module.weight is weight
    }
    return sharers or {embed}


def analyze(model: nn.Module) -> Anatomy:
    """Find the stacks of blocks and the role of every recognisable module in ``model``."""
    modules = list(iter_modules(model))
    hidden_sizes = _hidden_sizes(model)

    stacks: list[str] = []
    num_layers: dict[str, int] = {}
    block_index: dict[str, int] = {}   # block path -> its index within its stack
    for path, module in modules:
        inside_stack = any(path.startswith(stack + ".") for stack in stacks)
        # The root is never a stack: its blocks would have no dotted path to address them by.
        if path and not inside_stack and is_block_stack(module):
            stacks.append(path)
            num_layers[path] = len(module)
            for index, (name, _) in enumerate(module.named_children()):
                block_index[f"{path}.{name}"] = index

    role_of: dict[str, str] = {}
    layer_of: dict[str, int] = {}
    embed = _model_module_path(model, "get_input_embeddings", modules)
    head = _model_module_path(model, "get_output_embeddings", modules)
    embeds = _embedding_users(embed, modules, head)
    for path, module in modules:
        block = _enclosing_block(path, block_index)
        if block is not None:
            layer_of[path] = block_index[block]

        if path == head:
            role_of[path] = "head"
        elif path in embeds or (embed is None and block is None and isinstance(module, nn.Embedding)):
            role_of[path] = "embed"
        elif path == block:
            role_of[path] = "block"
        elif "Norm" in type(module).__name__ and next(module.children(), None) is None:
            role_of[path] = "norm"
        elif block is not None and is_linear_like(module):
            role = _alias_role(path)
            if role is not None and _fits_hidden_size(role, module, hidden_sizes):
                role_of[path] = role

    return Anatomy(
        stacks=tuple(stacks),
        role_of=MappingProxyType(role_of),
        layer_of=MappingProxyType(layer_of),
        num_layers=MappingProxyType(num_layers),
        head=head,
    )
