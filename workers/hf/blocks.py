"""The paged KV cache's bookkeeping: blocks, reference counts, prefix hashes, the free list.

Torch-free: it hands out block ids and decides what may be shared; the runner
owns the tensors those ids index (workers/hf/kv_cache.py). Unit tests drive it
with no model (tests/engine/test_blocks.py).

A request holds a table of blocks, one per `block_size` positions it has. A
full block is keyed by a hash of every token up to its end (the hash of the
block before it, then its own tokens), so two requests with the same first
tokens share those blocks: a system prompt, a conversation's earlier turns, the
prompt every SMC particle shares. A request's prefix that ends inside a block
is matched too: a block whose first tokens are the request's next ones is
either taken over (nobody holds it and its tokens are a prefix of the
request's: a particle's previous call, a chat's previous turn) or its shared
positions are copied into a fresh block of the request's own. A block nobody
holds keeps its tokens, and stays findable, until the pool needs it back
(least recently freed first).

Blocks are registered as soon as their tokens are known, before their keys and
values are computed, so requests admitted in the same step share a prefix and
compute it once: `computed` says how many of a block's positions a launched
step has written, and `writer` which request writes the rest. A request that
relies on a block still being written waits for it; if its writer goes away
first (preempted, cancelled), the request takes the writing over.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
from array import array
from dataclasses import dataclass, field
from typing import Any, Sequence

# The first block's "parent": what a model pair's requests hash under differs from a
# single model's, so a request that needs both caches never shares a block only one holds.
ROOT = b"batchd-kv"
# Candidates compared token by token when no block's tokens are all the wanted ones.
MAX_COMPARED = 8


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a block (or of a block's first tokens) after `parent`.

    A cryptographic hash: a producer who could make two prefixes collide could make
    another producer's request read keys and values its tokens did not produce."""
    return hashlib.blake2b(parent + array("i", tokens).tobytes(), digest_size=16).digest()


@dataclass(eq=False)
class Block:
    id: int
    ref_count: int = 0
    # The tokens whose keys and values this block holds, or will once `writer` has written them.
    tokens: list[int] = field(default_factory=list)
    # Leading positions whose keys and values a launched step has written.
    computed: int = 0
    # Who writes the rest (a request's own object, opaque here); None once it stops.
    writer: Any = None
    # The chain key of the block before it (ROOT for a first block; None while unknown), and
    # its own once it is full and its tokens are known. A full block equal to one already
    # registered keeps its key but is not the one `match` finds.
    parent: bytes | None = None
    key: bytes | None = None
    # Keys of its leading tokens in the partial-match index, and of all its tokens.
    prefix_keys: list[bytes] = field(default_factory=list)
    whole_key: bytes | None = None

    @property
    def reusable(self) -> int:
        """Leading positions another request may read or copy now."""
        return min(self.computed, len(self.tokens))


@dataclass
class PrefixMatch:
    """What a request may skip: whole shared blocks, then maybe part of one more."""

    blocks: list[Block] = field(default_factory=list)
    # A block whose first `tail_length` tokens are the request's next ones.
    tail: Block | None = None
    tail_length: int = 0
    # True: nobody holds the tail and its tokens are all the request's: the request takes
    # it as its own. False: the shared positions are copied into a fresh block.
    take_over: bool = False

    def length(self, block_size: int) -> int:
        return len(self.blocks) * block_size + self.tail_length


@dataclass
class Copy:
    """Positions [0, length) of block `source` to copy into block `target`, once written."""

    source: Block
    target: Block
    length: int


