"""Keys and values of prompt prefixes, kept per delta so that later prompts starting with the same
tokens skip computing them (automatic prefix caching, as vLLM and SGLang do it).

Prompts are cut into blocks of ``block`` tokens. A block is stored once, under the tokens it holds
and the block before it, so a block stands for the whole prefix that ends with it and prompts that
share a prefix share its blocks (a chat template's system prompt is computed once per delta).
The key starts with the delta's name: a delta that changes keys and values (LoRA on the
attention projections, or on any layer below) gives other keys for the same tokens. A prompt's
last, partial block is stored too, and a lookup that runs out of whole blocks takes the longest
common beginning of any block held after the same prefix, so a prefix is reused to the token
(as SGLang's radix cache does), not only to the last whole block: a system prompt that ends
mid-block, or the same prompt sent again, computes only what is new.

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
        #: the keys of the blocks held after each parent (a block's id, or the delta's root)
        self._children: dict[tuple | int, set[tuple]] = {}
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
        found, partial, shared = self._match(name, prompt[:-1])
        if partial is not None:
            self._blocks.move_to_end(partial)
        for key in reversed(found):
            self._blocks.move_to_end(key)
        parts = [self._blocks[key].kv for key in found]
        if partial is not None:
            parts.append(self._blocks[partial].kv[:, :, :, :shared])
        return torch.cat(parts, dim=3) if parts else None

    def held_length(self, name: str | None, tokens: list[int]) -> int:
        """How many of ``tokens``' first tokens the cache holds keys and values for."""
        found, _, shared = self._match(name, tokens)
        return len(found) * self.block + shared

    def _match(self, name: str | None, tokens: list[int]) -> tuple[list[tuple], tuple | None, int]:
        """The keys of the whole blocks held for ``tokens``, then of the block held after them that
        shares the most of the tokens left (None if none does) and how many it shares."""
        found = []
        for key in self._keys(name, tokens):
            if key not in self._blocks:
                break
            found.append(key)
        parent = self._blocks[found[-1]].id if found else ("delta", name)
        rest = tokens[len(found) * self.block:]
        shared, partial = 0, None
        for key in self._children.get(parent, ()) if rest else ():
            common = _common_length(key[1], rest)
            if common > shared:
                shared, partial = common, key
        return found, partial, shared

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
        """Hold the blocks of ``prompt`` given ``kv``, its tokens' keys and values as
        (layers, 2, kv heads, len(prompt), head dim): its whole blocks, then what is left after
        them unless a held block after the same prefix begins with it (a held partial block
        that it extends is replaced). Blocks held already are only touched."""
        if self.max_bytes <= 0:
            return
        parent: tuple | int = ("delta", name)
        whole = 0
        for number, key in enumerate(self._keys(name, prompt)):
            if key not in self._blocks:
                self._add(key, parent, name, kv[:, :, :, number * self.block:(number + 1) * self.block])
            self._blocks.move_to_end(key)
            parent, whole = self._blocks[key].id, number + 1
        tail = tuple(prompt[whole * self.block:])
        if tail and not any(_common_length(key[1], tail) == len(tail) for key in self._children.get(parent, ())):
            self._add((parent, tail), parent, name, kv[:, :, :, whole * self.block:])
        self._evict()

    def _add(self, key: tuple, parent: tuple | int, name: str | None, kv: torch.Tensor) -> None:
        """Hold ``kv`` under ``key``; a partial block after the same parent that it begins with goes."""
        for shorter in [k for k in self._children.get(parent, ()) if _common_length(k[1], key[1]) == len(k[1])]:
            self._drop(shorter)
        block = _Block(next(self._ids), name, kv.clone())
        self._blocks[key] = block
        self._children.setdefault(parent, set()).add(key)
        self.bytes += block.kv.numel() * block.kv.element_size()

    def forget(self, name: str | None) -> None:
        """Drop every block of delta ``name`` (it is unloaded, or its weights changed)."""
        for key in [k for k, b in self._blocks.items() if b.name == name]:
            self._drop(key)

    def clear(self) -> None:
        self._blocks.clear()
        self._children.clear()
        self.bytes = 0

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self._blocks:
            self._drop(next(iter(self._blocks)))

    def _drop(self, key: tuple) -> None:
        block = self._blocks.pop(key)
        self.bytes -= block.kv.numel() * block.kv.element_size()
        siblings = self._children[key[0]]
        siblings.discard(key)
        if not siblings:
            del self._children[key[0]]


def _common_length(first: tuple, second) -> int:
    """How many tokens ``first`` and ``second`` share from their start."""
    for index, (a, b) in enumerate(zip(first, second)):
        if a != b:
            return index
    return min(len(first), len(second))
