"""Prompt tuning and P-tuning: trained virtual tokens prepended to the input embeddings.

**Prompt tuning** (Lester, Al-Rfou & Constant, 2021, "The Power of Scale for
Parameter-Efficient Prompt Tuning"). n trainable embeddings P ∈ R^{n×e} (e the width of the
model's input embeddings) are put before the embedded tokens, and the frozen model reads

    h = body([P; E(x)], mask = [1ⁿ; m])                 y = head(h[n:])

E being the model's input-embedding module, m the user's attention mask; the outputs at the n
virtual positions are dropped, so the LM head, ``logits_to_keep``, the labels and the loss stay
aligned with the user's tokens. Real tokens sit n positions later than without the prompt.
Initialisation (``init``): ``random`` (N(0, σ²), σ the standard deviation of E's outputs),
``vocab`` (E of n token ids drawn from the vocabulary with ``init_seed``) or ``text`` (E of
``init_token_ids``, or of ``init_text`` tokenized with the model's own tokenizer when
``model.config.name_or_path`` is a local directory; repeated or cut to n). Parameters: n·e.

**P-tuning** (Liu et al., 2021, "GPT Understands, Too"). The virtual tokens are the outputs of
a prompt encoder over n trainable input embeddings H ∈ R^{n×e}:

    P = MLP(BiLSTM(H))   (``encoder="lstm"``, the paper's: [→h_i; ←h_i] then Linear·ReLU·Linear)
    P = MLP(H)           (``encoder="mlp"``: Linear·ReLU·Linear·ReLU·Linear)

with ``encoder_hidden_size`` units (the layer shapes of PEFT's encoder, ``encoder_num_layers``
LSTM layers). The encoder only helps training: :meth:`PromptDelta.fold` (or
:func:`deltatune.fold`) computes P once and keeps it as a plain parameter, and every save stores
that folded P under ``prompt_embeddings`` — a saved P-tuning delta is a prompt-tuning delta's
size and loads into a fresh P-tuning delta (folded). Templates that interleave virtual tokens
with words ("[P] [P] Britain [P] is [MASK]") are not implemented: the prompt goes first.

Where it goes. The delta wraps the *body*: the deepest module that holds the input embedding
(``get_input_embeddings()``) and whose ``forward`` takes ``inputs_embeds`` and
``attention_mask`` (``model`` in Llama, ``transformer`` in GPT-2, ``bert``, ``model.decoder``
in OPT). In an encoder-decoder the prompt goes before the encoder's input and is kept in its
output, and a parameter-free companion on the decoder extends ``encoder_attention_mask`` by n
so cross-attention reads the virtual tokens. The call's arguments are bound to the body's
signature and changed:

* first step (no cache, or an empty one): ``input_ids`` are embedded, P prepended,
  ``attention_mask`` extended by n ones (created when absent), ``token_type_ids`` by n zeros,
  given ``position_ids`` become [0..n-1, p + n];
* cached decoding steps (the cache already holds the prompt): the mask is extended and the
  positions shifted by n; nothing is prepended or dropped.

Several active prompt deltas concatenate: each wraps the call of the next, so the prompt of the
delta activated last sits first and the one activated first sits right before the tokens.
Under :func:`deltatune.route` every delta present in the batch wraps the call, and rows routed
elsewhere see its n slots masked out with their positions unchanged, so such a row computes
exactly what it computes without this delta. In causal bodies (decoders, where a KV cache keeps
the slots) those masked slots are on the left for every row; unless the caller gives
``position_ids``, the positions the model would use are made explicit (``arange``) except where
the model derives them from the mask itself (OPT) or has none (ALiBi in BLOOM). In
bidirectional encoders (BERT, the encoder of T5 and BART, which keep no cache) the masked slots
of other rows go after their tokens instead, so every position scheme (learned, offset, derived
from the input ids) gives those rows their own positions.

Not mergeable (there is no weight to fold into); supports mixed batches. The body's pooled
output (BERT's pooler) reads the first virtual token, as in PEFT; only ``last_hidden_state`` is
shortened.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import DeltaConfig, check_choice, check_positive_int, register
from ..errors import ConfigError, TargetError
from ..layer import Delta, RowSelector
from ..upstream import passed_cache

INITS = ("random", "vocab", "text")
ENCODERS = ("lstm", "mlp")
_HALF = (torch.float16, torch.bfloat16)
_STD_SAMPLE = 4096  # token ids read to measure the scale of the embeddings for ``random``


# the body: which module gets the prompt ---------------------------------------------------------

_SIGNATURES: dict[type, inspect.Signature] = {}


def _signature(module: nn.Module) -> inspect.Signature:
    kind = type(module)
    if kind not in _SIGNATURES:
        _SIGNATURES[kind] = inspect.signature(module.forward)
    return _SIGNATURES[kind]


def _takes(module: nn.Module, *names: str) -> bool:
    try:
        params = _signature(module).parameters
    except (TypeError, ValueError):
        return False
    return all(n in params for n in names)


def _embedding_of(module: nn.Module) -> nn.Module | None:
    getter = getattr(module, "get_input_embeddings", None)
    if not callable(getter):
        return None
    try:
        found = getter()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    return found if isinstance(found, nn.Module) else None


def _holds_embedding(module: nn.Module) -> bool:
    return _embedding_of(module) is not None and _takes(module, "inputs_embeds", "attention_mask")


def is_body(module: nn.Module) -> bool:
    """A module that embeds the tokens itself and takes ``inputs_embeds`` and ``attention_mask``,
    with no such module inside it (BART's ``model`` holds two: the encoder and the decoder)."""
    if not _holds_embedding(module):
        return False
    return not any(m is not module and _holds_embedding(m) for m in module.modules())


def _causal(module: nn.Module) -> bool | None:
    """Whether the body's attention is causal, from the ``is_causal`` flags its attention
    modules carry; None when none says (e.g. BLOOM)."""
    flags = [m.is_causal for m in module.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return any(flags) if flags else None


def _positions_from_mask(module: nn.Module) -> bool:
    """Whether the body derives positions from the attention mask (OPT's position embedding
    reads the mask), so masked slots never shift the tokens after them."""
    return any(isinstance(m, nn.Embedding) and _takes(m, "attention_mask") for m in module.modules())


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:  # legacy tuples: ((key, value), ...) with keys (batch, heads, length, dim)
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by name (what ``**kwargs`` collected, flattened in)."""
    signature = _signature(module)
    arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
        elif param.kind is inspect.Parameter.VAR_POSITIONAL and arguments.get(name):
            raise TypeError(f"{type(module).__name__} was called with extra positional arguments")
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            arguments.pop(name, None)
    return arguments


def _row_column(selected: Tensor, like: Tensor, n: int) -> Tensor:
    """(batch, n) of ``like``'s dtype: 1 in the rows selected, 0 elsewhere."""
    return selected[:, None].to(like.dtype).expand(-1, n)


def _per_row(selected: Tensor, tensor: Tensor) -> Tensor:
    """``tensor`` with its batch dimension made explicit (positions often come as (1, L))."""
    return tensor.expand(selected.shape[0], *tensor.shape[1:]) if tensor.shape[0] != selected.shape[0] else tensor


def _choose(selected: Tensor, yes: Tensor, no: Tensor) -> Tensor:
    return torch.where(selected.view(-1, *([1] * (yes.dim() - 1))), yes, no)


# the prompt encoder of P-tuning ----------------------------------------------------------------

class PromptEncoder(nn.Module):
    """P = MLP(BiLSTM(H)) or P = MLP(H), over the trainable input embeddings H (n × e)."""

    def __init__(self, n: int, dim: int, kind: str, hidden: int, lstm_layers: int, dtype, device):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.embeddings = nn.Parameter(torch.zeros(n, dim, **kw))
        if kind == "lstm":
            self.lstm = nn.LSTM(dim, hidden, num_layers=lstm_layers, bidirectional=True, batch_first=True, **kw)
            self.mlp = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **kw), nn.ReLU(), nn.Linear(2 * hidden, dim, **kw))
        else:
            self.lstm = None
            self.mlp = nn.Sequential(
                nn.Linear(dim, hidden, **kw), nn.ReLU(), nn.Linear(hidden, hidden, **kw), nn.ReLU(),
                nn.Linear(hidden, dim, **kw),
            )

    def forward(self) -> Tensor:
        h = self.embeddings
        if self.lstm is not None:
            h = self.lstm(h.unsqueeze(0))[0].squeeze(0)
        return self.mlp(h)


