"""The block manager alone, with no model: what is shared, copied, taken over, kept and evicted."""

from __future__ import annotations

import pytest
from batchd.workers.hf.blocks import ROOT, BlockManager

SIZE = 4


class Writer:
    """A stand-in for a request: the block manager only compares writers by identity."""


def _admit(manager: BlockManager, tokens: list[int], limit: int | None = None):
    writer = Writer()
    found = manager.match(tokens, len(tokens) - 1 if limit is None else limit)
    assert manager.can_allocate(manager.needed(len(tokens), found))
    table, copy = manager.allocate(tokens, len(tokens), found, writer)
    return writer, table, copy, found


def _write_all(manager: BlockManager, writer, table: list[int], tokens: list[int], start: int = 0) -> None:
    manager.written(table, start, len(tokens), writer)
    manager.learned(table, tokens, len(tokens))


def test_full_blocks_are_shared_by_the_hash_of_every_token_before_them():
    manager = BlockManager(16, SIZE)
    first = list(range(10, 20))  # 2 full blocks and 2 tokens
    writer, table, copy, found = _admit(manager, first)
    assert not found.blocks and copy is None and len(table) == 3
    _write_all(manager, writer, table, first)
    manager.release(table, first, len(first), writer)
    assert manager.num_used == 0 and manager.num_cached == 3  # kept, findable
    # Same first 8 tokens: the two full blocks are found; the partial third is found by its
    # first tokens, and nobody holds it and all its tokens are ours, so it is taken over.
    again = first + [99]
    found = manager.match(again, len(again) - 1)
    assert [b.id for b in found.blocks] == table[:2]
    assert found.tail.id == table[2] and found.tail_length == 2 and found.take_over
    # Another prefix with the same third block's tokens but a different start shares nothing.
    other = [1] + first[1:]
    assert not manager.match(other, len(other) - 1).blocks


def test_a_block_held_by_a_running_request_is_copied_not_taken():
    manager = BlockManager(16, SIZE)
    system = [7, 7, 7, 7, 8, 8]  # a full block, then two tokens of the next
    writer, table, _, _ = _admit(manager, system + [1, 2])
    _write_all(manager, writer, table, system + [1, 2])
    _, table2, copy, found = _admit(manager, system + [3])
    assert table2[0] == table[0] and manager.blocks[table[0]].ref_count == 2
    assert copy is not None and copy.source.id == table[1] and copy.length == 2 and not found.take_over
    assert copy.target.id == table2[1] != table[1]


def test_the_last_token_is_never_taken_from_the_cache():
    manager = BlockManager(16, SIZE)
    tokens = [5, 6, 7, 8, 9, 10, 11, 12]  # exactly two blocks
    writer, table, _, _ = _admit(manager, tokens)
    _write_all(manager, writer, table, tokens)
    manager.release(table, tokens, len(tokens), writer)
    # The same prompt again: its logits need its last token computed, so the second block
    # cannot be shared whole; its first three positions are copied into a fresh block.
    found = manager.match(tokens, len(tokens) - 1)
    assert len(found.blocks) == 1 and found.tail.id == table[1] and found.tail_length == 3
    assert not found.take_over  # the block holds a fourth token that is not ours to skip


def test_blocks_nobody_holds_are_evicted_oldest_first_tail_before_head():
    manager = BlockManager(4, SIZE)  # 3 usable blocks (block 0 is the scratch block)
    first, second, third = [1, 2, 3, 4, 9], [5, 6, 7, 8, 9], [11, 12, 13, 14, 9]
    for tokens in (first, second):
        writer, table, _, _ = _admit(manager, tokens)
        _write_all(manager, writer, table, tokens)
        manager.release(table, tokens, len(tokens), writer)
    # The second took the never-used block, then evicted the first's tail (a prefix's tail
    # goes before its head, which alone can still be found).
    assert manager.evictions == 1
    head = manager.match(first + [0], 5)
    assert len(head.blocks) == 1 and head.tail is None
    _admit(manager, third)  # two more: the first's head, then the second's tail
    assert manager.evictions == 3 and not manager.match(first, 4).blocks
    assert manager.match(second, 4).blocks and manager.match(second + [0], 5).tail is None
    assert manager.num_free == 1