class BlockManager:
    """All blocks of one KV pool.

    `reserved` leading ids are never handed out (block 0 is the CUDA graphs' scratch block:
    rows with no request write their throwaway keys there). With prefix_caching off (a
    runner whose cache is not paged) the manager only counts blocks: nothing is shared.
    """

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True, reserved: int = 1):
        if block_size < 1 or num_blocks <= reserved:
            raise ValueError(f"a pool of {num_blocks} blocks of {block_size} tokens holds nothing")
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.capacity = num_blocks - reserved  # blocks requests can use
        self._free: collections.deque[Block] = collections.deque(self.blocks[reserved:])
        # Held by nobody but still holding tokens a later request may reuse; oldest first.
        self._cached: collections.OrderedDict[int, Block] = collections.OrderedDict()
        self._by_key: dict[bytes, Block] = {}
        self._by_prefix: dict[bytes, dict[int, Block]] = {}
        self._by_whole: dict[bytes, dict[int, Block]] = {}  # a partial block by all its tokens
        # Token counts a partial match looks up (powers of two below the block size).
        self._prefix_lengths = [2 ** p for p in range(block_size.bit_length()) if 2 ** p < block_size]
        self.evictions = 0

    # -- counts ----------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks a request can get now: never used, or only cached."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks nobody holds that still hold a reusable prefix."""
        return len(self._cached)

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    # -- finding a prefix ------------------------------------------------------------

    def match(self, tokens: Sequence[int], limit: int, root: bytes = ROOT) -> PrefixMatch:
        """The longest start of tokens[:limit] the pool holds or is about to (no references taken)."""
        found = PrefixMatch()
        if not self.prefix_caching or limit <= 0:
            return found
        size, parent, at = self.block_size, root, 0
        while at + size <= limit:
            block = self._by_key.get(block_hash(parent, tokens[at:at + size]))
            if block is None:
                break
            found.blocks.append(block)
            parent, at = block.key, at + size
        remaining = tokens[at:min(limit, at + size)]
        if remaining:
            found.tail, found.tail_length, found.take_over = self._partial(parent, remaining)
        return found

    def _partial(self, parent: bytes, wanted: Sequence[int]) -> tuple[Block | None, int, bool]:
        """A block after `parent` whose first tokens are the start of `wanted`: preferably one
        whose tokens are all wanted and that nobody holds (taken over, no copy), else the one
        sharing the most among a few."""
        candidates: dict[int, Block] = {}
        for length in reversed(self._prefix_lengths):
            if length <= len(wanted):
                candidates = self._by_prefix.get(block_hash(parent, wanted[:length]), {})
                if candidates:
                    break
        if not candidates:
            return None, 0, False
        # Many blocks may share those leading tokens (every particle's last block): look the
        # wanted tokens up whole (first all of them: a particle's previous call), at each length
        # a candidate has, before comparing any token by token.
        for length in self._whole_lengths(parent, wanted, candidates):
            whole = self._by_whole.get(block_hash(parent, wanted[:length]), {})
            free = next((b for b in whole.values() if b.ref_count == 0 and b.reusable == length), None)
            if free is not None:
                return free, length, True
            written = next((b for b in whole.values() if b.writer is not None or b.reusable == length), None)
            if written is not None:
                return written, length, False
        best, best_length = None, 0
        for block in itertools.islice(candidates.values(), MAX_COMPARED):
            # A block still being written offers what it will hold; otherwise what it holds.
            held = block.tokens if block.writer is not None else block.tokens[:block.reusable]
            length = _common_prefix(held, wanted)
            if length > best_length:
                best, best_length = block, length
        return best, best_length, False

    def _whole_lengths(self, parent: bytes, wanted: Sequence[int], candidates: dict[int, Block]) -> list[int]:
        if block_hash(parent, wanted) in self._by_whole:
            return [len(wanted)]
        return sorted({len(b.tokens) for b in candidates.values() if len(b.tokens) < len(wanted)}, reverse=True)

    # -- holding blocks --------------------------------------------------------------

    def can_allocate(self, count: int, keep_free: int = 0) -> bool:
        return self.num_free - count >= keep_free

    def needed(self, positions: int, found: PrefixMatch) -> int:
        """Free blocks allocate() uses up for this match: fresh ones, and the matched ones
        nobody holds now (holding them takes them out of the cache)."""
        matched = found.blocks + ([found.tail] if found.tail is not None else [])
        shared = len(found.blocks) + (1 if found.tail is not None and found.take_over else 0)
        return max(0, self.blocks_for(positions) - shared) + sum(block.ref_count == 0 for block in matched)

    def allocate(self, tokens: Sequence[int], positions: int, found: PrefixMatch, writer: Any,
                 root: bytes = ROOT) -> tuple[list[int], Copy | None]:
        """A block table covering `positions` positions of `tokens` (all known): the matched
        blocks shared, fresh ones for the rest. Returns it and the copy to make, if any.
        The caller checked can_allocate(needed(...))."""
        held = list(found.blocks)
        # Held before any fresh block is taken, so none of them is evicted to make room.
        for block in held + ([found.tail] if found.tail is not None else []):
            self._hold(block)
        if found.tail is not None and found.take_over:
            # Its tokens are the start of the new owner's: its keys stay right, and more follow.
            found.tail.writer = writer
            held.append(found.tail)
        while len(held) < self.blocks_for(positions):
            held.append(self._take_free(writer))
        copy = None
        if found.tail is not None and not found.take_over:  # the source stays held until it is copied
            copy = Copy(found.tail, held[len(found.blocks)], found.tail_length)
        self._plan(held, tokens, positions, len(found.blocks), root)
        return [block.id for block in held], copy

    def append(self, table: list[int], writer: Any) -> bool:
        """One more block at the end of a table (a request decoding past its last one);
        False when the pool is dry (the caller preempts someone)."""
        if not self.num_free:
            return False
        block = self._take_free(writer)
        block.parent = self.blocks[table[-1]].key if table else None
        table.append(block.id)
        return True

    def written(self, table: list[int], start: int, end: int, writer: Any) -> None:
        """A launched step writes positions [start, end) of this table."""
        size = self.block_size
        for index in range(start // size, (end - 1) // size + 1):
            block = self.blocks[table[index]]
            if block.writer is writer:
                block.computed = max(block.computed, min(end, (index + 1) * size) - index * size)

    def learned(self, table: list[int], tokens: Sequence[int], known: int, root: bytes = ROOT) -> None:
        """Tokens [0, known) of this table are known and written: key the full blocks that
        makes (positions a decode wrote while its input token was still on the device)."""
        if not self.prefix_caching:
            return
        size, blocks = self.block_size, self.blocks
        full = min(known // size, len(table))
        first = full
        while first > 0 and blocks[table[first - 1]].key is None:
            first -= 1
        parent = blocks[table[first - 1]].key if first else root
        for index in range(first, full):
            block = blocks[table[index]]
            block.tokens, block.parent = list(tokens[index * size:(index + 1) * size]), parent
            parent = self._register_full(block)
            self._index_prefixes(block)
        if full < len(table) and blocks[table[full]].parent is None:
            blocks[table[full]].parent = parent

    def release(self, table: list[int], tokens: Sequence[int], known: int, writer: Any, root: bytes = ROOT,
                keep: bool = True) -> None:
        """A request lets go of its table. What it wrote and knows (tokens [0, known)) stays
        findable, unless keep is False (a step that failed): full blocks by key, its last one
        by its first tokens, until the pool needs them back."""
        if keep:
            self.learned(table, tokens, known, root)
        size = self.block_size
        # Last block first: the cache evicts the oldest first, so a prefix loses its tail
        # before its head (without its head, the rest could not be found anyway).
        for index in range(len(table) - 1, -1, -1):
            block = self.blocks[table[index]]
            if block.writer is writer:
                block.writer = None
                if block.ref_count == 1:  # nobody is left to finish writing it
                    held = tokens[index * size:min(known, (index + 1) * size)] if keep else ()
                    self._settle(block, held)
            self._drop(block)

    def hold_prefix(self, tokens: Sequence[int], root: bytes = ROOT) -> list[Block]:
        """A reference on each written full block of tokens' start that the pool holds (a pin):
        none of them is evicted before let_go. Returns them, leading blocks first; fewer than
        len(tokens) // block_size when the pool no longer holds the rest."""
        found = self.match(tokens, len(tokens) // self.block_size * self.block_size, root)
        held = []
        for block in found.blocks:
            if block.reusable < self.block_size:
                break
            self._hold(block)
            held.append(block)
        return held

    def let_go(self, blocks: list[Block]) -> None:
        """Drop hold_prefix's references: the blocks are cached (and evictable) again."""
        for block in blocks:
            self._drop(block)

    def end_copy(self, copy: Copy) -> None:
        """The copy is queued (or dropped): the source may be reused again."""
        copy.target.computed = max(copy.target.computed, copy.length)
        self._drop(copy.source)

    def reset(self) -> None:
        """Forget every cached prefix (blocks nobody holds go back to the free list)."""
        for block in list(self._cached.values()):
            self._unindex(block)
            self._clear(block)
            self._free.append(block)
        self._cached.clear()

    # -- internals -------------------------------------------------------------------

    def _take_free(self, writer: Any) -> Block:
        if self._free:
            block = self._free.popleft()
        else:
            _, block = self._cached.popitem(last=False)
            self._unindex(block)
            self.evictions += 1
        self._clear(block)
        block.ref_count, block.writer = 1, writer
        return block

    def _hold(self, block: Block) -> None:
        if block.ref_count == 0:
            self._cached.pop(block.id, None)
        block.ref_count += 1

    def _drop(self, block: Block) -> None:
        block.ref_count -= 1
        if block.ref_count:
            return
        findable = self._by_key.get(block.key) is block if block.key else False
        if self.prefix_caching and (findable or block.prefix_keys) and block.reusable:
            self._cached[block.id] = block
        else:
            self._unindex(block)
            self._clear(block)
            self._free.append(block)

    def _plan(self, table: list[Block], tokens: Sequence[int], positions: int, shared: int, root: bytes) -> None:
        """Record the tokens the blocks after the shared ones will hold, and make them findable."""
        size = self.block_size
        parent = table[shared - 1].key if shared else root
        for index in range(shared, len(table)):
            block = table[index]
            block.tokens, block.parent = list(tokens[index * size:min(positions, (index + 1) * size)]), parent
            if not self.prefix_caching:
                continue
            if len(block.tokens) == size:
                parent = self._register_full(block)
            self._index_prefixes(block)

    def _settle(self, block: Block, held: Sequence[int]) -> None:
        """What a block nobody writes any more really holds: its written, known tokens."""
        valid = list(held[:block.computed])
        if valid == block.tokens:
            return
        if valid[:len(block.tokens)] != block.tokens:
            self._unindex(block)  # it holds less than planned: its longer keys would lie
        block.tokens, block.computed = valid, len(valid)
        if self.prefix_caching and valid and block.parent is not None:
            if len(valid) == self.block_size:
                self._register_full(block)
            self._index_prefixes(block)

    def _register_full(self, block: Block) -> bytes:
        block.key = block_hash(block.parent, block.tokens)
        self._by_key.setdefault(block.key, block)  # an equal block already there stays the one found
        return block.key

    def _index_prefixes(self, block: Block) -> None:
        if block.parent is None:
            return
        for length in self._prefix_lengths[len(block.prefix_keys):]:
            if length > len(block.tokens):
                break
            key = block_hash(block.parent, block.tokens[:length])
            self._by_prefix.setdefault(key, {})[block.id] = block
            block.prefix_keys.append(key)
        self._unindex_whole(block)
        if block.tokens and len(block.tokens) < self.block_size:  # a full block is found by its key
            block.whole_key = block_hash(block.parent, block.tokens)
            self._by_whole.setdefault(block.whole_key, {})[block.id] = block

    def _unindex_whole(self, block: Block) -> None:
        holders = self._by_whole.get(block.whole_key) if block.whole_key else None
        if holders is not None:
            holders.pop(block.id, None)
            if not holders:
                del self._by_whole[block.whole_key]
        block.whole_key = None

    def _unindex(self, block: Block) -> None:
        if block.key is not None and self._by_key.get(block.key) is block:
            del self._by_key[block.key]
        block.key = None
        for key in block.prefix_keys:
            holders = self._by_prefix.get(key)
            if holders is not None:
                holders.pop(block.id, None)
                if not holders:
                    del self._by_prefix[key]
        block.prefix_keys = []
        self._unindex_whole(block)

    @staticmethod
    def _clear(block: Block) -> None:
        block.tokens, block.computed, block.writer, block.parent = [], 0, None, None


def _common_prefix(held: Sequence[int], wanted: Sequence[int]) -> int:
    length = min(len(held), len(wanted))
    for index in range(length):
        if held[index] != wanted[index]:
            return index
    return length
