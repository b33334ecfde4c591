"""Prefix tuning and LLaMA-Adapter: trained vectors that attention reads.

**Prefix tuning** (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation"). Every attention layer l gets n trainable key and value vectors P_K^l, P_V^l
(per key/value head, so grouped-query attention gets ``num_key_value_heads`` of them) that every
query attends to before the real keys:

    head = softmax(q [P_K; K]ᵀ · scale + [0; M]) [P_V; V]

M being the model's own mask (causal, padding). The paper trains the prefixes through a
reparameterisation for stability, P = MLP(P′) with a smaller P′ and one MLP shared by all
layers (``reparameterize=True``: P′ ∈ R^{n×d′}, MLP = Linear(d′, h) · tanh · Linear(h, Σ_l 2·w_l),
w_l the layer's key width); :func:`deltatune.fold` (and every save) replaces it by the plain
prefixes it produces, which is all inference needs. Attention layers of every kind get one:
self-attention, and in encoder-decoder models the encoder's and the decoder's self-attention and
the decoder's cross-attention. The prefixes are not in the KV cache and have no position: real
tokens keep the positions they have without the delta (the paper's GPT-2 implementation shifted
them by n; with learned prefixes that shift only changes which absolute position embeddings the
real tokens get). Initialised as the paper recommends, from activations of real words
(``init="activations"``): :func:`deltatune.calibrate` (run by ``deltatune train`` on its first
batch) copies each layer's own keys and values of the first n tokens of the first sample into
its prefixes. Until then, and with ``init="random"`` or ``reparameterize``, they are drawn from
N(0, σ²), σ the scale of the layer's real keys (values) — which on a real model moves attention
mass onto random keys and costs far more at the start (SmolLM2-135M's held-out loss 0.55 → 18).

**LLaMA-Adapter** (Zhang et al., 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models
with Zero-init Attention"). The top L layers get K learnable adaption prompts T_l ∈ R^{K×d}
(in the hidden space), projected by the layer's own key and value projections; the queries
attend to them through a separate softmax whose result is scaled by a zero-initialised gate g_l
(one per head, as in the authors' code) and added to the ordinary attention output:

    head = softmax(q Kᵀ · scale + M) V  +  g_l ⊙ softmax(q (T_l W_K)ᵀ · scale) (T_l W_V)

so the model is exactly unchanged at init. Keys of the prompts are not rotated (they have no
position). It needs separate key and value projections and causal self-attention in a
decoder-only model (Llama, Mistral, Qwen2, Gemma, OPT, ...); elsewhere attaching says it is not
supported. Parameters: L·(K·d + heads).

Neither is mergeable (they change attention, not a weight); both support mixed batches: rows
routed elsewhere get the extra keys masked out and the prompt term zeroed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..anatomy import linear_shape, unwrap
from ..backends import backend_for, layer_backend
from ..attention import AttentionDelta, attention_modules, attention_support, projection_children, uses_attention_interface
from ..config import DeltaConfig, PARAM_DTYPES, check_choice, check_positive_int, param_dtype, register
from ..errors import TargetError

ATTENTION_ROLES = ("attn.q", "attn.qkv")
PREFIX_INITS = ("activations", "random")


@dataclasses.dataclass(frozen=True)
class _AttentionMethodConfig(DeltaConfig):
    """Targets name attention query (or fused qkv) projections, or attention modules; each
    selected projection stands for the attention module that holds it."""

    adapts: ClassVar[str] = "attention modules (given by their query or fused qkv projections, roles attn.q / attn.qkv)"
    default_targets: ClassVar[tuple[str, ...]] = ATTENTION_ROLES
    supports_mixed_batch: ClassVar[bool] = True

    param_dtype: str = "auto"

    def validate(self) -> None:
        super().validate()
        check_choice("param_dtype", self.param_dtype, PARAM_DTYPES)

    def accepts(self, module: nn.Module, role: str | None = None) -> bool:
        return role in ATTENTION_ROLES or uses_attention_interface(module)

    def expand(self, paths: list[str], anatomy) -> list[str]:
        return attention_modules(paths, anatomy)

    def _refuse_unsupported(self, path: str, module: nn.Module) -> None:
        reason = attention_support(module)
        if reason:
            raise TargetError(f"{self.method} is not supported on {path}: {reason}")


def _kv_projections(path: str, module: nn.Module, anatomy) -> tuple[Tensor, Tensor]:
    """The (out, in) weight rows that produce this attention's keys and its values."""
    children = projection_children(path, anatomy)
    if "attn.k" in children and "attn.v" in children:
        k, v = (backend_for(unwrap(module.get_submodule(children[r].rpartition(".")[2]))) for r in ("attn.k", "attn.v"))
        return k.dense_weight(), v.dense_weight()
    if "attn.qkv" in children:
        fused = backend_for(unwrap(module.get_submodule(children["attn.qkv"].rpartition(".")[2]))).dense_weight()
        config = getattr(module, "config", None)
        heads = getattr(config, "num_attention_heads", None)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        out = fused.shape[0]
        if heads is None or out % (heads + 2 * kv_heads):
            raise TargetError(f"cannot tell the key width of the fused projection {children['attn.qkv']} ({out} outputs)")
        head_dim = out // (heads + 2 * kv_heads)
        q_width, kv_width = heads * head_dim, kv_heads * head_dim
        return fused[q_width : q_width + kv_width], fused[q_width + kv_width :]
    raise TargetError(f"{path} has no key and value projections with attention roles; it cannot take a prefix")