def test_a_block_planned_but_not_written_is_shared_and_waited_for():
    """Two requests admitted in the same step with the same prefix: the second shares the
    first's blocks as soon as they are planned; it can tell they are not written yet."""
    manager = BlockManager(16, SIZE)
    prefix = [3, 1, 4, 1, 5, 9, 2, 6]
    first, table, _, _ = _admit(manager, prefix + [1])
    _, table2, _, found = _admit(manager, prefix + [2])
    assert table2[:2] == table[:2]
    assert all(manager.blocks[b].computed == 0 and manager.blocks[b].writer is first for b in table[:2])
    manager.written(table, 0, 9, first)
    assert all(manager.blocks[b].computed == SIZE for b in table[:2])


def test_a_decode_fills_a_block_that_is_keyed_once_its_tokens_are_known():
    manager = BlockManager(16, SIZE)
    writer, table, _, _ = _admit(manager, [1, 2, 3])
    tokens = [1, 2, 3, 40, 41]  # two generated tokens; the block boundary is after 40
    manager.written(table, 0, 4, writer)
    assert manager.append(table, writer)
    manager.written(table, 4, 5, writer)
    manager.learned(table, tokens, 5)
    manager.release(table, tokens, 5, writer)
    found = manager.match(tokens + [42], 5)
    assert [b.id for b in found.blocks] == table[:1] and found.tail_length == 1 and found.take_over


def test_an_unwritten_block_is_never_cached():
    manager = BlockManager(16, SIZE)
    tokens = list(range(20, 31))
    writer, table, _, _ = _admit(manager, tokens)
    manager.written(table, 0, 6, writer)  # cancelled after its first piece
    manager.release(table, tokens, 6, writer)
    found = manager.match(tokens, len(tokens) - 1)
    assert found.length(SIZE) == 6  # one full block, and two positions of the next
    assert manager.num_cached == 2


def test_a_failed_step_caches_nothing_it_wrote():
    manager = BlockManager(16, SIZE)
    tokens = list(range(20, 31))
    writer, table, _, _ = _admit(manager, tokens)
    manager.written(table, 0, len(tokens), writer)
    manager.release(table, tokens, len(tokens), writer, keep=False)
    assert manager.num_cached == 0 and manager.num_free == 15
    assert manager.match(tokens, len(tokens) - 1).length(SIZE) == 0


def test_a_model_pairs_requests_hash_apart():
    manager = BlockManager(16, SIZE)
    tokens = list(range(1, 10))
    writer, table, _, _ = _admit(manager, tokens)
    _write_all(manager, writer, table, tokens)
    assert manager.match(tokens, 8).blocks
    assert not manager.match(tokens, 8, root=ROOT + b"-pair").blocks


def test_reset_forgets_every_cached_prefix():
    manager = BlockManager(16, SIZE)
    tokens = list(range(1, 10))
    writer, table, _, _ = _admit(manager, tokens)
    _write_all(manager, writer, table, tokens)
    manager.release(table, tokens, len(tokens), writer)
    manager.reset()
    assert manager.num_cached == 0 and manager.match(tokens, 8).length(SIZE) == 0


def test_a_pool_too_small_to_hold_anything_is_refused():
    with pytest.raises(ValueError, match="holds nothing"):
        BlockManager(1, SIZE)


def test_a_held_prefix_is_never_evicted_and_is_evictable_again_once_let_go():
    manager = BlockManager(7, SIZE)  # 6 usable blocks
    pinned = list(range(100, 110))  # 2 full blocks and 2 tokens
    writer, table, _, _ = _admit(manager, pinned)
    _write_all(manager, writer, table, pinned)
    manager.release(table, pinned, len(pinned), writer)
    held = manager.hold_prefix(pinned)
    assert [b.id for b in held] == table[:2]  # the full blocks only
    assert manager.num_used == 2 and manager.num_cached == 1
    # Fill the pool twice over with other prompts: every cached block is evicted, the held ones are not.
    for start in (0, 40):
        other = list(range(start, start + 16))
        writer, other_table, _, _ = _admit(manager, other)
        assert not set(other_table) & {b.id for b in held}
        _write_all(manager, writer, other_table, other)
        manager.release(other_table, other, len(other), writer)
    assert [b.id for b in manager.match(pinned, 8).blocks] == table[:2]
    manager.let_go(held)
    assert manager.num_used == 0
    other = list(range(200, 224))  # all 6 blocks: the pin's go now
    writer, other_table, _, _ = _admit(manager, other)
    assert set(table[:2]) <= set(other_table)
    assert not manager.match(pinned, 8).blocks


def test_holding_a_prefix_the_pool_does_not_hold_takes_nothing():
    manager = BlockManager(8, SIZE)
    assert manager.hold_prefix(list(range(12))) == []
    assert manager.num_used == 0