# the deltas ------------------------------------------------------------------------------------

class PromptDelta(Delta):
    """n virtual tokens before the body's input: a plain parameter, or a P-tuning encoder's output."""

    acts_on = "call"

    def __init__(self, config: "PromptOptions", n: int, dim: int, body: nn.Module,
                 encoder: PromptEncoder | None, dtype, device):
        super().__init__()
        self.config = config
        self.n = n
        self.dim = dim
        if encoder is None:
            self.prompt_embeddings = nn.Parameter(torch.zeros(n, dim, dtype=dtype, device=device))
        else:
            self.encoder = encoder
        # what the body is like; `link` settles the role (decoder-only, encoder-only, seq2seq encoder)
        self.causal = _causal(body)
        self.reads_encoder = _takes(body, "encoder_hidden_states")
        self.takes_position_ids = _takes(body, "position_ids")
        self.positions_from_mask = _positions_from_mask(body)
        self.strip = True           # drop the n virtual positions from last_hidden_state
        self.slots_right = False    # rows routed elsewhere: masked slots after their tokens

    @property
    def folded(self) -> bool:
        return "encoder" not in dict(self.named_children())

    def prompts(self) -> Tensor:
        """P, (n, e)."""
        return self.prompt_embeddings if self.folded else self.encoder()

    def batch_prompts(self, rows: int) -> Tensor:
        """The prompt of each row of a batch, (rows, n, e): P for every row (a delta whose prompt
        depends on each sample's task gives each row its own)."""
        return self.prompts().unsqueeze(0).expand(rows, -1, -1)

    @torch.no_grad()
    def fold(self) -> bool:
        """Replace the prompt encoder by the plain prompts it produces now (outputs unchanged)."""
        if not self.folded:
            prompts = self.prompts().detach().clone()
            del self.encoder
            self.prompt_embeddings = nn.Parameter(prompts)
        return True

    def saved_state(self) -> dict[str, Tensor]:
        if not self.folded and any(p.is_meta for p in self.encoder.parameters()):
            return {"prompt_embeddings": torch.empty(self.n, self.dim, device="meta")}
        with torch.no_grad():
            return {"prompt_embeddings": self.prompts().detach()}

    def load_saved_state(self, state: dict[str, Tensor], where: str) -> None:
        self.fold()
        super().load_saved_state(state, where)

    # the call ------------------------------------------------------------------------------

    def call(self, module: nn.Module, run, args: tuple, kwargs: dict, rows: RowSelector):
        kw = _bind(module, args, kwargs)
        reference = kw.get("inputs_embeds")
        if reference is None:
            reference = kw.get("input_ids")
        if reference is None:
            raise ValueError(f"{type(module).__name__} was called without input_ids or inputs_embeds")
        selected = rows.mask(reference.shape[0], reference.device)
        if _cache_length(passed_cache(kw)) > 0:
            return run(**self._cached_step(kw, selected, reference.shape[1]))
        kw, length = self._first_step(module, kw, selected)
        out = run(**kw)
        return self._strip(out, selected, length) if self.strip else out

    def _first_step(self, module: nn.Module, kw: dict, selected: Tensor | None) -> tuple[dict, int]:
        n = self.n
        embeds = kw.get("inputs_embeds")
        if embeds is None:
            embeds = module.get_input_embeddings()(kw["input_ids"])
        if "input_ids" in kw:
            kw["input_ids"] = None
        batch, length = embeds.shape[:2]
        prompts = self.batch_prompts(batch).to(device=embeds.device, dtype=embeds.dtype)
        right = selected is not None and self.slots_right

        def place(before: Tensor, tensor: Tensor, after: Tensor, dim: int = 1) -> Tensor:
            """[before; tensor], but [tensor; after] in rows routed elsewhere when their slots go right."""
            if right:
                return _choose(selected, torch.cat([before, tensor], dim), torch.cat([tensor, after], dim))
            return torch.cat([before, tensor], dim)

        kw["inputs_embeds"] = place(prompts, embeds, prompts)

        mask = kw.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"prompt tuning needs a 2-D attention_mask (batch, length), got shape {tuple(mask.shape)}")
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        ones = mask.new_ones(batch, n)
        if selected is not None and not right:
            ones = _row_column(selected, mask, n)  # the slots of other rows masked out, on the left
        kw["attention_mask"] = place(ones, mask, mask.new_zeros(batch, n))

        token_types = kw.get("token_type_ids")
        if token_types is not None:
            zeros = token_types.new_zeros(*token_types.shape[:-1], n)
            kw["token_type_ids"] = place(zeros, token_types, zeros, dim=-1)

        positions = kw.get("position_ids")
        if positions is None and selected is not None and self._must_spell_out_positions():
            positions = torch.arange(length, device=embeds.device).unsqueeze(0)
        if positions is not None:
            kw["position_ids"] = self._first_positions(positions, selected, right)

        cache_position = kw.get("cache_position")  # older transformers
        if cache_position is not None:
            kw["cache_position"] = torch.cat([cache_position[:1] + torch.arange(n, device=cache_position.device),
                                              cache_position + n])
        return kw, length

    def _must_spell_out_positions(self) -> bool:
        # rows routed elsewhere keep their positions; the model would count the slots unless it
        # derives positions from the mask (OPT) or has no position argument (ALiBi)
        return self.takes_position_ids and not self.positions_from_mask and not self.slots_right

    def _first_positions(self, positions: Tensor, selected: Tensor | None, right: bool) -> Tensor:
        n = self.n
        if selected is not None:
            if positions.dim() != 2:
                raise ValueError("routed prompt deltas need position_ids of shape (batch, length)")
            positions = _per_row(selected, positions)
        low = positions.amin(-1, keepdim=True)
        virtual = low + torch.arange(n, device=positions.device, dtype=positions.dtype)
        mine = torch.cat([virtual.expand(*positions.shape[:-1], n), positions + n], -1)
        if selected is None:
            return mine
        if right:
            others = torch.cat([positions, positions[..., -1:].expand(*positions.shape[:-1], n)], -1)
        else:
            others = torch.cat([low.expand(*positions.shape[:-1], n), positions], -1)
        return _choose(selected, mine, others)

    def _cached_step(self, kw: dict, selected: Tensor | None, new: int) -> dict:
        """The cache holds [slots; tokens so far] for every row: extend the mask, shift positions."""
        n = self.n
        mask = kw.get("attention_mask")
        positions = kw.get("position_ids")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(f"prompt tuning needs a 2-D attention_mask, got shape {tuple(mask.shape)}")
            batch = mask.shape[0]
            ones = mask.new_ones(batch, n) if selected is None else _row_column(selected, mask, n)
            if positions is None and selected is not None and self._must_spell_out_positions():
                seen = mask.shape[1] - new  # the tokens before these, without any prompt
                positions = seen + torch.arange(new, device=mask.device).unsqueeze(0)
            kw["attention_mask"] = torch.cat([ones, mask], 1)
        elif selected is not None:
            raise ConfigError(
                "a routed batch with prompt deltas needs attention_mask on cached decoding steps "
                "(generate passes it), so that each row's prompt slots can be masked"
            )
        if positions is not None:
            if selected is None:
                kw["position_ids"] = positions + n
            else:
                positions = _per_row(selected, positions)
                kw["position_ids"] = _choose(selected, positions + n, positions)
        if kw.get("cache_position") is not None:
            kw["cache_position"] = kw["cache_position"] + n
        return kw

    def _strip(self, out, selected: Tensor | None, length: int):
        n = self.n
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        if selected is not None and self.slots_right:
            kept = _choose(selected, hidden[:, n:], hidden[:, :length])
        else:
            kept = hidden[:, n:]
        if isinstance(out, tuple):
            return (kept, *out[1:])
        out["last_hidden_state"] = kept
        return out

    def extra_repr(self) -> str:
        return f"n={self.n}, dim={self.dim}, folded={self.folded}, strip={self.strip}"


