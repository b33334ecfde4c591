"""Ladder Side-Tuning: a small side network beside a frozen backbone that runs without autograd.

LST (Sung, Cho & Bansal, 2022, "LST: Ladder Side-Tuning for Parameter and Memory Efficient
Transfer Learning"). With the backbone's blocks f₁..f_L, their outputs h₁..h_L and the first
block's input h₀ (the embeddings), the side network g₁..g_L — the backbone's own blocks at width
1/r — reads the backbone through ladders (down-projections Dᵢ: d → d/r) with learned gates:

    s₀ = D₀ h₀
    sᵢ = μᵢ · gᵢ(sᵢ₋₁) + (1 − μᵢ) · Dᵢ hᵢ,     μᵢ = σ(αᵢ / T),  αᵢ = 0 at init, T = ``temperature``
    y  = h_out + U s_L,                         U: d/r → d, U = 0 at init

where h_out is what the module holding the blocks returns (after its final norm, where it has
one) and y replaces it, so the model's own head reads the combination. Because U starts at
zero the model's output is unchanged at init. Side-layer dropping (``drop_layers``): a dropped
layer i has neither gᵢ nor its ladder, sᵢ = sᵢ₋₁.

The backbone runs under ``torch.no_grad``: nothing inside it is kept for backward. What
backward keeps from it are only the ladders' inputs h₀..h_L (each Dᵢ needs its input for its
weight's gradient); its attention scores, FFN activations and norms' inputs are never saved.

Initialisation by structured pruning of the backbone (the paper's): each gᵢ is a deep copy of
block i with the residual stream cut to the d/r dimensions of largest weight norm (one choice
for all blocks, summed over every projection reading or writing the stream), the feed-forward
units to the f/r of largest norm (up/gate rows and down columns), and the attention to the key/
value heads of largest norm (⌈kv/r⌉ of them, with every query head of their groups, so a
grouped-query block keeps its group size and head width, and rotary embeddings still fit).
Dᵢ starts as the selection of the kept dimensions, so the side network starts as a pruned
backbone reading the backbone's own (pruned) states.

The blocks are called with the same arguments the backbone's blocks were called with (masks,
position embeddings), so no architecture's forward is copied; the side network keeps its own
KV cache beside the backbone's for generation. Generic pruning needs separate q, k, v
projections and one stack of blocks: fused qkv projections (GPT-2, GPT-NeoX, BLOOM, Falcon),
encoder-decoders (two stacks) and parameters the pruning does not understand (T5's relative
position bias) are refused with the reason. Not mergeable: the side network is a second model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import weakref
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..anatomy import is_block_stack
from ..backends import backend_for, layer_backend
from ..config import DeltaConfig, PARAM_DTYPES, check_choice, check_number, param_dtype, register
from ..errors import ConfigError, TargetError
from ..layer import Delta, RowSelector, base_of, delta_layers
from ..upstream import CACHE_ARGUMENTS

#: attributes holding an attention module's head width
HEAD_DIM_ATTRIBUTES = ("head_dim", "attention_head_size", "key_value_proj_dim")
#: attributes holding its number of query heads, of key/value heads, and of query units
QUERY_HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_heads", "n_head")
KV_HEAD_ATTRIBUTES = ("num_key_value_heads",)
QUERY_WIDTH_ATTRIBUTES = ("all_head_size",)


def gate(alpha: Tensor, temperature: float) -> Tensor:
    """μ = σ(α / T)."""
    return torch.sigmoid(alpha / temperature)


def ladder_step(mu: Tensor, side_out: Tensor, down_projected: Tensor) -> Tensor:
    """sᵢ = μᵢ · gᵢ(sᵢ₋₁) + (1 − μᵢ) · Dᵢ hᵢ."""
    return mu * side_out + (1 - mu) * down_projected


@register
@dataclasses.dataclass(frozen=True)
class LSTConfig(DeltaConfig):
    """Ladder Side-Tuning (module docstring): ``reduction`` r (side width d/r), ``temperature``
    T of the gates, ``drop_layers`` (block indices without a side block), ``param_dtype``."""

    method: ClassVar[str] = "lst"
    adapts: ClassVar[str] = "the module that holds the transformer blocks (e.g. `model` in Llama, `bert.encoder`)"
    # every module is looked at; `accepts` keeps the one holding the blocks
    default_targets: ClassVar[tuple[str, ...]] = ("re:.+",)
    supports_mixed_batch: ClassVar[bool] = True
    quantized_base_blocker: ClassVar[str | None] = (
        "its side network is pruned from the backbone's weights, which a quantized layer does not hold as a matrix"
    )
    merge_refusal: ClassVar[str | None] = (
        "its side network is a second, smaller model run beside the backbone; no change of the backbone's weights "
        "equals it"
    )
    default_lr: ClassVar[float] = 3e-3

    reduction: int = 8
    temperature: float = 0.1
    drop_layers: tuple[int, ...] = ()
    param_dtype: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.drop_layers, list):
            object.__setattr__(self, "drop_layers", tuple(self.drop_layers))
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.reduction, int) or isinstance(self.reduction, bool) or self.reduction < 1:
            raise ConfigError(f"reduction must be an integer >= 1 (the side network's width is d / reduction), "
                              f"got {self.reduction!r}")
        check_number("temperature", self.temperature, low=0, low_open=True)
        check_choice("param_dtype", self.param_dtype, PARAM_DTYPES)
        if not isinstance(self.drop_layers, tuple) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.drop_layers):
            raise ConfigError(f"drop_layers must be a list of block indices (integers >= 0), got {self.drop_layers!r}")
        if self.layers is not None:
            raise ConfigError(f"layers={self.layers!r} does not apply to lst: its side network follows every block; "
                              "leave blocks out with drop_layers=[...]")

    def accepts(self, module: nn.Module, role: str | None = None) -> bool:
        return any(is_block_stack(child) for child in base_of(module).children())

    def expand(self, paths: list[str], anatomy) -> list[str]:
        if len(anatomy.stacks) != 1 or len(paths) != 1:
            raise TargetError(
                f"lst is not supported on this model: its side network follows one stack of blocks, and this model "
                f"has {len(anatomy.stacks)} ({', '.join(anatomy.stacks) or 'none'}; an encoder-decoder has two)"
            )
        fused = anatomy.paths_with_role("attn.qkv")
        if fused:
            raise TargetError(
                f"lst is not supported on this model: it prunes whole attention heads from separate q, k, v "
                f"projections, and {fused[0]} is one fused qkv projection whose head layout is the model's own"
            )
        return paths

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> "LSTDelta":
        anatomy = options["anatomy"]
        (stack,) = anatomy.stacks
        prefix = f"{path}." if path else ""
        if not stack.startswith(prefix) or "." in stack[len(prefix):]:
            raise TargetError(f"lst goes on the module holding the blocks ({stack.rpartition('.')[0] or 'the root'}), "
                              f"not {path!r}")
        body = base_of(module)
        blocks = body.get_submodule(stack[len(prefix):])
        if delta_layers(blocks):
            raise ConfigError("attach lst before other deltas on this model's blocks: its side network is copied "
                              "from the backbone's own blocks")
        bad = [i for i in self.drop_layers if i >= len(blocks)]
        if bad:
            raise ConfigError(f"drop_layers holds {bad[0]}, but the model has {len(blocks)} blocks (0..{len(blocks) - 1})")
        quantized = next((name for name, m in blocks.named_modules()
                          if (b := backend_for(m)) is not None and b.quantized), None)
        if quantized is not None:
            raise ConfigError(f"method 'lst' is not supported on a quantized base ({stack}.{quantized} is "
                              f"{backend_for(blocks.get_submodule(quantized)).kind}): {self.quantized_base_blocker}")
        roles = {p[len(stack) + 1:]: r for p, r in anatomy.role_of.items() if p.startswith(stack + ".")}
        plan = PruningPlan.of(blocks, roles, self.reduction)
        first = next(body.parameters())
        dtype = param_dtype(self.param_dtype, layer_backend(body).dtype)
        device = options.get("device") or first.device
        return LSTDelta(self, stack[len(prefix):], blocks, plan, dtype, device)

    def numerics(self) -> dict[str, str]:
        return {"side": "s_i = sigmoid(alpha_i/T)*g_i(s_{i-1}) + (1-sigmoid(alpha_i/T))*D_i h_i; y = h + U s_L"}


@dataclasses.dataclass
class PruningPlan:
    """Which units of the backbone the side network keeps: residual dimensions (one choice for all
    blocks), and per block its feed-forward units and key/value heads (with their query heads)."""

    width: int
    residual: Tensor
    ffn: list[Tensor]
    kv_heads: list[Tensor]
    head_dim: int
    heads: int
    groups: int
    roles: dict[str, str]

    @staticmethod
    def of(blocks: nn.Module, roles: dict[str, str], reduction: int) -> "PruningPlan":
        """Choose the kept units by weight norms (every block's linear layers need a role)."""
        per_block: list[dict[str, nn.Linear]] = []
        for i, block in enumerate(blocks):
            found: dict[str, nn.Linear] = {}
            for name, child in block.named_modules():
                if not name or child is block:
                    continue
                role = roles.get(f"{i}.{name}")
                if isinstance(child, nn.Linear):
                    if role is None or role == "attn.qkv":
                        raise TargetError(f"lst is not supported on this model: it cannot tell what block {i}'s "
                                          f"linear layer {name!r} computes, so it cannot prune it")
                    if role in found:
                        raise TargetError(f"lst is not supported on this model: block {i} has two {role} layers "
                                          f"({found[role]} and {name}; cross-attention?), one side block cannot mirror both")
                    found[role] = name
                elif next(child.parameters(recurse=False), None) is not None and not _is_norm_like(child):
                    raise TargetError(f"lst is not supported on this model: block {i}'s {name} "
                                      f"({type(child).__name__}) holds parameters its pruning does not understand")
            missing = {"attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down"} - set(found)
            if missing:
                raise TargetError(f"lst is not supported on this model: block {i} has no {', '.join(sorted(missing))} "
                                  "layer it recognises")
            per_block.append({role: block.get_submodule(name) for role, name in found.items()})
        first = per_block[0]
        width = first["attn.q"].in_features
        attention = _attention_of(blocks[0], roles_to_names(roles, 0))
        head_dim = next((getattr(attention, a) for a in HEAD_DIM_ATTRIBUTES
                         if isinstance(getattr(attention, a, None), int)), None)
        if head_dim is None:
            raise TargetError(f"lst is not supported on this model: its attention ({type(attention).__name__}) names "
                              f"its head width none of {', '.join(HEAD_DIM_ATTRIBUTES)}")
        heads, kv = first["attn.q"].out_features // head_dim, first["attn.k"].out_features // head_dim
        groups = heads // kv
        with torch.no_grad():
            residual_score = torch.zeros(width, device=first["attn.q"].weight.device)
            for layers in per_block:
                for role, layer in layers.items():
                    w = layer.weight.float()
                    residual_score += (w.square().sum(0) if role.startswith(("attn.q", "attn.k", "attn.v", "ffn.up", "ffn.gate"))
                                       else w.square().sum(1))
            residual = _top(residual_score, _reduced(width, reduction))
            ffn, kv_heads = [], []
            for layers in per_block:
                units = layers["ffn.down"].weight.float().square().sum(0) + layers["ffn.up"].weight.float().square().sum(1)
                if "ffn.gate" in layers:
                    units = units + layers["ffn.gate"].weight.float().square().sum(1)
                ffn.append(_top(units, _reduced(units.numel(), reduction)))
                per_kv = (layers["attn.k"].weight.float().square().sum(1) + layers["attn.v"].weight.float().square().sum(1)
                          ).view(kv, head_dim).sum(1)
                per_q = (layers["attn.q"].weight.float().square().sum(1) + layers["attn.o"].weight.float().square().sum(0)
                         ).view(kv, groups * head_dim).sum(1)
                kv_heads.append(_top(per_kv + per_q, _reduced(kv, reduction)))
        return PruningPlan(width, residual, ffn, kv_heads, head_dim, heads, groups, roles)

    @property
    def side_width(self) -> int:
        return self.residual.numel()

    def pruned_block(self, block: nn.Module, index: int) -> nn.Module:
        """A deep copy of ``block`` cut to the kept units (module docstring)."""
        side = copy.deepcopy(block)
        names = roles_to_names(self.roles, index)
        kv = self.kv_heads[index]
        heads_kept = len(kv) * self.groups
        unit = torch.arange(self.head_dim, device=kv.device)
        kv_units = (kv[:, None] * self.head_dim + unit).flatten()
        q_heads = (kv[:, None] * self.groups + torch.arange(self.groups, device=kv.device)).flatten()
        q_units = (q_heads[:, None] * self.head_dim + unit).flatten()
        cuts = {
            "attn.q": (q_units, self.residual), "attn.k": (kv_units, self.residual), "attn.v": (kv_units, self.residual),
            "attn.o": (self.residual, q_units), "ffn.up": (self.ffn[index], self.residual),
            "ffn.gate": (self.ffn[index], self.residual), "ffn.down": (self.residual, self.ffn[index]),
        }
        handled = set()
        for role, name in names.items():
            layer = side.get_submodule(name)
            rows, columns = (c.to(layer.weight.device) for c in cuts[role])
            _cut_linear(layer, rows, columns)
            handled.update(id(p) for p in layer.parameters())
        for module in side.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if id(param) in handled:
                    continue
                if param.dim() != 1 or param.numel() != self.width:
                    raise TargetError(f"lst is not supported on this model: {type(module).__name__}.{name} of shape "
                                      f"{tuple(param.shape)} is neither a projection nor of the residual width {self.width}")
                setattr(module, name, nn.Parameter(param.detach().index_select(0, self.residual.to(param.device))))
            if isinstance(getattr(module, "normalized_shape", None), tuple):
                module.normalized_shape = (self.side_width,)
            _set_counts(module, QUERY_HEAD_ATTRIBUTES, self.heads, heads_kept)
            _set_counts(module, KV_HEAD_ATTRIBUTES, self.heads // self.groups, len(kv))
            _set_counts(module, QUERY_WIDTH_ATTRIBUTES, self.heads * self.head_dim, heads_kept * self.head_dim)
        return side


def roles_to_names(roles: dict[str, str], index: int) -> dict[str, str]:
    """role -> the path inside block ``index`` of its linear layer."""
    prefix = f"{index}."
    return {role: path[len(prefix):] for path, role in roles.items() if path.startswith(prefix) and role != "block"
            and role in ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.gate", "ffn.down")}


def _attention_of(block: nn.Module, names: dict[str, str]) -> nn.Module:
    """The module holding the block's q projection (where the head width is stated)."""
    parent = names["attn.q"].rpartition(".")[0]
    return block.get_submodule(parent) if parent else block


def _is_norm_like(module: nn.Module) -> bool:
    """A module whose own parameters are all vectors (a norm's γ, β)."""
    return all(p.dim() == 1 for p in module.parameters(recurse=False))


def _reduced(size: int, reduction: int) -> int:
    return max(1, math.ceil(size / reduction))


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores, in ascending index order."""
    return torch.topk(scores, k).indices.sort().values


def _cut_linear(layer: nn.Linear, rows: Tensor, columns: Tensor) -> None:
    with torch.no_grad():
        layer.weight = nn.Parameter(layer.weight.index_select(0, rows).index_select(1, columns).clone())
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.index_select(0, rows).clone())
    layer.out_features, layer.in_features = len(rows), len(columns)


def _set_counts(module: nn.Module, names: tuple[str, ...], original: int, value: int) -> None:
    """Attention code may reshape by its stated head count: state the pruned one."""
    for name in names:
        current = getattr(module, name, None)
        if isinstance(current, int) and not isinstance(current, bool) and current == original:
            setattr(module, name, value)


class LSTDelta(Delta):
    """The side network of one model: side blocks, ladders D₀..D_L, gates α, the up-projection U."""

    acts_on = "call"
    unpacked_because = "runs a side network with a KV cache of its own, which packing's shared prefix cache has not"

    def __init__(self, config: LSTConfig, stack: str, blocks: nn.Module, plan: PruningPlan,
                 dtype: torch.dtype, device):
        super().__init__()
        self.config = config
        self.stack = stack
        self.temperature = config.temperature
        self.kept = [i for i in range(len(blocks)) if i not in config.drop_layers]
        width, side_width = plan.width, plan.side_width
        self.side = nn.ModuleDict({str(i): plan.pruned_block(blocks[i], i) for i in self.kept})
        #: role -> path of each kept side block's projections, for the memory estimate
        self._projections = {i: roles_to_names(plan.roles, i) for i in self.kept}
        self._head_dim = plan.head_dim
        ladders = [0, *(i + 1 for i in self.kept)]  # D₀ reads h₀, D_{i+1} reads block i's output
        self.down = nn.ModuleDict({str(i): nn.Linear(width, side_width, bias=False) for i in ladders})
        self.up = nn.Linear(side_width, width, bias=False)
        self.alpha = nn.Parameter(torch.zeros(len(self.kept)))  # one gate per kept side block
        if plan.residual.device.type != "meta":  # a dry run on a model without weights has shapes only
            self._start_as_selection(plan.residual)
        self.to(device=device, dtype=dtype)
        self.requires_grad_(True)
        #: the backbone's KV cache -> the side network's, during generation
        self._side_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @torch.no_grad()
    def _start_as_selection(self, residual: Tensor) -> None:
        """Dᵢ picks the kept residual dimensions; U = 0."""
        selection = torch.zeros(self.up.in_features, self.up.out_features)
        selection[torch.arange(len(residual)), residual.cpu()] = 1.0
        for down in self.down.values():
            down.weight.copy_(selection)
        self.up.weight.zero_()

    def gates(self) -> Tensor:
        return gate(self.alpha, self.temperature)

    def call(self, module: nn.Module, run, args: tuple, kwargs: dict, rows: RowSelector):
        blocks = module.get_submodule(self.stack)
        calls: dict[int, tuple[tuple, dict]] = {}
        outputs: dict[int, Tensor] = {}
        handles = []
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(_record_call(calls, i), with_kwargs=True))
            handles.append(block.register_forward_hook(_record_output(outputs, i)))
        try:
            with torch.no_grad():  # the backbone keeps nothing for backward
                result = run(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        hidden = result[0] if isinstance(result, tuple) else result.last_hidden_state
        side = self.side_states(calls, outputs)
        update = self.up(side).to(hidden.dtype)
        selected = rows.mask(hidden.shape[0], hidden.device)
        if selected is not None:
            update = update * selected.to(update.dtype)[:, None, None]
        combined = hidden + update
        if isinstance(result, tuple):
            return (combined, *result[1:])
        result["last_hidden_state"] = combined
        return result

    def side_states(self, calls: dict[int, tuple[tuple, dict]], outputs: dict[int, Tensor]) -> Tensor:
        """s_L from the backbone blocks' recorded calls and outputs (module docstring)."""
        dtype = self.up.weight.dtype
        first_args, first_kwargs = calls[0]
        h0 = _hidden_argument(first_args, first_kwargs)
        s = self.down["0"](h0.to(dtype))
        mu = self.gates()
        cache = self._side_cache(first_kwargs, h0.shape[1])
        for position, i in enumerate(self.kept):
            block_args, block_kwargs = calls[i]
            block_args, block_kwargs = _with_hidden(block_args, block_kwargs, s)
            if cache is not None:
                block_kwargs = {k: (cache if k in CACHE_ARGUMENTS and v is not None else v) for k, v in block_kwargs.items()}
            out = self.side[str(i)](*block_args, **block_kwargs)
            out = out[0] if isinstance(out, tuple) else out
            s = ladder_step(mu[position].to(dtype), out.to(dtype), self.down[str(i + 1)](outputs[i].to(dtype)))
        return s

    def _side_cache(self, kwargs: dict, new_tokens: int):
        """The side network's KV cache beside the backbone's (None when the backbone has none)."""
        backbone = next((kwargs[k] for k in CACHE_ARGUMENTS if kwargs.get(k) is not None), None)
        if backbone is None or not self.kept:
            return None
        from transformers import DynamicCache

        past = int(backbone.get_seq_length()) - new_tokens  # the backbone has already cached these tokens
        side = self._side_caches.get(backbone)
        if side is None or past == 0:
            side = DynamicCache()
            self._side_caches[backbone] = side
        seen = int(side.get_seq_length(self.kept[0]))  # the side cache fills only its blocks' layers
        if seen > past:
            side.crop(past)
        elif seen < past:
            raise ConfigError(f"lst's side network holds {seen} cached tokens but the backbone's cache holds {past}: "
                              "a cache filled without this delta cannot be continued with it")
        return side

    def backward_activations(self, seq_len: int, attention: str) -> int:
        """Per token: each kept side block's activations (the backbone's formula at the side's
        sizes, :mod:`deltatune.analysis.memory`), each ladder's input h and the gate's two
        products, and D₀'s input; the up-projection's input once."""
        width, side_width = self.up.out_features, self.up.in_features
        elements = width + side_width
        for i in self.kept:
            block = self.side[str(i)]
            sizes = {role: block.get_submodule(path).out_features for role, path in self._projections[i].items()}
            mlp = (4 if "ffn.gate" in sizes else 2) * sizes["ffn.up"]
            elements += (2 * side_width + side_width + sizes["attn.q"] + 2 * sizes["attn.k"] + sizes["attn.q"]
                         + side_width + mlp)
            if attention == "eager":
                elements += sizes["attn.q"] // self._head_dim * seq_len
            elements += width + 2 * side_width
        return elements + side_width

    def extra_repr(self) -> str:
        return f"side blocks={len(self.side)}, width={self.up.in_features}, temperature={self.temperature}"


def _hidden_argument(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _record_call(calls: dict, index: int):
    def hook(module, args, kwargs):
        calls[index] = (args, kwargs)

    return hook


def _record_output(outputs: dict, index: int):
    def hook(module, args, output):
        outputs[index] = output[0] if isinstance(output, tuple) else output

    return hook
