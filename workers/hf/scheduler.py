"""What runs in one engine step: admission by free blocks, decode rows, prompt pieces, preemption.

Pure policy, torch-free: it moves requests between the waiting queue and the
running set and decides each step's chunks; the engine runs them
(workers/hf/engine.py) and the block manager owns the blocks
(workers/hf/blocks.py). Tests drive it with no model (tests/engine/test_scheduler.py).

A step, in order (vLLM's v1 scheduler works the same way):
1. one decode row for every running request past its prompt, oldest first; a
   request whose next position needs a block the pool does not have preempts
   the youngest running request (its blocks go back, staying cached) and runs
   again later from its tokens: nothing is lost or repeated;
2. prompt pieces of running requests still prefilling, oldest first, under the
   step's prompt-token budget, so a long prompt takes several steps and never
   holds the decoding requests up for long (Sarathi-Serve's stall-free batching).
   The budget follows the backlog (`step_budget`): the base budget while few
   prompt tokens wait, up to the burst budget while many do;
3. waiting requests admitted in order while a row, the budget and free blocks
   (beyond a small reserve) allow, each with its first piece.
A request that relies on a block another request is still writing waits for it,
so requests admitted together that share a prefix compute it once.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field

from .blocks import BlockManager, Copy
from .sequence import Sequence, Status


@dataclass
class Chunk:
    """One request's share of a step: a prompt piece, or the one token it decodes."""

    slot: int
    token_ids: list[int]
    start: int  # position of token_ids[0] in the sequence
    want_logits: bool = True  # False for a prompt piece that is not the last
    # Offsets within the chunk whose logits are wanted, where it is not just the last
    # token: a scoring request asks for every position of its continuation.
    logit_offsets: tuple[int, ...] | None = None
    # The row of the previous step's sampled tokens that is this chunk's one token, when
    # that step is still running: the token is read on the device, never on the host.
    from_previous: int | None = None
    # The request's block table (the scheduler's own list: it only grows while the request runs).
    block_table: list[int] = field(default_factory=list)

    def logit_rows(self) -> tuple[int, ...]:
        """Offsets within the chunk that get a row of logits."""
        if self.logit_offsets is not None:
            return self.logit_offsets
        return (len(self.token_ids) - 1,) if self.want_logits else ()


@dataclass
class StepPlan:
    chunks: list[Chunk] = field(default_factory=list)
    sequences: list[Sequence] = field(default_factory=list)  # chunks[i] belongs to sequences[i]
    # Shared positions to copy between blocks before the step's forward pass reads them.
    copies: list[Copy] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def add(self, sequence: Sequence, chunk: Chunk) -> None:
        self.chunks.append(chunk)
        self.sequences.append(sequence)


@dataclass
class SchedulerStats:
    """Monotonic counts, in vLLM's meanings: prompt tokens looked up in and found in the
    prefix cache at admission, and prompt tokens actually run through the model."""

    preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prompt_tokens_computed: int = 0


# The budget aims to clear the prompt backlog in about this many steps.
BACKLOG_STEPS = 4