class EncoderPromptMask(Delta):
    """On the decoder of an encoder-decoder: ``encoder_attention_mask`` extended by the n
    virtual tokens the encoder's output starts with (for rows routed elsewhere: n masked
    slots after the tokens, where the encoder put them). No parameters."""

    acts_on = "call"

    def __init__(self, config: "PromptOptions", n: int):
        super().__init__()
        self.config = config
        self.n = n

    def call(self, module: nn.Module, run, args: tuple, kwargs: dict, rows: RowSelector):
        kw = _bind(module, args, kwargs)
        states = kw.get("encoder_hidden_states")
        mask = kw.get("encoder_attention_mask")
        if states is None:
            return run(**kw)
        selected = rows.mask(states.shape[0], states.device)
        if mask is None:
            if selected is None:
                return run(**kw)  # every encoder position is visible, the prompt included
            raise ConfigError(
                "a routed batch with prompt deltas on an encoder-decoder needs the attention_mask "
                "(generate passes it), so that each row's prompt slots can be masked"
            )
        if mask.dim() != 2 or mask.shape[1] >= states.shape[1]:
            return run(**kw)  # the encoder ran without this prompt
        n, batch = self.n, mask.shape[0]
        ones = mask.new_ones(batch, n)
        if selected is None:
            kw["encoder_attention_mask"] = torch.cat([ones, mask], 1)
        else:
            kw["encoder_attention_mask"] = _choose(
                selected, torch.cat([ones, mask], 1), torch.cat([mask, mask.new_zeros(batch, n)], 1)
            )
        return run(**kw)

    def extra_repr(self) -> str:
        return f"n={self.n}"