def _row_scale(weight: Tensor) -> float:
    """The typical norm of a projection's output for a unit-variance input: its mean row norm."""
    return float(weight.detach().float().norm(dim=-1).mean())


class PrefixEncoder(nn.Module):
    """P = MLP(P′): one small MLP producing every layer's prefixes (the paper's reparameterisation)."""

    def __init__(self, tokens: int, embed_dim: int, hidden: int, widths: list[int], dtype, device):
        super().__init__()
        self.starts = [sum(widths[:i]) for i in range(len(widths) + 1)]
        self.embeddings = nn.Parameter(torch.randn(tokens, embed_dim, dtype=dtype, device=device))
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, hidden, dtype=dtype, device=device),
            nn.Tanh(),
            nn.Linear(hidden, self.starts[-1], dtype=dtype, device=device),
        )

    def output(self, index: int) -> Tensor:
        """Output block ``index`` (2·slot: a layer's keys, 2·slot+1: its values). Each layer runs
        only its own rows of the last linear layer, not every layer's."""
        first, last = self.mlp[2], slice(self.starts[index], self.starts[index + 1])
        return F.linear(self.mlp[1](self.mlp[0](self.embeddings)), first.weight[last], first.bias[last])


class PrefixDelta(AttentionDelta):
    """Key and value prefixes for one attention module, plain or read from a shared encoder."""

    adds_keys = True

    def __init__(self, config: "PrefixTuningConfig", key_width: int, value_width: int, dtype, device):
        super().__init__()
        self.config = config
        self.key_width = key_width
        self.value_width = value_width
        n = config.num_virtual_tokens
        self.prefix_keys = nn.Parameter(torch.zeros(n, key_width, dtype=dtype, device=device))
        self.prefix_values = nn.Parameter(torch.zeros(n, value_width, dtype=dtype, device=device))
        self._encoder: tuple[PrefixEncoder, int] | None = None  # (shared encoder, my slot), not a submodule
        self._recorded: tuple[Tensor, Tensor] | None = None

    def use_encoder(self, encoder: PrefixEncoder, slot: int, owner: bool) -> None:
        """Read the prefixes from ``encoder``'s outputs 2·slot (keys) and 2·slot+1 (values)."""
        del self.prefix_keys, self.prefix_values
        self._encoder = (encoder, slot)
        if owner:
            self.encoder = encoder

    def prefixes(self) -> tuple[Tensor, Tensor]:
        if self._encoder is None:
            return self.prefix_keys, self.prefix_values
        encoder, slot = self._encoder
        return encoder.output(2 * slot), encoder.output(2 * slot + 1)

    def extra_keys_values(self, module: nn.Module, key: Tensor) -> tuple[Tensor, Tensor]:
        keys, values = self.prefixes()
        head_dim = key.shape[-1]
        return _by_head(keys, head_dim), _by_head(values, head_dim)

    def record(self, key: Tensor, value: Tensor) -> None:
        if self._recorded is not None:
            return
        n = self.prefix_keys.shape[0]
        index = torch.arange(n, device=key.device) % key.shape[2]  # repeated if the sample is short
        flat = lambda t: t[0].index_select(1, index).transpose(0, 1).reshape(n, -1)  # noqa: E731
        self._recorded = (flat(key).detach(), flat(value).detach())

    @torch.no_grad()
    def finish_calibration(self, backend) -> None:
        if self._recorded is None:
            raise RuntimeError("calibration ran no batch through this attention module")
        keys, values = self._recorded
        self.prefix_keys.copy_(keys.to(self.prefix_keys.dtype))
        self.prefix_values.copy_(values.to(self.prefix_values.dtype))
        self._recorded = None

    @torch.no_grad()
    def fold(self) -> bool:
        """Replace the shared encoder by the plain prefixes it produces now."""
        if self._encoder is None:
            return True
        keys, values = (t.detach().clone() for t in self.prefixes())
        self._encoder = None
        if "encoder" in dict(self.named_children()):
            del self.encoder
        self.prefix_keys = nn.Parameter(keys)
        self.prefix_values = nn.Parameter(values)
        return True

    def saved_state(self) -> dict[str, Tensor]:
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}
        keys, values = self.prefixes()
        state.update(prefix_keys=keys.detach(), prefix_values=values.detach())
        return state

    def load_saved_state(self, state: dict[str, Tensor], where: str) -> None:
        self.needs_calibration = False  # trained prefixes, not to be replaced by activations
        self.fold()
        super().load_saved_state(state, where)


