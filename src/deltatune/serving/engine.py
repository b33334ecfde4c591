"""Continuous batching over many deltas on one base: the engine behind ``deltatune serve``.

One loop decodes every running sequence in one batch, whichever delta each one asked for
(:func:`deltatune.route` picks each row's delta; plain LoRA deltas run as two products per
layer batched over the deltas, their factors stacked once and kept across steps; a batch whose
rows all want one delta runs with it activated instead, its fastest path and the one
``deltatune generate`` takes). Between two decode steps finished sequences leave the batch and
waiting ones join:

* the batch keeps one transformers ``DynamicCache`` of :class:`BatchLayer` layers (buffers with
  spare rows and columns: a step writes its column in place, joining rows go into spare rows,
  a leaving row's place takes one of the last rows), **left-padded**: row b's keys and values
  sit at the right end of the time axis, ``mask[b]`` marks which columns are real, and each
  row's next position is its count of real tokens (as ``generate`` computes positions from a
  left-padded mask);
* joining sequences are prefilled in groups of similar prompt length (:func:`length_groups`;
  left-padded within a group, routed to their deltas), each prompt after its longest prefix
  that the prefix cache holds for its delta (:mod:`deltatune.serving.prefix_cache`), then
  their keys and values are written into the batch's spare rows, right-aligned (the batch
  widens on the left when they are longer); while the batch is at least half full a few
  joiners wait up to ``join_wait_steps`` steps for more, so that they join with one prefill;
* leaving rows' places take the last rows, and columns no remaining row uses are cut from the
  left.

Masked columns add exact zeros to attention, so a row computes what it computes alone, up to
the rounding of a longer reduction.

Deltas whose state is not their KV cache (prompt tuning and P-tuning put virtual tokens into
every routed row's cache; a side network keeps a cache of its own) cannot join or leave a
running batch nor start from cached prefixes; :meth:`Engine.load_delta` finds them by a
two-token probe and one more token from a copy of its cache, and refuses them.

The engine holds no HTTP: :mod:`deltatune.serving.app` puts one around it. It runs on one
thread (:meth:`Engine.run`); :meth:`Engine.submit` and the admin calls are safe from any other.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..api import activate, deactivate, delete, route
from ..errors import CheckpointError, ConfigError, DeltatuneError
from ..io import load
from ..layer import delta_layers
from ..train.evaluate import stop_token_ids
from ..upstream import cache_keyword
from .prefix_cache import PrefixCache

#: the ``model`` a request names to get the base model without any delta, besides the base's own name
BASE = None


class RequestError(DeltatuneError):
    """A request the engine cannot take; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens (OpenAI's fields; ``temperature`` 0 is greedy)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def validate(self, prompt_tokens: int, context: int) -> None:
        if self.max_tokens < 1:
            raise RequestError(400, f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if prompt_tokens + self.max_tokens > context:
            raise RequestError(400, f"max_tokens {self.max_tokens} plus the prompt's {prompt_tokens} tokens exceed the "
                                    f"model's context of {context} tokens", "max_tokens")
        if not (0 <= self.temperature <= 2) or math.isnan(self.temperature):
            raise RequestError(400, f"temperature must be between 0 and 2, got {self.temperature}", "temperature")
        if not (0 < self.top_p <= 1):
            raise RequestError(400, f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise RequestError(400, "stop takes at most 4 non-empty strings", "stop")


@dataclass(eq=False)  # one request is equal only to itself: the queue removes it by identity
class Sequence:
    """One request in the engine. ``emit`` receives ``("text", str)`` pieces as they become final,
    then one ``("done", finish_reason)`` or ``("error", message)``; it is called on the engine's thread."""

    model: str | None
    prompt: list[int]
    sampling: Sampling
    emit: Callable[[tuple[str, Any]], None]
    tokens: list[int] = field(default_factory=list)
    text: str = ""          # the answer so far, as final as the stop strings allow
    sent: int = 0           # characters of ``text`` already emitted
    cancelled: bool = False
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    cached_tokens: int = 0  # prompt tokens whose keys and values the prefix cache gave
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """The client went away: the engine drops the sequence at its next step."""
        self.cancelled = True


@dataclass
class Stats:
    """What the engine has done, for ``/v1/stats`` and the benchmark."""

    steps: int = 0                 # decode steps (one batched forward each)
    prefills: int = 0              # prefill forwards (each for one or more joining sequences)
    finished: int = 0
    generated_tokens: int = 0
    max_batch: int = 0             # most sequences in one decode step
    max_models_in_a_step: int = 0  # most distinct deltas (the base counts as one) in one decode step
    mixed_steps: int = 0           # decode steps whose rows used two or more deltas
    prompt_tokens: int = 0         # prompt tokens of the sequences prefilled
    cached_prompt_tokens: int = 0  # of those, tokens whose keys and values came from the prefix cache
    prefill_seconds: float = 0.0  # spent in prefill forwards and joining their rows to the batch
    decode_seconds: float = 0.0   # spent in decode steps

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class _Delta:
    path: str
    bytes: int
    in_use: int = 0       # waiting and running sequences that asked for it
    unloading: bool = False


class Engine:
    """Runs requests against ``model`` and its loaded deltas, in continuous mixed batches.

    ``mixed=False`` serves one delta at a time (a batch holds only sequences of one delta; when
    it empties the delta of the oldest waiting request goes next): what serving without
    mixed batches does, kept for comparison. ``gather_ms``: when a request finds the engine idle,
    wait up to that long for more to arrive, so a burst starts as one batch. ``join_wait_steps``:
    while the batch is at least half full, requests that could join wait up to that many decode
    steps for more, unless they fill its free rows. Limits: ``max_batch`` running sequences,
    ``max_waiting`` queued ones (more are refused with 503), ``max_deltas`` deltas holding at
    most ``max_delta_bytes`` of parameters together, ``prefix_cache_bytes`` of cached prompt
    prefixes' keys and values (:mod:`~deltatune.serving.prefix_cache`; 0: none).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, base_name: str, mixed: bool = True,
                 max_batch: int = 32, max_waiting: int = 256, max_deltas: int = 64,
                 max_delta_bytes: int = 2 * 2**30, gather_ms: float = 0.0, prefix_cache_bytes: int = 512 * 2**20,
                 join_wait_steps: int = 2):
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has neither a pad nor an EOS token to pad batches with")
        self.model = model.eval()
        self.tokenizer = tokenizer
        #: held around every use of the tokenizer: a fast tokenizer is not safe from two threads at once
        self.tokenizer_lock = threading.Lock()
        self.base_name = base_name
        self.mixed = mixed
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.max_deltas, self.max_delta_bytes = max_deltas, max_delta_bytes
        self.gather_seconds = gather_ms / 1000
        self.join_wait_steps = join_wait_steps
        self._held_steps = 0  # decode steps that waiting requests have been held back from joining
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_ids = set(stop_token_ids(model, tokenizer))
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 2**31)
        self.device = next(model.parameters()).device
        self._cache_keyword = cache_keyword(model.forward)
        self.deltas: dict[str, _Delta] = {}
        self.stats = Stats()
        self._lock = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._admin: deque[tuple[Callable[[], Any], Future, str | None]] = deque()
        self._stopping = False
        # the running batch: its sequences, the cache, which cache columns are real per row,
        # the token each row feeds next and each row's count of real tokens in the cache
        self._running: list[Sequence] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None
        self._lengths: torch.Tensor | None = None
        self._check_cache_kind()
        deactivate(self.model)
        self._active: str | None = None  # the delta activated for batches of one delta
        self._routing = contextlib.ExitStack()  # holds the route() of the rows decoding now, if mixed
        self._routed_names: list[str | None] | None = None
        #: the layers' stacked low-rank factors, kept across routings (route()'s stacks); emptied when deltas change
        self._stacks: dict = {}

    # --- requests (any thread) ------------------------------------------------------------------

    def resolve(self, model_name: str | None) -> str | None:
        """The delta a request's ``model`` names (None: the base); 404 for anything else."""
        if model_name in (None, "", self.base_name):
            return BASE
        delta = self.deltas.get(model_name)
        if delta is None or delta.unloading:
            known = ", ".join([self.base_name, *self.models()[1:]])
            raise RequestError(404, f"model {model_name!r} is not served here; models: {known}", "model")
        return model_name

    def models(self) -> list[str]:
        """The base's name, then every loaded delta."""
        return [self.base_name, *(n for n, d in self.deltas.items() if not d.unloading)]

    def submit(self, sequence: Sequence) -> None:
        """Queue a sequence; 404 if its delta went away, 503 when the queue is full."""
        sequence.sampling.validate(len(sequence.prompt), self.context)
        if not sequence.prompt:
            raise RequestError(400, "the prompt is empty", "prompt")
        if sequence.sampling.temperature > 0:
            sequence.generator = torch.Generator()
            if sequence.sampling.seed is not None:
                sequence.generator.manual_seed(sequence.sampling.seed)
            else:
                sequence.generator.seed()
        with self._lock:
            if self._stopping:
                raise RequestError(503, "the server is shutting down")
            if sequence.model is not None:
                self.resolve(sequence.model)
            if len(self._waiting) >= self.max_waiting:
                raise RequestError(503, f"{len(self._waiting)} requests are waiting already (--max-waiting "
                                        f"{self.max_waiting}); retry shortly")
            if sequence.model is not None:
                self.deltas[sequence.model].in_use += 1
            self._waiting.append(sequence)
            self._lock.notify_all()

    # --- admin (any thread; done by the engine's thread between steps) --------------------------

    def load_delta(self, name: str, path: str | Path) -> Future:
        """Load a saved delta under ``name``; the future gives its parameter bytes or the error."""
        with self._lock:
            if name == self.base_name or name in self.deltas:
                raise RequestError(409, f"a model named {name!r} is served already; unload it first", "name")
        return self._run_admin(lambda: self._load(name, Path(path)))

    def unload_delta(self, name: str) -> Future:
        """Stop taking requests for ``name`` and delete it once its running requests are answered."""
        with self._lock:
            delta = self.deltas.get(name)
            if delta is None or delta.unloading:
                raise RequestError(404, f"no delta named {name!r} is loaded; loaded: {', '.join(self.models()[1:]) or 'none'}", "name")
            delta.unloading = True
        return self._run_admin(lambda: self._unload(name), waits_for=name)

    def _run_admin(self, action: Callable[[], Any], waits_for: str | None = None) -> Future:
        future: Future = Future()
        with self._lock:
            self._admin.append((action, future, waits_for))
            self._lock.notify_all()
        return future

    def _load(self, name: str, path: Path) -> int:
        if len(self.deltas) >= self.max_deltas:
            raise RequestError(409, f"{len(self.deltas)} deltas are loaded, the most this server holds (--max-deltas "
                                    f"{self.max_deltas}); unload one first")
        if not path.exists():
            raise RequestError(400, f"delta directory {str(path)!r} does not exist", "path")
        names = load(self.model, path, name, activate=False)
        try:
            if names != [name]:
                raise CheckpointError(f"{str(path)!r} holds {len(names)} deltas; give one delta directory per name")
            size = sum(p.numel() * p.element_size() for layer in delta_layers(self.model).values()
                       if name in layer.deltas for p in layer.deltas[name].parameters())
            held = sum(d.bytes for d in self.deltas.values())
            if held + size > self.max_delta_bytes:
                raise RequestError(409, f"delta {name!r} holds {size} bytes of parameters and the loaded deltas {held}; "
                                        f"together over --max-delta-bytes {self.max_delta_bytes}; unload one first")
            self._probe(name)
        except Exception:
            for loaded in names:
                delete(self.model, loaded)
            raise
        with self._lock:
            self.deltas[name] = _Delta(str(path), size)
        return size

    def _unload(self, name: str) -> None:
        if self._active == name:
            self._use(None)
        delete(self.model, name)
        self.prefix_cache.forget(name)
        with self._lock:
            del self.deltas[name]

    def _probe(self, name: str) -> None:
        """Refuse a delta whose rows do not keep one cache column per token (prompt tuning), or
        that keeps state beside the KV cache (a side network's own cache): the engine rebuilds
        caches when rows join and leave, and fills them from the prefix cache."""
        ids = torch.tensor([[self.pad_id, self.pad_id]], device=self.device)
        cache = self._new_cache()
        with torch.no_grad(), route(self.model, [name]):
            self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                       **{self._cache_keyword: cache})
            if cache.get_seq_length() != ids.shape[1]:
                raise ConfigError(f"delta {name!r} ({type(self._config_of(name)).__name__}) puts virtual tokens into "
                                  "the KV cache, so its requests cannot join or leave a running batch; serve its merged "
                                  "model or another method")
            following = {"input_ids": ids[:, :1], "attention_mask": torch.ones_like(ids[:, :1]).repeat(1, 3),
                         "position_ids": torch.tensor([[2]], device=self.device), "use_cache": True}
            rebuilt = self._cache_holding(_cache_tensors(cache))
            try:
                continued = self.model(**following, **{self._cache_keyword: rebuilt}).logits
            except DeltatuneError as exc:
                raise ConfigError(f"delta {name!r} ({type(self._config_of(name)).__name__}) keeps state beside the KV "
                                  f"cache, so its requests cannot join or leave a running batch ({exc}); serve its merged "
                                  "model or another method") from None
            if not torch.allclose(continued, self.model(**following, **{self._cache_keyword: cache}).logits,
                                  atol=1e-4, rtol=1e-4):
                raise ConfigError(f"delta {name!r} ({type(self._config_of(name)).__name__}) computes differently from a "
                                  "copy of its KV cache, so its requests cannot join or leave a running batch")

    def _config_of(self, name: str):
        return next(layer.deltas[name].config for layer in delta_layers(self.model).values() if name in layer.deltas)

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until :meth:`stop`; every sequence gets its ``done`` or ``error``."""
        while True:
            with self._lock:
                while not (self._stopping or self._waiting or self._admin or self._running):
                    self._lock.wait()
                if self._stopping:
                    break
                if self.gather_seconds and not self._running and not self._admin:
                    deadline = time.monotonic() + self.gather_seconds
                    while (len(self._waiting) < self.max_batch and not self._stopping
                           and (left := deadline - time.monotonic()) > 0):
                        self._lock.wait(left)
            self.step()
        self._end_routing()
        failed = self._running + list(self._waiting)
        self._running, self._waiting = [], deque()
        for sequence in failed:
            sequence.emit(("error", "the server shut down before the answer was complete"))

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()

    def step(self) -> None:
        """Admin work that can go now, then joining sequences' prefill, then one decode step."""
        self._do_admin()
        self._drop([s.cancelled for s in self._running])
        joining = self._admit()
        try:
            if joining:
                started = time.perf_counter()
                cached = [self.prefix_cache.lookup(s.model, s.prompt) for s in joining]
                rest = [len(s.prompt) - (0 if kv is None else kv.shape[3]) for s, kv in zip(joining, cached)]
                for group in length_groups(rest, PREFILL_FORWARD_TOKENS):
                    self._prefill([joining[i] for i in group], [cached[i] for i in group])
                self.stats.prefill_seconds += time.perf_counter() - started
            if self._running:
                started = time.perf_counter()
                self._decode()
                self.stats.decode_seconds += time.perf_counter() - started
        except Exception as exc:  # noqa: BLE001 - every request in the batch is answered, the loop goes on
            message = str(exc) if isinstance(exc, DeltatuneError) else f"{type(exc).__name__}: {exc}"
            for sequence in self._running + joining:
                if sequence.finish_reason is None:
                    sequence.finish_reason = "error"
                    sequence.emit(("error", f"generation failed: {message}"))
                    self._release(sequence)
            self._end_routing()
            self._reset_batch()

    def _do_admin(self) -> None:
        with self._lock:
            todo = list(self._admin)
            self._admin.clear()
        if todo:
            self._end_routing()  # deltas are attached and deleted outside any routing
            self._stacks.clear()
        done = []
        for action, future, waits_for in todo:
            if waits_for is not None and self.deltas[waits_for].in_use:
                with self._lock:  # its requests are still being answered: try again after this step
                    self._admin.append((action, future, waits_for))
                continue
            try:
                done.append((future, action()))
            except Exception as exc:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(exc)
        if done:
            self._stack_deltas()
        for future, result in done:
            future.set_result(result)

    def _stack_deltas(self) -> None:
        """Stack the loaded deltas' low-rank factors now (route()'s stacks), by one token routed to
        each, rather than in the first mixed batch that meets them."""
        names = [name for name, delta in self.deltas.items() if not delta.unloading]
        if not self.mixed or len(names) < 2:
            return
        ids = torch.full((len(names), 1), self.pad_id, dtype=torch.long, device=self.device)
        with torch.no_grad(), route(self.model, names, stacks=self._stacks):
            self.model(input_ids=ids, use_cache=False)

    def _admit(self) -> list[Sequence]:
        with self._lock:
            room = self.max_batch - len(self._running)
            if self.mixed:
                taken = list(itertools.islice(self._waiting, room))
            else:
                current = self._running[0].model if self._running else (self._waiting[0].model if self._waiting else None)
                taken = [s for s in self._waiting if s.model == current][:room]
            # each join costs a prefill forward, whose fixed cost is about a decode step's: while the
            # batch is at least half full a few joiners wait a few steps for more, to share one
            if (taken and len(taken) < room and len(self._running) >= self.max_batch / 2
                    and self._held_steps < self.join_wait_steps):
                self._held_steps += 1
                return []
            self._held_steps = 0
            if self.mixed:  # the first ones
                for _ in taken:
                    self._waiting.popleft()
            else:
                for sequence in taken:
                    self._waiting.remove(sequence)
        taken = [s for s in taken if not self._finish_if_cancelled(s)]
        # a joiner whose prompt's next uncached block another joiner computes now waits one step
        # and then finds it cached (a burst of requests sharing a system prompt computes it once)
        claimed, now, later = set(), [], []
        for sequence in taken:
            block = self.prefix_cache.next_missing(sequence.model, sequence.prompt)
            (later if block is not None and block in claimed else now).append(sequence)
            claimed.add(block)
        if later:
            with self._lock:
                self._waiting.extendleft(reversed(later))
        return now

    def _finish_if_cancelled(self, sequence: Sequence) -> bool:
        if sequence.cancelled:
            sequence.finish_reason = "cancelled"
            sequence.emit(("done", "cancelled"))
            self._release(sequence)
        return sequence.cancelled

    def _release(self, sequence: Sequence) -> None:
        if sequence.model is not None:
            with self._lock:
                self.deltas[sequence.model].in_use -= 1

    # --- the model -----------------------------------------------------------------------------

    def _new_cache(self):
        return self._cache_holding(None)

    def _cache_holding(self, pairs: list[tuple[torch.Tensor, torch.Tensor]] | None):
        """A cache of :class:`BatchLayer` layers, empty or holding ``pairs`` (keys, values) per layer."""
        cache = DynamicCache(config=self.model.config)
        cache.layers = [BatchLayer() for _ in cache.layers]
        for layer, (keys, values) in zip(cache.layers, pairs or []):
            layer.hold(keys, values)
        return cache

    def _check_cache_kind(self) -> None:
        layers = getattr(self._new_cache(), "layers", None)
        if not layers or any(layer.is_sliding for layer in layers):
            raise ConfigError(f"{type(self.model).__name__} keeps a sliding-window or recurrent cache; deltatune serve "
                              "batches models whose cache keeps every token (Llama, Qwen2, GPT-2, ...)")

    def _forward(self, names: list[str | None], ids, mask, positions, cache) -> torch.Tensor:
        if len(set(names)) == 1:  # one delta for every row: activated, it takes its fastest path
            self._end_routing()
            self._use(names[0])
        elif names != self._routed_names:
            # the routing stays on while the batch's rows stay the same, so its per-layer plans
            # and row groups serve every step until a sequence joins or leaves; the stacked
            # factors (self._stacks) outlive it
            self._end_routing()
            self._routing.enter_context(route(self.model, names, stacks=self._stacks))
            self._routed_names = list(names)
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **{self._cache_keyword: cache})
        return out.logits[:, -1, :].float()

    def _end_routing(self) -> None:
        self._routing.close()
        self._routed_names = None

    def _use(self, name: str | None) -> None:
        """Make ``name`` the one active delta (None: none), if it is not already."""
        if name != self._active:
            if name is None:
                deactivate(self.model)
            else:
                activate(self.model, name)
            self._active = name

    def _prefill(self, joining: list[Sequence], cached: list[torch.Tensor | None]) -> None:
        """Run the joiners' prompts, each after its cached prefix (``cached``: its keys and values,
        or None): the cached keys and values right-aligned in the cache's first columns, the rest
        of each prompt right-aligned after them (columns between the two are masked), then stack
        them under the batch."""
        done = [0 if kv is None else kv.shape[3] for kv in cached]
        width, prefix = max(len(s.prompt) - d for s, d in zip(joining, done)), max(done)
        ids = torch.full((len(joining), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(joining), prefix + width), dtype=torch.long)
        for row, (sequence, skipped) in enumerate(zip(joining, done)):
            rest = sequence.prompt[skipped:]
            ids[row, width - len(rest):] = torch.tensor(rest)
            mask[row, prefix - skipped:prefix] = 1
            mask[row, prefix + width - len(rest):] = 1
            sequence.cached_tokens = skipped
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, prefix:]  # as generate computes them
        cache = self._cache_from(cached, prefix, room=width) if prefix else self._new_cache()
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        logits = self._forward([s.model for s in joining], ids, mask, positions, cache)
        self.stats.prefills += 1
        self.stats.prompt_tokens += sum(len(s.prompt) for s in joining)
        self.stats.cached_prompt_tokens += sum(done)
        self._remember_prefixes(joining, cache, mask)
        tokens = self._sample(joining, logits)
        lengths = mask.sum(-1)
        keep = [row for row, s in enumerate(joining) if not self._advance(s, int(tokens[row]))]
        if not keep:
            return
        index = torch.tensor(keep, device=self.device)
        if len(keep) < len(joining):
            cache = self._cache_holding([(k.index_select(0, index), v.index_select(0, index)) for k, v in _cache_tensors(cache)])
        self._join([joining[r] for r in keep], cache, mask.index_select(0, index), tokens.index_select(0, index),
                   lengths.index_select(0, index))

    def _cache_from(self, cached: list[torch.Tensor | None], width: int, room: int):
        """A cache holding each row's cached prefix, right-aligned in ``width`` columns, with room
        for ``room`` more (the rest of the prompts)."""
        like = next(kv for kv in cached if kv is not None)
        rows = torch.stack([_left_pad(kv if kv is not None else like[:, :, :, :0], width, 3) for kv in cached], 2)
        cache = self._new_cache()
        for layer, (keys, values) in zip(cache.layers, rows.to(self.device)):
            layer.hold(keys, values, room)
        return cache

    def _remember_prefixes(self, joining: list[Sequence], cache, mask: torch.Tensor) -> None:
        """Put the prompts' keys and values into the prefix cache, where it does not hold them yet."""
        if self.prefix_cache.max_bytes <= 0:
            return
        layers = _cache_tensors(cache)
        for row, sequence in enumerate(joining):
            if self.prefix_cache.held_length(sequence.model, sequence.prompt) == len(sequence.prompt):
                continue
            columns = mask[row].nonzero().squeeze(1)  # the prompt's tokens, in order
            kv = torch.stack([torch.stack([k[row].index_select(1, columns), v[row].index_select(1, columns)])
                              for k, v in layers])
            self.prefix_cache.store(sequence.model, sequence.prompt, kv)

    def _decode(self) -> None:
        mask = torch.cat([self._mask, self._mask.new_ones(len(self._running), 1)], 1)
        logits = self._forward([s.model for s in self._running], self._pending.unsqueeze(1), mask,
                               self._lengths.unsqueeze(1), self._cache)
        self._mask, self._lengths = mask, self._lengths + 1
        stats = self.stats
        stats.steps += 1
        stats.max_batch = max(stats.max_batch, len(self._running))
        models = len({s.model for s in self._running})
        stats.max_models_in_a_step = max(stats.max_models_in_a_step, models)
        stats.mixed_steps += models > 1
        self._pending = self._sample(self._running, logits)
        self._drop([self._advance(s, token) for s, token in zip(self._running, self._pending.tolist())])

    def _sample(self, sequences: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        chosen = logits.argmax(-1)
        for row, sequence in enumerate(sequences):
            sampling = sequence.sampling
            if sampling.temperature == 0:
                continue
            probs = torch.softmax(logits[row] / sampling.temperature, -1).cpu()
            if sampling.top_p < 1:
                ordered, order = probs.sort(descending=True)
                outside = ordered.cumsum(-1) - ordered >= sampling.top_p  # tokens after the nucleus is full
                probs = probs.scatter(0, order[outside], 0.0)
            chosen[row] = torch.multinomial(probs, 1, generator=sequence.generator).item()
        return chosen

    def _advance(self, sequence: Sequence, token: int) -> bool:
        """Take the sequence's new token; whether the sequence finished."""
        if sequence.cancelled:
            return self._finish(sequence, "cancelled")
        if token in self.stop_ids:
            return self._finish(sequence, "stop")
        sequence.tokens.append(token)
        self.stats.generated_tokens += 1
        with self.tokenizer_lock:
            text = self.tokenizer.decode(sequence.tokens, skip_special_tokens=True)
        stops = [i for i in (text.find(s) for s in sequence.sampling.stop) if i >= 0]
        if stops:
            sequence.text = text[:min(stops)]
            return self._finish(sequence, "stop")
        sequence.text = text
        if len(sequence.tokens) >= sequence.sampling.max_tokens:
            return self._finish(sequence, "length")
        final = len(text) - _held_back(text, sequence.sampling.stop)
        if final > sequence.sent:
            sequence.emit(("text", text[sequence.sent:final]))
            sequence.sent = final
        return False

    def _finish(self, sequence: Sequence, reason: str) -> bool:
        if len(sequence.text) > sequence.sent:
            sequence.emit(("text", sequence.text[sequence.sent:]))
            sequence.sent = len(sequence.text)
        sequence.finish_reason = reason
        self.stats.finished += 1
        self._release(sequence)
        sequence.emit(("done", reason))
        return True

    # --- the batch's cache ---------------------------------------------------------------------

    def _join(self, joining: list[Sequence], cache, mask: torch.Tensor, pending: torch.Tensor,
              lengths: torch.Tensor) -> None:
        if not self._running:
            self._running, self._cache, self._mask, self._pending, self._lengths = joining, cache, mask, pending, lengths
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for layer, (keys, values) in zip(self._cache.layers, _cache_tensors(cache)):
            layer.add_rows(keys, values, self.max_batch)
        self._mask = torch.cat([_left_pad(self._mask, width, -1), _left_pad(mask, width, -1)])
        self._running = self._running + joining
        self._pending = torch.cat([self._pending, pending])
        self._lengths = torch.cat([self._lengths, lengths])

    def _drop(self, finished: list[bool]) -> None:
        """Remove the rows that ``finished`` marks from the running batch: each leaving row's place
        among the rows that stay takes one of the last rows, so only those move."""
        rows = len(finished) - sum(finished)
        if rows == len(self._running):
            return
        for row, sequence in enumerate(self._running):
            if finished[row] and sequence.finish_reason is None:  # cancelled between two steps
                self._finish(sequence, "cancelled")
        if not rows:
            self._reset_batch()
            return
        targets = [row for row in range(rows) if finished[row]]
        sources = [row for row in range(rows, len(finished)) if not finished[row]]
        order = list(range(rows))
        for target, source in zip(targets, sources):
            order[target] = source
        targets_index, sources_index = (torch.tensor(t, dtype=torch.long, device=self.device) for t in (targets, sources))
        for layer in self._cache.layers:
            layer.move_rows(targets_index, sources_index, rows)
        index = torch.tensor(order, device=self.device)
        self._running = [self._running[r] for r in order]
        self._mask, self._pending, self._lengths = (t.index_select(0, index) for t in (self._mask, self._pending, self._lengths))
        unused = int((self._mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns no row uses
        if unused:
            for layer in self._cache.layers:
                layer.drop_columns(unused)
            self._mask = self._mask[:, unused:]

    def _reset_batch(self) -> None:
        self._running, self._cache, self._mask, self._pending, self._lengths = [], None, None, None, None


class BatchLayer(DynamicLayer):
    """A transformers cache layer whose keys and values are the views ``buffers[:rows, :, start:end]``
    into zero-filled buffers with spare rows and columns, so that the running batch is never
    copied whole: a forward's new columns are written in place after ``end`` (:meth:`update`,
    where ``DynamicLayer`` copies the whole layer into a new tensor), joining rows go into spare
    rows (:meth:`add_rows`), a leaving row's place takes one of the last rows (:meth:`move_rows`;
    the engine reorders its own per-row state alike) and columns no row uses any more are cut
    from the left by moving ``start`` (:meth:`drop_columns`). Columns a row does not use hold
    zeros or an earlier row's finite values; the mask hides them (a NaN there would not be
    hidden: a zero attention weight times NaN is NaN). A layer given other tensors (by
    transformers' own cache methods) moves them into new buffers at its next update."""

    def hold(self, keys: torch.Tensor, values: torch.Tensor, room: int = 0) -> None:
        """Start over from ``keys`` and ``values`` (copied into new buffers with room for ``room``
        more columns, and spare ones)."""
        self.lazy_initialization(keys, values)
        self.buffers = tuple(_spare_buffer(t, t.shape[0], t.shape[-2] + room) for t in (keys, values))
        self.rows, self.start, self.end = keys.shape[0], 0, keys.shape[-2]
        self._write(keys, values, 0)
        self._refresh()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[-2]
        if not self.is_initialized or getattr(self, "views", None) is None \
                or self.views[0] is not self.keys or self.views[1] is not self.values:
            held = self.is_initialized and self.keys is not None and self.keys.numel() > 0
            self.hold(*((self.keys, self.values) if held else (key_states[..., :0, :], value_states[..., :0, :])), room=new)
        self._make_room(rows=self.rows, before=0, after=new)
        self._write(key_states, value_states, self.end)
        self.end += new
        self._refresh()
        return self.keys, self.values

    def add_rows(self, keys: torch.Tensor, values: torch.Tensor, max_rows: int) -> None:
        """Put ``keys`` and ``values`` (new rows, right-aligned like the batch's) under the batch's
        rows, widening the batch on the left when they are longer; buffers that must grow get
        room for ``max_rows`` rows."""
        width = keys.shape[-2]
        before = max(0, width - (self.end - self.start))
        self._make_room(rows=max(self.rows + keys.shape[0], max_rows), before=before, after=0)
        self.start -= before
        for buffer, new in zip(self.buffers, (keys, values)):
            buffer[self.rows:self.rows + new.shape[0], :, self.end - width:self.end] = new
        self.rows += keys.shape[0]
        self._refresh()

    def move_rows(self, targets: torch.Tensor, sources: torch.Tensor, rows: int) -> None:
        """Copy rows ``sources`` into rows ``targets``, then keep the first ``rows``."""
        if len(targets):
            for buffer in self.buffers:
                live = buffer[:, :, self.start:self.end]
                live.index_copy_(0, targets, live.index_select(0, sources))
        self.rows = rows
        self._refresh()

    def drop_columns(self, count: int) -> None:
        """Forget the first ``count`` columns."""
        self.start += count
        self._refresh()

    def _make_room(self, rows: int, before: int, after: int) -> None:
        """Buffers with ``rows`` rows, ``before`` free columns before ``start`` and ``after`` after
        ``end``: the current ones if they have them, else new ones that the live part moves into."""
        keys, _ = self.buffers
        if rows <= keys.shape[0] and before <= self.start and self.end + after <= keys.shape[2]:
            return
        width = self.end - self.start
        fresh = tuple(_spare_buffer(old, max(rows, old.shape[0]), before + width + after) for old in self.buffers)
        for old, new in zip(self.buffers, fresh):
            new[:self.rows, :, before:before + width] = old[:self.rows, :, self.start:self.end]
        self.buffers, self.start, self.end = fresh, before, before + width

    def _write(self, keys: torch.Tensor, values: torch.Tensor, column: int) -> None:
        for buffer, new in zip(self.buffers, (keys, values)):
            buffer[:self.rows, :, column:column + new.shape[-2]] = new

    def _refresh(self) -> None:
        keys, values = self.buffers
        self.keys = keys[:self.rows, :, self.start:self.end]
        self.values = values[:self.rows, :, self.start:self.end]
        self.views = (self.keys, self.values)


def _spare_buffer(like: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """Zeros shaped as ``like`` but with ``rows`` rows and ``columns`` columns plus a quarter more
    (at least 16), so that the following steps' columns fit without moving the layer again."""
    return like.new_zeros((rows, *like.shape[1:-2], columns + max(16, columns // 4), like.shape[-1]))


#: what one more prefill forward costs beyond its tokens, in padded prompt tokens: joiners are
#: split into groups of similar length where padding them to one width would cost more
PREFILL_FORWARD_TOKENS = 32


def length_groups(lengths: list[int], forward_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` in groups, each run as one forward padded to its longest, chosen to
    minimise the sum over groups of ``forward_tokens`` + rows × longest (runs of the lengths in
    decreasing order, by dynamic programming)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = [0] + [math.inf] * len(order)  # best[j]: cost of the first j rows of ``order``
    start = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):
            cost = best[i] + forward_tokens + (j - i) * lengths[order[i]]
            if cost < best[j]:
                best[j], start[j] = cost, i
    groups, j = [], len(order)
    while j:
        groups.append(order[start[j]:j])
        j = start[j]
    return groups[::-1]


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _left_pad(tensor: torch.Tensor, width: int, dim: int = -2) -> torch.Tensor:
    """``tensor`` with zeros before it along ``dim`` up to ``width``."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` may still become part of a stop string (or of
    a character whose bytes are not all decoded yet), so are not sent yet."""
    held = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                held = max(held, size)
                break
    return held