# configs ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PromptOptions(DeltaConfig):
    """What prompt tuning and P-tuning share: n, the initialisation, where the prompt goes."""

    adapts: ClassVar[str] = (
        "the model body that embeds the tokens (a module below the model's root whose forward takes "
        "inputs_embeds and attention_mask, e.g. `model` in Llama, `transformer` in GPT-2); "
        "models without one are not supported"
    )
    # every module is looked at; `accepts` keeps the bodies (the deepest embedding holders)
    default_targets: ClassVar[tuple[str, ...]] = ("re:.+",)
    supports_mixed_batch: ClassVar[bool] = True
    supports_merge: ClassVar[bool] = False

    num_virtual_tokens: int = 20
    init: str = "random"
    init_token_ids: tuple[int, ...] | None = None
    init_text: str | None = None
    init_seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.init_token_ids, list):
            object.__setattr__(self, "init_token_ids", tuple(self.init_token_ids))
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens, "n, the number of virtual tokens")
        check_choice("init", self.init, INITS)
        if self.layers is not None:
            raise ConfigError(f"layers={self.layers!r} does not apply to {self.method}: the prompt goes before the first block")
        if not isinstance(self.init_seed, int) or isinstance(self.init_seed, bool):
            raise ConfigError(f"init_seed must be an integer, got {self.init_seed!r}")
        ids, text = self.init_token_ids, self.init_text
        if ids is not None:
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ConfigError(f"init_token_ids must be a non-empty list of token ids (integers >= 0), got {list(ids)!r}")
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise ConfigError(f"init_text must be a non-empty string, got {text!r}")
        if self.init == "text":
            if ids is None and text is None:
                raise ConfigError("init='text' needs init_token_ids (a list of token ids) or init_text")
            if ids is not None and text is not None:
                raise ConfigError("give init_token_ids or init_text, not both")
        elif ids is not None or text is not None:
            given = "init_token_ids" if ids is not None else "init_text"
            raise ConfigError(f"{given} is only read with init='text', but init={self.init!r}")

    def accepts(self, module: nn.Module, role: str | None = None) -> bool:
        return is_body(module)

    # building ------------------------------------------------------------------------------

    def _sizes(self, module: nn.Module, options: dict[str, Any]):
        embedding = _embedding_of(module)
        weight = getattr(embedding, "weight", None)
        if weight is None:
            weight = next(embedding.parameters())
        dim = getattr(embedding, "embedding_dim", None) or weight.shape[-1]
        device = options.get("device") or weight.device
        dtype = torch.float32 if weight.dtype in _HALF else weight.dtype
        return embedding, weight, int(dim), dtype, device

    def make_source(self, dim: int, dtype, device) -> PromptEncoder | None:
        """None for plain prompt embeddings; P-tuning returns its encoder."""
        return None

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> PromptDelta:
        embedding, weight, dim, dtype, device = self._sizes(module, options)
        encoder = self.make_source(dim, dtype, device)
        delta = PromptDelta(self, self.num_virtual_tokens, dim, module, encoder, dtype, device)
        if initialize and not torch.device(device).type == "meta":
            target = delta.prompt_embeddings if encoder is None else encoder.embeddings
            with torch.no_grad():
                target.copy_(self.initial_embeddings(module, embedding, weight, dim).to(target))
        return delta

    def initial_embeddings(self, body: nn.Module, embedding: nn.Module, weight: Tensor, dim: int) -> Tensor:
        """(n, e): the initial prompt (prompt tuning) or encoder input (P-tuning), on the CPU."""
        n, vocab = self.num_virtual_tokens, weight.shape[0]
        if self.init == "random":
            # σ measured on a fixed sample of ids; the draw itself uses torch's generator, like every init
            sample = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[:_STD_SAMPLE]
            std = float(_embed(embedding, sample, weight.device).std())
            return torch.randn(n, dim) * std
        if self.init == "vocab":
            ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(self.init_seed))
            return _embed(embedding, ids, weight.device)
        ids = list(self.init_token_ids) if self.init_token_ids is not None else self._tokenize(body)
        bad = [i for i in ids if i >= vocab]
        if bad:
            raise ConfigError(f"init_token_ids holds {bad[0]}, outside the vocabulary of {vocab} tokens (ids 0..{vocab - 1})")
        ids = (ids * (n // len(ids) + 1))[:n]
        return _embed(embedding, torch.tensor(ids), weight.device)

    def _tokenize(self, body: nn.Module) -> list[int]:
        source = getattr(getattr(body, "config", None), "name_or_path", "") or ""
        if not source or not os.path.isdir(source):
            raise ConfigError(
                f"init_text needs the model's tokenizer, but model.config.name_or_path ({source!r}) is not a local "
                "directory; tokenize the text yourself and pass init_token_ids=[...] instead"
            )
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as exc:  # no tokenizer files there: say what to do instead
            raise ConfigError(f"cannot load a tokenizer from {source!r} for init_text ({exc}); pass init_token_ids=[...]") from exc
        ids = tokenizer(self.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError(f"init_text {self.init_text!r} gives no tokens")
        return list(ids)

    def link(self, built: dict[str, Any], anatomy) -> None:
        """One body: the prompt goes there. Two (an encoder-decoder): the prompt goes before the
        encoder's input and stays in its output; the decoder gets the cross-attention companion."""
        if len(built) == 1:
            (delta,) = built.values()
            delta.slots_right = delta.causal is False
            return
        paths = list(built)
        if len(built) == 2:
            # the decoder reads encoder states and is causal (or says nothing); the encoder is not
            def encoder_like(d: PromptDelta) -> bool:
                return d.causal is False or not d.reads_encoder

            def decoder_like(d: PromptDelta) -> bool:
                return d.reads_encoder and d.causal is not False

            pairs = [(e, d) for e, d in (paths, paths[::-1]) if encoder_like(built[e]) and decoder_like(built[d])]
            if len(pairs) == 1:
                encoder, decoder = pairs[0]
                built[encoder].strip = False
                built[encoder].slots_right = True
                built[decoder] = EncoderPromptMask(self, self.num_virtual_tokens)
                return
        raise TargetError(
            f"{self.method} is not supported on this model as it is: it found {len(built)} model bodies "
            f"({', '.join(paths)}) and cannot tell which one reads the tokens; pass targets=[<one of them>]"
        )


def _embed(embedding: nn.Module, ids: Tensor, device) -> Tensor:
    """The output of the model's own embedding module for ``ids`` (scaled embeddings included)."""
    with torch.no_grad():
        return embedding(ids.to(device).unsqueeze(0)).squeeze(0).float().cpu()


@register
@dataclasses.dataclass(frozen=True)
class PromptTuningConfig(PromptOptions):
    """Prompt tuning (module docstring): ``num_virtual_tokens`` trained input embeddings."""

    method: ClassVar[str] = "prompt"
    default_lr: ClassVar[float] = 3e-2  # plain embeddings want large steps (Lester et al. used 0.3 with Adafactor)


@register
@dataclasses.dataclass(frozen=True)
class PTuningConfig(PromptOptions):
    """P-tuning (module docstring): virtual tokens from a prompt encoder (``lstm`` or ``mlp``)."""

    method: ClassVar[str] = "ptuning"
    default_lr: ClassVar[float] = 1e-3

    encoder: str = "lstm"
    encoder_hidden_size: int = 256
    encoder_num_layers: int = 2

    def validate(self) -> None:
        super().validate()
        check_choice("encoder", self.encoder, ENCODERS)
        check_positive_int("encoder_hidden_size", self.encoder_hidden_size, "the prompt encoder's hidden units")
        check_positive_int("encoder_num_layers", self.encoder_num_layers, "LSTM layers of the prompt encoder")

    def make_source(self, dim: int, dtype, device) -> PromptEncoder:
        return PromptEncoder(self.num_virtual_tokens, dim, self.encoder, self.encoder_hidden_size,
                             self.encoder_num_layers, dtype, device)
