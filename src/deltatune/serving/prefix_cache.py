"""Keys and values of prompt prefixes, kept per delta so that later prompts starting with the same
tokens skip computing them (automatic prefix caching, as vLLM and SGLang do it).

Prompts are cut into blocks of ``block`` tokens. A block is stored once, under the tokens it holds
and the block before it, so a block stands for the whole prefix that ends with it and prompts that
share a prefix share its blocks (a chat template's system prompt is computed once per delta).
The key starts with the delta's name: a delta that changes keys and values (LoRA on the
attention projections, or on any layer below) gives other keys for the same tokens.

A block holds every layer's keys and values of its tokens as one tensor
(layers, 2, kv heads, block, head dim). Blocks are evicted least recently used first, once
their bytes exceed ``max_bytes``; a hit touches the path's blocks from the deepest to the first,
so a prefix's later blocks go before its earlier ones.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class _Block:
    id: int
    name: str | None
    kv: torch.Tensor  # (layers, 2, kv heads, block, head dim)


class PrefixCache:
    """Blocks of cached keys and values; :meth:`lookup` and :meth:`store` work on token lists."""

    def __init__(self, max_bytes: int, block: int = 16):
        if block < 1:
            raise ValueError(f"block must be at least 1 token, got {block}")
        self.max_bytes, self.block = max_bytes, block
        self.bytes = 0
        self._blocks: OrderedDict[tuple, _Block] = OrderedDict()
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._blocks)

    def _keys(self, name: str | None, tokens: list[int]):
        """The key of each whole block of ``tokens``, in order, while the blocks before it are held."""
        parent: tuple | int = ("delta", name)
        for start in range(0, len(tokens) - self.block + 1, self.block):
            key = (parent, tuple(tokens[start:start + self.block]))
            yield key
            held = self._blocks.get(key)
            if held is None:
                return
            parent = held.id

    def lookup(self, name: str | None, prompt: list[int]) -> torch.Tensor | None:
        """The cached keys and values of the longest held prefix of ``prompt`` that leaves at least
        its last token to compute, as (layers, 2, kv heads, length, head dim); None if none."""
        if self.max_bytes <= 0:
            return None
        found = []
        for key in self._keys(name, prompt[:-1]):
            if key not in self._blocks:
                break
            found.append(key)
        if not found:
            return None
        for key in reversed(found):
            self._blocks.move_to_end(key)
        return torch.cat([self._blocks[key].kv for key in found], dim=3)

    def next_missing(self, name: str | None, prompt: list[int]) -> tuple | None:
        """The key of the first block of ``prompt`` (last token left out) that is not held, if any:
        two prompts with the same one would compute the same block."""
        if self.max_bytes <= 0:
            return None
        for key in self._keys(name, prompt[:-1]):
            if key not in self._blocks:
                return key
        return None

    def store(self, name: str | None, prompt: list[int], kv: torch.Tensor) -> None:
        """Hold the whole blocks of ``prompt`` given ``kv``, its tokens' keys and values as
        (layers, 2, kv heads, len(prompt), head dim); blocks held already are only touched."""
        if self.max_bytes <= 0:
            return
        for number, key in enumerate(self._keys(name, prompt)):
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            part = kv[:, :, :, number * self.block:(number + 1) * self.block].clone()
            self._blocks[key] = _Block(next(self._ids), name, part)
            self.bytes += part.numel() * part.element_size()
        self._evict()

    def forget(self, name: str | None) -> None:
        """Drop every block of delta ``name`` (it is unloaded, or its weights changed)."""
        for key in [k for k, b in self._blocks.items() if b.name == name]:
            self._drop(key)

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self._blocks:
            self._drop(next(iter(self._blocks)))

    def _drop(self, key: tuple) -> None:
        block = self._blocks.pop(key)
        self.bytes -= block.kv.numel() * block.kv.element_size()
