"""The serving engine's prefix cache: blocks keyed by delta and by every token before them,
the longest held prefix that leaves a token to compute (to the token, partial blocks included),
least-recently-used eviction."""

import torch

from deltatune.serving.prefix_cache import PrefixCache

LAYERS, HEADS, DIM = 2, 3, 4


def kv_of(tokens: list[int]) -> torch.Tensor:
    """Keys and values standing for ``tokens``: each position's entries equal its token."""
    return torch.tensor(tokens, dtype=torch.float32).view(1, 1, 1, -1, 1).expand(LAYERS, 2, HEADS, -1, DIM).clone()


def block_bytes(block: int) -> int:
    return LAYERS * 2 * HEADS * block * DIM * 4


def test_lookup_gives_the_longest_held_prefix_that_leaves_the_last_token():
    cache = PrefixCache(max_bytes=10**9, block=4)
    prompt = list(range(10, 20))  # 10 tokens: blocks [0, 4) and [4, 8), then the partial [8, 10)
    cache.store("a", prompt, kv_of(prompt))
    assert len(cache) == 3 and cache.bytes == 2 * block_bytes(4) + block_bytes(2)
    found = cache.lookup("a", prompt)  # the same prompt again: all but its last token
    assert found.shape == (LAYERS, 2, HEADS, 9, DIM) and torch.equal(found[0, 0, 0, :, 0], torch.arange(10.0, 19.0))
    assert cache.held_length("a", prompt) == 10 and cache.held_length("a", prompt + [5]) == 10
    assert cache.lookup("a", prompt[:8]).shape[3] == 7  # the second block's first 3 tokens
    assert cache.lookup("a", prompt[:5]).shape[3] == 4
    assert cache.lookup("a", prompt[:4]).shape[3] == 3
    assert cache.lookup("a", prompt[:1]) is None
    assert cache.lookup("a", [99, 11, 12, 13, 14]) is None  # the first token differs
    found = cache.lookup("a", [10, 11, 12, 99, 14, 15, 16, 17, 18])  # the first block's first 3 tokens
    assert torch.equal(found[1, 1, 2, :, 3], torch.tensor([10.0, 11, 12]))
    assert cache.lookup("a", [10, 11, 12, 13, 14, 15, 16, 99, 18]).shape[3] == 7
    assert cache.lookup("b", prompt) is None and cache.lookup(None, prompt) is None  # per delta


def test_partial_blocks_are_kept_once_and_replaced_by_what_extends_them():
    cache = PrefixCache(max_bytes=10**9, block=4)
    cache.store("a", [1, 2, 3, 4, 5, 6], kv_of([1, 2, 3, 4, 5, 6]))  # [1 2 3 4], then [5 6]
    cache.store("a", [1, 2, 3, 4, 5], kv_of([1, 2, 3, 4, 5]))  # [5] begins [5 6]: nothing new
    assert len(cache) == 2 and cache.bytes == block_bytes(4) + block_bytes(2)
    cache.store("a", [1, 2, 3, 4, 5, 6, 7], kv_of([1, 2, 3, 4, 5, 6, 7]))  # [5 6 7] replaces [5 6]
    assert len(cache) == 2 and cache.bytes == block_bytes(4) + block_bytes(3)
    cache.store("a", [1, 2, 3, 4, 5, 0], kv_of([1, 2, 3, 4, 5, 0]))  # a sibling: both kept
    assert len(cache) == 3 and cache.lookup("a", [1, 2, 3, 4, 5, 0, 9]).shape[3] == 6
    cache.store("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], kv_of([1, 2, 3, 4, 5, 6, 7, 8, 9]))  # a whole block replaces [5 6 7]
    assert len(cache) == 4 and cache.bytes == 2 * block_bytes(4) + block_bytes(2) + block_bytes(1)
    found = cache.lookup("a", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert torch.equal(found[0, 1, 0, :, 0], torch.arange(1.0, 10.0))


def test_blocks_are_shared_and_stand_for_everything_before_them():
    cache = PrefixCache(max_bytes=10**9, block=4)
    first, second = [1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 50, 60, 70, 80, 9]
    cache.store("a", first, kv_of(first))
    cache.store("a", second, kv_of(second))
    assert len(cache) == 5  # [1 2 3 4] once, then each prompt's own second block and its [9]
    assert cache.next_missing("a", second) is None
    assert cache.next_missing("a", [1, 2, 3, 4, 5, 6, 7, 0, 9]) is not None
    assert torch.equal(cache.lookup("a", second)[1, 1, 2, :, 3], torch.tensor([1.0, 2, 3, 4, 50, 60, 70, 80]))
    # the same second block after another first block is another block
    third = [0, 2, 3, 4, 5, 6, 7, 8, 9]
    assert cache.lookup("a", third) is None
    assert cache.next_missing("a", third) == cache.next_missing("a", [0, 2, 3, 4, 1, 1, 1, 1, 1])


def test_least_recently_used_blocks_go_first_and_a_prefix_loses_its_later_blocks_first():
    cache = PrefixCache(max_bytes=4 * block_bytes(2), block=2)
    old = [1, 2, 3, 4]
    for prompt in (old, [7, 8], [9, 9]):  # blocks [1 2] [3 4], then [7 8], then [9 9]
        cache.store("a", prompt, kv_of(prompt))
    assert len(cache) == 4
    assert cache.lookup("a", old).shape[3] == 3  # touches [3 4], then [1 2]: now the most recent
    for filler in ([5, 5], [6, 6]):  # each over the budget by one block: [7 8], then [9 9] go
        cache.store("a", filler, kv_of(filler))
    assert cache.lookup("a", [7, 8, 9]) is None and cache.lookup("a", [9, 9, 9]) is None
    cache.store("a", [4, 4], kv_of([4, 4]))  # the old prompt's later block [3 4] goes before [1 2]
    assert cache.lookup("a", old).shape[3] == 2 and cache.bytes == 4 * block_bytes(2)


def test_forget_drops_one_deltas_blocks_and_a_zero_budget_holds_nothing():
    cache = PrefixCache(max_bytes=10**9, block=2)
    for name in ("a", "b", None):
        cache.store(name, [1, 2, 3], kv_of([1, 2, 3]))
    cache.forget("a")
    assert cache.lookup("a", [1, 2, 3]) is None and cache.lookup("b", [1, 2, 3]) is not None
    assert cache.lookup(None, [1, 2, 3]) is not None and cache.bytes == 2 * (block_bytes(2) + block_bytes(1))
    off = PrefixCache(max_bytes=0, block=2)
    off.store("a", [1, 2, 3], kv_of([1, 2, 3]))
    assert len(off) == 0 and off.lookup("a", [1, 2, 3]) is None and off.next_missing("a", [1, 2, 3]) is None