def _by_head(vectors: Tensor, head_dim: int) -> Tensor:
    """(n, heads·head_dim) -> (heads, n, head_dim): the layout projected keys have."""
    n, width = vectors.shape
    return vectors.view(n, width // head_dim, head_dim).transpose(0, 1)


@register
@dataclasses.dataclass(frozen=True)
class PrefixTuningConfig(_AttentionMethodConfig):
    """Prefix tuning (see the module docstring). ``num_virtual_tokens`` is n; with
    ``reparameterize`` the prefixes come from P′ (``encoder_embed_dim`` wide) through an MLP of
    ``encoder_hidden_size`` hidden units, until folded."""

    method: ClassVar[str] = "prefix"
    default_lr: ClassVar[float] = 1e-2
    #: the Delta class built per module (a hybrid may build a gated subclass)
    delta_class: ClassVar[type] = PrefixDelta

    num_virtual_tokens: int = 20
    init: str = "activations"
    reparameterize: bool = False
    encoder_embed_dim: int = 512
    encoder_hidden_size: int = 512

    @property
    def calibration_batches(self) -> int:
        return 1 if self.init == "activations" and not self.reparameterize else 0

    def validate(self) -> None:
        super().validate()
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens, "the prefix length n")
        check_choice("init", self.init, PREFIX_INITS)
        check_positive_int("encoder_embed_dim", self.encoder_embed_dim, "the width of P′")
        check_positive_int("encoder_hidden_size", self.encoder_hidden_size, "the MLP's hidden units")

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> PrefixDelta:
        self._refuse_unsupported(path, module)
        key_rows, value_rows = _kv_projections(path, module, options["anatomy"])
        backend = layer_backend(module)
        device = options.get("device") or backend.device
        dtype = param_dtype(self.param_dtype, backend.dtype)
        delta = self.delta_class(self, key_rows.shape[0], value_rows.shape[0], dtype, device)
        if initialize:
            delta.needs_calibration = self.calibration_batches > 0
            with torch.no_grad():
                nn.init.normal_(delta.prefix_keys, std=_row_scale(key_rows))
                nn.init.normal_(delta.prefix_values, std=_row_scale(value_rows))
        return delta

    def link(self, built: dict[str, Any], anatomy) -> None:
        if not self.reparameterize:
            return
        # the owner is found from the paths alone, so a checkpoint loads in any order
        paths = sorted(p for p, d in built.items() if isinstance(d, PrefixDelta))
        first = built[paths[0]].prefix_keys
        widths = [w for p in paths for w in (built[p].key_width, built[p].value_width)]
        encoder = PrefixEncoder(
            self.num_virtual_tokens, self.encoder_embed_dim, self.encoder_hidden_size, widths, first.dtype, first.device
        )
        for slot, path in enumerate(paths):
            built[path].use_encoder(encoder, slot, owner=slot == 0)


