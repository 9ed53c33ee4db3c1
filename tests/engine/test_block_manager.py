"""BlockManager: property tests over random operation sequences, and prefix sharing."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_manager import BlockError, BlockManager

BS = 4


def test_prefix_hit_shares_blocks_and_leaves_last_block_computed():
    bm = BlockManager(16, BS)
    a, cached_a = bm.allocate(list(range(10)))          # 3 blocks, 2 full
    bm.commit(a, list(range(10)), 10)
    b, cached_b = bm.allocate(list(range(8)) + [99, 98, 97])
    assert cached_a == 0
    assert b[:2] == a[:2] and cached_b == 8              # the two full blocks are shared
    assert bm.blocks[a[0]].ref_count == 2
    c, cached_c = bm.allocate(list(range(8)))           # the block holding the last token is never matched
    assert c[0] == a[0] and cached_c == 4


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(4, BS)
    a, _ = bm.allocate(list(range(9)))
    bm.commit(a, list(range(9)), 9)
    first = list(a)
    bm.free(a)
    assert bm.num_free_blocks == 4
    b, cached = bm.allocate(list(range(9)))
    assert cached == 8 and b[:2] == first[:2]


def test_double_free_and_unknown_blocks_raise():
    bm = BlockManager(4, BS)
    t, _ = bm.allocate([1, 2, 3])
    copy = list(t)
    bm.free(t)
    with pytest.raises(BlockError, match="freed twice"):
        bm.free(copy)
    with pytest.raises(BlockError, match="unknown block"):
        bm.free([17])


def test_fork_shares_full_blocks_and_copies_partial_last():
    bm = BlockManager(8, BS)
    t, _ = bm.allocate(list(range(6)))
    child, copies = bm.fork(t, 6)
    assert child[0] == t[0] and child[1] != t[1]
    assert copies == [(t[1], child[1])]
    bm.check_invariants([t, child])


ops = st.lists(st.tuples(st.sampled_from(["alloc", "append", "fork", "free"]),
                         st.integers(0, 7), st.integers(1, 40)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops=ops, prefix_caching=st.booleans())
def test_random_operations_keep_invariants(ops, prefix_caching):
    bm = BlockManager(24, BS, prefix_caching)
    live: list[tuple[list[int], list[int]]] = []       # (table, tokens)
    for op, which, n in ops:
        if op == "alloc":
            tokens = [which % 3] * n                     # few distinct prefixes -> many hits
            if bm.can_allocate(tokens):
                table, cached = bm.allocate(tokens)
                bm.commit(table, tokens, n)                  # as if its prefill ran
                assert cached % BS == 0 and cached < n
                assert len(table) == bm.blocks_for(n)
                live.append((table, tokens))
            else:
                with pytest.raises(BlockError):
                    bm.allocate(tokens)
        elif not live:
            continue
        elif op == "append":
            table, tokens = live[which % len(live)]
            if bm.can_append(table, len(tokens) + 1):
                tokens.append(7)
                bm.append(table, len(tokens))
                assert len(table) == bm.blocks_for(len(tokens))
        elif op == "fork":
            table, tokens = live[which % len(live)]
            if bm.num_free_blocks >= 1:
                child, copies = bm.fork(table, len(tokens))
                assert len(copies) <= 1
                live.append((child, list(tokens)))
        elif op == "free":
            table, _ = live.pop(which % len(live))
            bm.free(table)
            assert table == []
        bm.check_invariants([t for t, _ in live])
    for table, _ in live:
        bm.free(table)
    bm.check_invariants([])
    assert bm.num_free_blocks == bm.num_blocks


@settings(max_examples=100, deadline=None)
@given(shared=st.integers(1, 30), tails=st.lists(st.integers(0, 20), min_size=2, max_size=5))
def test_equal_prefixes_share_every_full_block(shared, tails):
    bm = BlockManager(64, BS)
    prefix = list(range(100, 100 + shared))
    tables = []
    for i, tail in enumerate(tails):
        tokens = prefix + [i] * tail
        table, cached = bm.allocate(tokens)
        bm.commit(table, tokens, len(tokens))
        tables.append(table)
        if i > 0:
            expect = min(shared // BS, (len(tokens) - 1) // BS) * BS
            assert cached == expect
            assert table[:expect // BS] == tables[0][:expect // BS]
    bm.check_invariants(tables)


def test_only_computed_blocks_are_shared():
    """A request cancelled before its prefill ran must not leave 'cached' blocks with no KV."""
    bm = BlockManager(16, BS)
    prompt = list(range(12))
    table, _ = bm.allocate(prompt)
    bm.free(table)                                      # cancelled: nothing was computed
    again, cached = bm.allocate(prompt)
    assert cached == 0, "uncomputed blocks were offered as prefix hits"
    bm.commit(again, prompt, 8)                          # the first two blocks are computed
    bm.free(again)
    _, cached = bm.allocate(prompt)
    assert cached == 8