class Scheduler:
    def __init__(self, blocks: BlockManager, slots: int, max_prefill_tokens: int, watermark: float = 0.01,
                 burst_prefill_tokens: int | None = None):
        if slots < 1 or max_prefill_tokens < 1:
            raise ValueError("slots and max_prefill_tokens must be at least 1")
        if burst_prefill_tokens is not None and burst_prefill_tokens < max_prefill_tokens:
            raise ValueError(f"burst_prefill_tokens ({burst_prefill_tokens}) must be at least "
                             f"max_prefill_tokens ({max_prefill_tokens})")
        self.blocks = blocks
        self._block_size = blocks.block_size
        self.slots = slots
        self.max_prefill_tokens = max_prefill_tokens
        self.burst_prefill_tokens = burst_prefill_tokens or max_prefill_tokens
        # Blocks admission leaves free for the running requests to grow into, so a new
        # request does not cause a preemption the very next step (vLLM's watermark).
        self.reserve = max(1, int(watermark * blocks.capacity))
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in order of admission
        self._free_slots = list(range(slots - 1, -1, -1))
        self._admissions = 0
        self.stats = SchedulerStats()

    @property
    def block_size(self) -> int:
        return self.blocks.block_size

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    # -- one step --------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        for sequence in list(self.running):
            if sequence.status is Status.RUNNING and sequence.needs_decode and self._room_to_decode(sequence, plan):
                self._plan_decode(sequence, plan)
        budget = self.step_budget()
        for sequence in list(self.running):
            if budget <= 0:
                break
            if sequence.status is Status.RUNNING and sequence.prefilling:
                budget -= self._plan_prompt_piece(sequence, budget, plan)
        while self.waiting and budget > 0 and self._free_slots:
            sequence = self.waiting[0]
            if sequence.in_flight or not self._admit(sequence):
                break  # in order: a request that cannot start now holds back those behind it
            self.waiting.popleft()
            budget -= self._plan_prompt_piece(sequence, budget, plan)
        return plan

    def step_budget(self) -> int:
        """Prompt tokens this step may carry.

        A stream of arrivals keeps the backlog small, and the base budget keeps each step
        that carries a prompt within about twice a decode step, so running requests never
        stall (the inter-token tail). A burst (hundreds of prompts at once, long prompts
        waiting for rows) would take hundreds of such steps to admit, with the batch half
        empty meanwhile; then the budget grows to a quarter of the backlog, up to the burst
        budget, so the backlog clears in a few larger steps. The backlog counts what is
        left of prefilling prompts and the prompts of the waiting requests that have a
        free row to go to."""
        base, burst = self.max_prefill_tokens, self.burst_prefill_tokens
        if burst == base:
            return base
        enough = BACKLOG_STEPS * burst
        backlog = sum(s.prefill_len - s.num_cached for s in self.running if s.prefilling)
        for sequence in itertools.islice(self.waiting, len(self._free_slots)):
            if backlog >= enough:
                break
            backlog += len(sequence.token_ids)
        return min(burst, max(base, backlog // BACKLOG_STEPS))

    def launched(self, plan: StepPlan) -> None:
        """The step is queued on the device: its positions count as written from now on
        (any later step, queued after it, reads what it wrote)."""
        for copy in plan.copies:
            self.blocks.end_copy(copy)
        for sequence, chunk in zip(plan.sequences, plan.chunks):
            end = chunk.start + len(chunk.token_ids)
            self.blocks.written(sequence.block_table, chunk.start, end, sequence)
            if sequence.num_cached < sequence.prefill_len:
                self.stats.prompt_tokens_computed += len(chunk.token_ids)
            sequence.num_cached = end
            self.learn(sequence)

    def learn(self, sequence: Sequence) -> None:
        """Key the blocks whose tokens have all become known (after a launch or a read).
        Called for every running request twice a step, so `known` is written out here, once."""
        known = min(len(sequence.token_ids), sequence.num_cached)
        full = known // self._block_size
        if full > sequence.keyed_blocks and sequence.block_table:
            self.blocks.learned(sequence.block_table, sequence.token_ids, known, sequence.root)
            sequence.keyed_blocks = full

    def finish(self, sequence: Sequence, keep: bool = True) -> None:
        """A request ends: its blocks and row are free now (what it cached stays findable)."""
        if sequence.status is Status.RUNNING:
            self._release(sequence, keep)
            self.running.remove(sequence)
        elif sequence.status is Status.WAITING:
            self.waiting.remove(sequence)
        sequence.status = Status.FINISHED

    def reset_prefix_cache(self) -> None:
        self.blocks.reset()

    # -- decisions -------------------------------------------------------------------

    def _room_to_decode(self, sequence: Sequence, plan: StepPlan) -> bool:
        """A block for the position this request decodes into, preempting the youngest running
        requests while the pool has none; False if it had to preempt itself."""
        while sequence.num_cached // self.block_size >= len(sequence.block_table):
            if self.blocks.append(sequence.block_table, sequence):
                break
            victim = max((s for s in self.running if s.status is Status.RUNNING), key=lambda s: s.admitted)
            self._preempt(victim, plan)
            if victim is sequence:
                return False
        return True

    def _plan_decode(self, sequence: Sequence, plan: StepPlan) -> None:
        chunk = Chunk(sequence.slot, sequence.next_chunk(1), sequence.num_cached, block_table=sequence.block_table)
        if sequence.in_flight:
            chunk.from_previous = sequence.in_flight_row
        plan.add(sequence, chunk)

    def _plan_prompt_piece(self, sequence: Sequence, budget: int, plan: StepPlan) -> int:
        """Plan this request's next prompt piece if what it relies on is written; returns its tokens."""
        if not self._shared_prefix_ready(sequence) or not self._copy_ready(sequence, plan):
            return 0
        piece = sequence.next_chunk(budget)
        start = sequence.num_cached
        if sequence.score is not None:
            offsets = sequence.scored_offsets(start, len(piece))
            chunk = Chunk(sequence.slot, piece, start, want_logits=bool(offsets), logit_offsets=offsets)
        else:
            chunk = Chunk(sequence.slot, piece, start, want_logits=start + len(piece) == sequence.prefill_len)
        chunk.block_table = sequence.block_table
        plan.add(sequence, chunk)
        return len(piece)

    def _shared_prefix_ready(self, sequence: Sequence) -> bool:
        """Whether the whole shared blocks this request skips are written. One still being
        written by another request means wait; one nobody writes any more (its writer was
        preempted or ended first) this request writes itself."""
        size, table = self.block_size, sequence.block_table
        shared = sequence.num_cached - (sequence.pending_copy.length if sequence.pending_copy else 0)
        while sequence.ready_blocks * size < shared:
            block = self.blocks.blocks[table[sequence.ready_blocks]]
            if block.computed >= min(size, shared - sequence.ready_blocks * size):
                sequence.ready_blocks += 1
            elif block.writer is None:
                self._take_over_writing(sequence, shared)
                shared = sequence.num_cached
            else:
                return False
        return True

    def _take_over_writing(self, sequence: Sequence, shared: int) -> None:
        """Write the shared blocks from the first unwritten one on: their writer went away."""
        size, table = self.block_size, sequence.block_table
        first = self.blocks.blocks[table[sequence.ready_blocks]]
        for index in range(sequence.ready_blocks, self.blocks.blocks_for(shared)):
            block = self.blocks.blocks[table[index]]
            if block.computed < min(size, shared - index * size):
                block.writer = sequence  # a writer still at it may write the same values too
        sequence.num_cached = sequence.ready_blocks * size + first.computed
        if sequence.pending_copy is not None:  # it computes those positions itself now
            self.blocks.end_copy(Copy(sequence.pending_copy.source, sequence.pending_copy.target, 0))
            sequence.pending_copy = None

    def _copy_ready(self, sequence: Sequence, plan: StepPlan) -> bool:
        """Queue a pending copy of shared positions once its source holds them; with its writer
        gone first, copy what it holds and compute the rest."""
        copy = sequence.pending_copy
        if copy is None:
            return True
        if copy.source.reusable < copy.length:
            if copy.source.writer is not None:
                return False
            sequence.num_cached -= copy.length - copy.source.reusable
            copy.length = copy.source.reusable
        plan.copies.append(copy)
        sequence.pending_copy = None
        return True

    def _admit(self, sequence: Sequence) -> bool:
        """Give a waiting request its blocks and a row, if the pool has them."""
        blocks = self.blocks
        if sequence.generated:  # preempted: everything it has so far, its last token read since included
            sequence.prefill_len = len(sequence.token_ids)
        found = blocks.match(sequence.token_ids, sequence.reuse_limit, sequence.root)
        needed = blocks.needed(sequence.prefill_len, found)
        if not blocks.can_allocate(needed, self.reserve if self.running else 0):
            return False
        sequence.block_table, sequence.pending_copy = blocks.allocate(
            sequence.token_ids, sequence.prefill_len, found, sequence, sequence.root)
        sequence.num_cached = found.length(self.block_size)
        sequence.ready_blocks = 0
        sequence.keyed_blocks = sequence.num_cached // self.block_size
        sequence.slot = self._free_slots.pop()
        sequence.status = Status.RUNNING
        self._admissions += 1
        sequence.admitted = self._admissions
        self.running.append(sequence)
        self.stats.prefix_cache_queries += sequence.prefill_len
        self.stats.prefix_cache_hits += sequence.num_cached
        return True

    def _preempt(self, sequence: Sequence, plan: StepPlan) -> None:
        """Take a running request's blocks back; it waits at the front of the queue and, when
        admitted again, prefills everything it has so far (mostly from the cache)."""
        self._release(sequence, keep=True)
        self.running.remove(sequence)
        sequence.status = Status.WAITING
        sequence.score_parts = []
        sequence.num_preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(sequence)
        plan.preempted.append(sequence)

    def _release(self, sequence: Sequence, keep: bool) -> None:
        if sequence.pending_copy is not None:
            self.blocks.end_copy(Copy(sequence.pending_copy.source, sequence.pending_copy.target, 0))
            sequence.pending_copy = None
        self.blocks.release(sequence.block_table, sequence.token_ids, sequence.known, sequence, sequence.root, keep)
        self._free_slots.append(sequence.slot)
        sequence.block_table, sequence.slot, sequence.num_cached, sequence.ready_blocks = [], -1, 0, 0
