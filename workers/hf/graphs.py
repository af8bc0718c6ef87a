"""CUDA graphs for decode steps: captured once per batch size at start, replayed every step.

A step that holds only one-token rows (decodes, one-token scoring calls) copies
its token ids, positions, each row's slot and the slots' lengths into static
buffers (one pinned host-to-device copy) and replays the smallest graph that
holds its rows, which removes the launch cost of its ~400 small kernels.

The graph over every slot reads row i as slot i. A smaller one reads each row's
slot from its buffer: the requests' slots first, then idle slots, one each,
whose position is -1: they write their throwaway keys into the scratch block
(block 0, never handed to a request) and attend to nothing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from .kv_cache import to_device
from .scheduler import Chunk

if TYPE_CHECKING:
    from .runner import PagedRunner

log = logging.getLogger("batchd.engine.hf")


def decode_graph_sizes(slots: int) -> tuple[int, ...]:
    """Decoding requests per step that get a CUDA graph: powers of two from 8, and all slots.

    A step replays the smallest graph that holds its decoding requests, so a worker with a
    few live requests does not run the dense products and the LM head for all its slots.
    Under 8 rows a product costs what 8 cost (it is bound by reading its weights), so
    smaller graphs would add capture time and memory for nothing.
    """
    return (*(2 ** power for power in range(3, slots.bit_length()) if 2 ** power < slots), slots)


def graphs_worth_keeping(replay_ms: dict[int, float], slots: int, margin: float = 0.03) -> list[int]:
    """The graph sizes worth replaying, from each graph's time per replay: the graph over
    every slot, and each smaller one that is at least `margin` faster than it (closer
    than that is within the timing's noise, and the smaller graph would be a wash)."""
    full = replay_ms[slots]
    return sorted(rows for rows, ms in replay_ms.items() if rows == slots or ms <= full * (1 - margin))


def check_graph_sizes(sizes: tuple[int, ...], slots: int) -> tuple[int, ...]:
    if any(size < 1 or size > slots for size in sizes):
        raise ValueError(f"CUDA graph sizes {sizes} must lie between 1 and the {slots} slots")
    # Every step must find a graph that holds it: the largest always covers every slot.
    return tuple(sorted(set(sizes) | {slots}))


class DecodeGraph:
    """A decode step over a fixed number of rows, captured once and replayed."""

    def __init__(self, rows: int, slots: int, device: torch.device):
        from .runner import StepBatch

        self.rows, self._slots = rows, slots
        self.batch = StepBatch.static_decode(rows, slots, device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def assign(self, chunks: list[Chunk]) -> tuple[dict[int, int], list[int]]:
        """The row of each chunk's slot, and the slot of every row (empty where row i is slot i)."""
        if self.rows == self._slots:
            return {c.slot: c.slot for c in chunks}, []
        busy = {c.slot for c in chunks}
        idle = [slot for slot in range(self._slots) if slot not in busy][:self.rows - len(chunks)]
        return {c.slot: row for row, c in enumerate(chunks)}, [c.slot for c in chunks] + idle

    def fill(self, runner, chunks: list[Chunk], wanted: list[Chunk], previous: torch.Tensor | None) -> torch.Tensor:
        """Copy one decode step into the static buffers; returns the rows of the wanted chunks' logits."""
        row_of, slot_of_row = self.assign(chunks)
        rows, slots = self.rows, runner.slots
        ids, positions, lengths = [0] * rows, [-1] * rows, [0] * slots
        for chunk in chunks:
            row = row_of[chunk.slot]
            ids[row], positions[row], lengths[chunk.slot] = chunk.token_ids[0], chunk.start, chunk.start + 1
        # One copy for everything the graph reads: the inputs, each row's slot, the logit
        # rows, and where tokens still on the device go.
        carried = [c for c in chunks if c.from_previous is not None]
        logit_rows = [row_of[c.slot] for c in wanted]
        staged = to_device(ids + positions + lengths + slot_of_row + logit_rows + [row_of[c.slot] for c in carried]
                           + [c.from_previous for c in carried], torch.long, runner.device)
        self.batch.token_ids.copy_(staged[:rows])
        self.batch.positions.copy_(staged[rows:2 * rows])
        runner.decode_attention.lengths.copy_(staged[2 * rows:2 * rows + slots])
        rest = staged[2 * rows + slots:]
        if slot_of_row:
            self.batch.slots.copy_(rest[:rows])
            rest = rest[rows:]
        if carried:
            into, taken = rest[len(logit_rows):len(logit_rows) + len(carried)], rest[len(logit_rows) + len(carried):]
            self.batch.token_ids.index_copy_(0, into, previous.index_select(0, taken))
        return rest[:len(logit_rows)]

    def run(self, runner) -> torch.Tensor:
        """Replay the captured step; where none is captured (the CPU), run the same batch."""
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return runner.forward_batch(self.batch)

    def replay_ms(self, repeats: int = 20) -> float:
        self.graph.replay()  # the first replay after a capture uploads the graph
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            self.graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / repeats


class DecodeGraphs:
    """Every decode graph of one runner, smallest first, sharing one memory pool."""

    def __init__(self, runner: PagedRunner, sizes: tuple[int, ...], mixed_tokens: list[int] | None = None):
        self._runner = runner
        self.graphs: list[DecodeGraph] = []
        self.mixed: list[MixedGraph] = []  # smallest first
        self.capture(sizes, mixed_tokens or [])

    @property
    def sizes(self) -> list[int]:
        return [graph.rows for graph in self.graphs]

    def use(self, sizes: list[int]) -> None:
        """Replay only graphs of these sizes (benchmarks compare sets on one engine)."""
        unknown = set(sizes) - set(self.sizes)
        if unknown or self._runner.slots not in sizes:
            raise ValueError(f"graph sizes {sorted(sizes)} must be among {self.sizes} and include every slot")
        self._active = [graph for graph in self.graphs if graph.rows in sizes]

    def capture(self, sizes: tuple[int, ...], mixed_tokens: list[int]) -> None:
        """One graph per size, largest first, all in one memory pool: only one replays at a
        time, so their intermediate tensors can share memory. Then the mixed graphs."""
        runner = self._runner
        runner.decode_attention.lengths.zero_()
        context = runner.table.shape[1] * runner.block_size
        mixed = [MixedGraph(runner.slots, tokens, keys, context, runner.device)
                 for tokens, keys in mixed_graph_shapes(mixed_tokens)]
        graphs, pool = [], None
        with torch.inference_mode():
            for graph in mixed + [DecodeGraph(rows, runner.slots, runner.device) for rows in sorted(sizes, reverse=True)]:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up compiles flex and sets up cuBLAS outside the capture
                    for _ in range(2):
                        runner.forward_batch(graph.batch)
                torch.cuda.current_stream().wait_stream(side)
                graph.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph.graph, pool=pool):
                    graph.logits = runner.forward_batch(graph.batch)
                pool = graph.graph.pool()
                graphs.append(graph)
        self.mixed = [g for g in graphs if isinstance(g, MixedGraph)][::-1]
        self.graphs = [g for g in graphs if isinstance(g, DecodeGraph)][::-1]
        self._active = list(self.graphs)
        log.info("decode CUDA graphs captured for %s decoding requests; mixed graphs for %s prompt tokens",
                 ", ".join(map(str, self.sizes)),
                 ", ".join(f"{g.tokens} ({g.keys} keys)" for g in self.mixed) or "no")

    def replay_mixed(self, chunks: list[Chunk], previous: torch.Tensor | None):
        """(logits, chunk of each row) from the smallest mixed graph the step fits, or None."""
        decodes = [c for c in chunks if len(c.token_ids) == 1]
        pieces = [c for c in chunks if len(c.token_ids) > 1]
        graph = next((g for g in self.mixed if g.fits(pieces)), None)
        if graph is None:
            return None
        rows = graph.fill(self._runner, decodes, pieces, previous)
        wanted = [c for c in decodes if c.logit_rows()] + [c for c in pieces if c.logit_rows()]
        return graph.run(self._runner)[:len(rows)].float(), wanted

    def keep_those_that_pay(self) -> None:
        """Drop the smaller graphs that replay no faster than the graph over every slot.

        Whether rows cost time depends on the model and the GPU: on an H200 a Qwen3-0.6B
        step costs about the same for 8 rows as for 256 (its ~400 kernels are bound by
        launch and latency), and a smaller graph's extra work (placing rows in their slots'
        places) made it slower; a Llama-3-8B step over 8 rows took 17-18% less time than over
        256 (docs/engine.md). So each graph is timed here, with no request live (the attention
        reads nothing; what differs between graphs is the dense work), and kept only if it wins."""
        replay_ms = {graph.rows: graph.replay_ms() for graph in self.graphs}
        kept = set(graphs_worth_keeping(replay_ms, self._runner.slots))
        self.graphs = [graph for graph in self.graphs if graph.rows in kept]
        self._active = list(self.graphs)
        log.info("decode CUDA graphs kept for %s decoding requests (ms per replay with none live: %s)",
                 ", ".join(map(str, self.sizes)), ", ".join(f"{rows}: {ms:.2f}" for rows, ms in sorted(replay_ms.items())))

    def replay(self, chunks: list[Chunk], wanted: list[Chunk], previous: torch.Tensor | None) -> torch.Tensor:
        """Logits of the wanted chunks' rows, from the smallest graph that holds every chunk."""
        graph = next(g for g in self._active if g.rows >= len(chunks))
        rows = graph.fill(self._runner, chunks, wanted, previous)
        return graph.run(self._runner)[rows].float()


# Prompt-carrying steps replay graphs too: eager, such a step cost ~50 ms of host time on an
# H200 (28 layers of compiled-for-any-shape parts, each call its guards and launches) against
# ~7 ms of GPU work, and stalled every running request for it (docs/performance.md).
MIXED_PIECES = 16  # prompt pieces a mixed graph takes; a step with more runs eagerly
# Gathered key positions, all pieces together (their prefixes too). A graph gathers all of
# its positions at every layer, used or not, so the smallest that fits is taken: in the
# sustained workload (prompts U[100, 1,024], 512 tokens a step) 810 of its 1,116
# prompt-carrying steps fit 1,024 keys and 201 more fit 2,048 (benchmarks/engine_host.py's
# schedule), and each gathered 4,096 when these were the smallest.
MIXED_KEYS = (1024, 2048, 4096, 16384)


def mixed_graph_sizes(budget: int, burst: int | None = None) -> list[int]:
    """Prompt tokens per mixed graph: a quarter of the budget, the budget, and the burst
    budget, so a short question does not pay for the budget's worth of padded rows in the
    dense products, nor a step of the usual budget for a burst's."""
    return sorted({max(16, budget // 4), budget, burst or budget})


def mixed_graph_shapes(mixed_tokens: list[int]) -> list[tuple[int, int]]:
    """(prompt tokens, gathered keys) of each mixed graph to capture, largest first.

    Keys hold every prompt token (the padding piece's too), so a graph of more tokens than
    keys could never be used; capturing one (8,192 tokens over 4,096 keys) wrote past its
    gathered keys and faulted on an H200: an illegal memory access that poisons the
    process, so a worker with --max-prefill-tokens 2048 (burst 8,192) could not start."""
    return [(tokens, keys) for tokens in sorted(mixed_tokens, reverse=True)
            for keys in sorted(MIXED_KEYS, reverse=True) if keys >= tokens]


class MixedGraph:
    """A step of every slot's decode row (row i is slot i; idle slots at position -1) and up
    to `tokens` prompt tokens in up to MIXED_PIECES pieces whose keys, their cached prefixes
    included, fill at most `keys` gathered positions. The padding after the pieces is one
    more piece of its own, attending to scratch positions, so every row stays finite."""

    def __init__(self, slots: int, tokens: int, keys: int, max_context: int, device: torch.device):
        from .runner import StepBatch

        self.slots, self.tokens, self.keys = slots, tokens, keys
        self.batch = StepBatch.static_mixed(slots, tokens, MIXED_PIECES + 1, keys, max_context, device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def fits(self, pieces: list[Chunk]) -> bool:
        tokens = sum(len(c.token_ids) for c in pieces)
        return (len(pieces) <= MIXED_PIECES and tokens <= self.tokens
                and sum(c.start + len(c.token_ids) for c in pieces) + self.tokens - tokens <= self.keys
                and all(len(c.logit_rows()) <= 1 for c in pieces))

    def fill(self, runner, decodes: list[Chunk], pieces: list[Chunk], previous: torch.Tensor | None) -> list[int]:
        """Copy one step into the static buffers; returns the logit row of each wanted chunk,
        decodes first, then pieces, in the order given."""
        slots, tokens, batch = self.slots, self.tokens, self.batch
        ids, positions, slot_of = [0] * (slots + tokens), [-1] * (slots + tokens), list(range(slots)) + [0] * tokens
        lengths = [0] * slots
        for chunk in decodes:
            ids[chunk.slot], positions[chunk.slot], lengths[chunk.slot] = chunk.token_ids[0], chunk.start, chunk.start + 1
        at, queries, keys, rows = slots, [0], [0], []
        for chunk in pieces:
            count = len(chunk.token_ids)
            ids[at:at + count] = chunk.token_ids
            positions[at:at + count] = range(chunk.start, chunk.start + count)
            slot_of[at:at + count] = [chunk.slot] * count
            rows.append(at + chunk.logit_rows()[0] if chunk.logit_rows() else None)
            at += count
            queries.append(at - slots)
            keys.append(keys[-1] + chunk.start + count)
        padding = slots + tokens - at
        queries.append(tokens)
        keys.append(keys[-1] + padding)  # the padding piece: as many scratch keys as queries
        while len(queries) < MIXED_PIECES + 2:
            queries.append(tokens)
            keys.append(keys[-1])
        wanted = [c.slot for c in decodes if c.logit_rows()] + [r for r in rows if r is not None]
        logit_rows = wanted + [0] * (slots + MIXED_PIECES - len(wanted))
        carried = [c for c in decodes if c.from_previous is not None]
        key_lengths = [c.start + len(c.token_ids) for c in pieces]
        staged = to_device(ids + positions + slot_of + lengths + queries + keys + logit_rows
                           + [c.slot for c in carried] + [c.from_previous for c in carried]
                           + [c.slot for c in pieces] + key_lengths, torch.long, runner.device)
        width = slots + tokens
        batch.token_ids.copy_(staged[:width])
        batch.positions.copy_(staged[width:2 * width])
        batch.slots.copy_(staged[2 * width:3 * width])
        rest = staged[3 * width:]
        runner.decode_attention.lengths.copy_(rest[:slots])
        rest = rest[slots:]
        bounds = len(queries)
        batch.piece_cu_queries.copy_(rest[:bounds])
        batch.piece_cu_keys.copy_(rest[bounds:2 * bounds])
        rest = rest[2 * bounds:]
        batch.logit_rows.copy_(rest[:slots + MIXED_PIECES])
        rest = rest[slots + MIXED_PIECES:]
        if carried:
            into, taken = rest[:len(carried)], rest[len(carried):2 * len(carried)]
            batch.token_ids.index_copy_(0, into, previous.index_select(0, taken))
            rest = rest[2 * len(carried):]
        batch.piece_gather.zero_()  # the padding piece's keys, and what is unused, read the scratch block
        if pieces:
            total = keys[len(pieces)]
            gather = runner.piece_key_positions(rest[:len(pieces)], rest[len(pieces):], total)
            batch.piece_gather[:total].copy_(gather)
        # The host's bounds, for the exact (CPU) path only: the GPU reads the tensors above.
        batch.piece_queries = list(zip(queries, queries[1:]))
        batch.piece_keys = list(zip(keys, keys[1:]))
        return list(range(len(wanted)))

    def run(self, runner) -> torch.Tensor:
        """Replay the captured step; where none is captured (the CPU), run the same batch."""
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return runner.forward_batch(self.batch)