class LlamaAdapterDelta(AttentionDelta):
    """K adaption prompts and a zero-initialised gate per head for one attention module."""

    adds_output = True

    def __init__(self, config: "LlamaAdapterConfig", hidden: int, heads: int, k_name: str, v_name: str, dtype, device):
        super().__init__()
        self.config = config
        self.k_name = k_name
        self.v_name = v_name
        self.adaption_prompt = nn.Parameter(torch.zeros(config.adapter_len, hidden, dtype=dtype, device=device))
        self.gate = nn.Parameter(torch.zeros(heads, dtype=dtype, device=device))

    def extra_output(self, module: nn.Module, query: Tensor, scaling: float) -> Tensor:
        prompt = self.adaption_prompt.to(query.dtype)
        head_dim = query.shape[-1]
        keys = _by_head(module.get_submodule(self.k_name)(prompt), head_dim)    # (kv_heads, K, head_dim)
        values = _by_head(module.get_submodule(self.v_name)(prompt), head_dim)
        groups = query.shape[1] // keys.shape[0]
        keys = keys.repeat_interleave(groups, dim=0)
        values = values.repeat_interleave(groups, dim=0)
        scores = torch.matmul(query, keys.transpose(-1, -2)) * scaling           # (batch, heads, queries, K)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        return self.gate.to(query.dtype).view(1, -1, 1, 1) * torch.matmul(probs, values)


@register
@dataclasses.dataclass(frozen=True)
class LlamaAdapterConfig(_AttentionMethodConfig):
    """LLaMA-Adapter (see the module docstring): ``adapter_len`` prompts (K) in each of the top
    ``adapter_layers`` layers (L), unless ``layers`` chooses them."""

    method: ClassVar[str] = "llama_adapter"
    default_lr: ClassVar[float] = 9e-3  # the paper's 9e-3 (LLaMA-7B, batch 64)

    adapter_len: int = 10
    adapter_layers: int = 30

    def validate(self) -> None:
        super().validate()
        check_positive_int("adapter_len", self.adapter_len, "K, the prompts per layer")
        check_positive_int("adapter_layers", self.adapter_layers, "L, how many top layers get prompts")

    @property
    def layer_spec(self) -> tuple[int, ...] | str:
        return self.layers if self.layers is not None else f"top:{self.adapter_layers}"

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> LlamaAdapterDelta:
        self._refuse_unsupported(path, module)
        anatomy = options["anatomy"]
        children = projection_children(path, anatomy)
        config = getattr(module, "config", None)
        if "attn.k" not in children or "attn.v" not in children:
            raise TargetError(
                f"llama_adapter is not supported on {path} ({type(module).__name__}): it projects its prompts "
                "with the layer's own key and value projections, and this attention has none of its own "
                "(a fused qkv projection)"
            )
        if getattr(config, "is_encoder_decoder", False) or not getattr(module, "is_causal", False):
            raise TargetError(
                f"llama_adapter is not supported on {path} ({type(module).__name__}): it adapts the causal "
                "self-attention of decoder-only models"
            )
        k_name = children["attn.k"].rpartition(".")[2]
        v_name = children["attn.v"].rpartition(".")[2]
        hidden = linear_shape(module.get_submodule(k_name))[0]
        heads = getattr(config, "num_attention_heads", None)
        if not isinstance(heads, int):
            raise TargetError(f"cannot tell the number of attention heads of {path}")
        backend = layer_backend(module)
        device = options.get("device") or backend.device
        delta = LlamaAdapterDelta(self, hidden, heads, k_name, v_name, param_dtype(self.param_dtype, backend.dtype), device)
        if initialize:
            with torch.no_grad():  # unit scale, like the normalised hidden states the projections read
                nn.init.normal_(delta.adaption_prompt)
        return delta
