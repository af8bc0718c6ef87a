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

    def __init__(self, runner: PagedRunner, sizes: tuple[int, ...]):
        self._runner = runner
        self.graphs: list[DecodeGraph] = []
        self.capture(sizes)

    @property
    def sizes(self) -> list[int]:
        return [graph.rows for graph in self.graphs]

    def use(self, sizes: list[int]) -> None:
        """Replay only graphs of these sizes (benchmarks compare sets on one engine)."""
        unknown = set(sizes) - set(self.sizes)
        if unknown or self._runner.slots not in sizes:
            raise ValueError(f"graph sizes {sorted(sizes)} must be among {self.sizes} and include every slot")
        self._active = [graph for graph in self.graphs if graph.rows in sizes]

    def capture(self, sizes: tuple[int, ...]) -> None:
        """One graph per size, largest first, all in one memory pool: only one replays at a
        time, so their intermediate tensors can share memory."""
        runner = self._runner
        runner.decode_attention.lengths.zero_()
        graphs, pool = [], None
        with torch.inference_mode():
            for rows in sorted(sizes, reverse=True):
                graph = DecodeGraph(rows, runner.slots, runner.device)
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
        self.graphs = graphs[::-1]
        self._active = list(self.graphs)
        log.info("decode CUDA graphs captured for %s decoding requests", ", ".join(map(str, self.sizes)))

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
        runner = self._runner
        graph = next(g for g in self._active if g.rows >= len(chunks))
        row_of, slot_of_row = graph.assign(chunks)
        rows, slots = graph.rows, runner.slots
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
        graph.batch.token_ids.copy_(staged[:rows])
        graph.batch.positions.copy_(staged[rows:2 * rows])
        runner.decode_attention.lengths.copy_(staged[2 * rows:2 * rows + slots])
        rest = staged[2 * rows + slots:]
        if slot_of_row:
            graph.batch.slots.copy_(rest[:rows])
            rest = rest[rows:]
        if carried:
            into, taken = rest[len(logit_rows):len(logit_rows) + len(carried)], rest[len(logit_rows) + len(carried):]
            graph.batch.token_ids.index_copy_(0, into, previous.index_select(0, taken))
        graph.graph.replay()
        return graph.logits[rest[:len(logit_rows)]].float()
