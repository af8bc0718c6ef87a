"""Batching policy: which pending requests form the next job, and when.

Pure: no I/O and no clock of its own (every call takes `now`), so it is tested
with plain values. A batch opens at its first request and closes when it
holds max_batch requests or max_wait_ms after that first arrival, whichever
comes first, and never larger than the free slots the caller reports.

Within a batch, higher priority goes first; within one priority, producers
take turns (one request each, round robin), so one producer's burst cannot
starve another producer's occasional request.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Generic, Iterator, TypeVar

Item = TypeVar("Item")


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int = 32
    max_wait_ms: float = 5.0

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if self.max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")


@dataclass
class _Pending(Generic[Item]):
    item: Item
    arrival: float


@dataclass
class _PriorityLevel(Generic[Item]):
    """Requests of one priority, one queue per producer, producers in turn order."""

    queues: dict[str, deque] = field(default_factory=dict)
    turn: deque = field(default_factory=deque)

    def add(self, producer: str, pending: _Pending) -> None:
        queue = self.queues.get(producer)
        if queue is None:
            queue = self.queues[producer] = deque()
            self.turn.append(producer)
        queue.append(pending)

    def pop_fair(self) -> _Pending:
        producer = self.turn.popleft()
        queue = self.queues[producer]
        pending = queue.popleft()
        if queue:
            self.turn.append(producer)
        else:
            del self.queues[producer]
        return pending

    def __iter__(self) -> Iterator[_Pending]:
        for queue in self.queues.values():
            yield from queue


class Batcher(Generic[Item]):
    """Holds requests that are not yet dispatched and cuts them into batches."""

    def __init__(self, policy: BatchPolicy):
        self.policy = policy
        self._levels: dict[int, _PriorityLevel] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, item: Item, arrival: float, *, priority: int = 0, producer: str = "") -> None:
        """Hold a request that arrived at `arrival` (the caller's clock, like every `now`)."""
        level = self._levels.get(priority)
        if level is None:
            level = self._levels[priority] = _PriorityLevel()
        level.add(producer, _Pending(item, arrival))
        self._count += 1

    def opened_at(self) -> float | None:
        """Arrival time of the oldest pending request: when the current batch opened."""
        arrivals = [queue[0].arrival for level in self._levels.values() for queue in level.queues.values()]
        return min(arrivals) if arrivals else None

    def is_due(self, now: float) -> bool:
        if self._count >= self.policy.max_batch:
            return True
        opened = self.opened_at()
        return opened is not None and (now - opened) * 1000.0 >= self.policy.max_wait_ms

    def seconds_until_due(self, now: float) -> float | None:
        """How long until a batch closes by time; None when nothing is pending."""
        if self._count >= self.policy.max_batch:
            return 0.0
        opened = self.opened_at()
        if opened is None:
            return None
        return max(0.0, opened + self.policy.max_wait_ms / 1000.0 - now)

    def take(self, now: float, free_slots: int) -> list[Item]:
        """The next batch if one is due and there is room for it, else []."""
        if free_slots <= 0 or not self.is_due(now):
            return []
        size = min(self._count, self.policy.max_batch, free_slots)
        batch: list[Item] = []
        for priority in sorted(self._levels, reverse=True):
            level = self._levels[priority]
            while level.queues and len(batch) < size:
                batch.append(level.pop_fair().item)
            if not level.queues:
                del self._levels[priority]
            if len(batch) == size:
                break
        self._count -= len(batch)
        return batch

    def remove(self, should_remove: Callable[[Item], bool]) -> list[Item]:
        """Take out every pending item for which should_remove is true (expired, cancelled)."""
        removed: list[Item] = []
        for priority in list(self._levels):
            level = self._levels[priority]
            for producer in list(level.queues):
                kept: deque = deque()
                for pending in level.queues[producer]:
                    if should_remove(pending.item):
                        removed.append(pending.item)
                    else:
                        kept.append(pending)
                if kept:
                    level.queues[producer] = kept
                else:
                    del level.queues[producer]
                    level.turn.remove(producer)
            if not level.queues:
                del self._levels[priority]
        self._count -= len(removed)
        return removed

    def items(self) -> Iterator[Item]:
        for level in self._levels.values():
            for pending in level:
                yield pending.item


@dataclass
class WorkerCapacity:
    """A scheduler's view of one worker: advertised slots minus what it sent since."""

    worker_id: str
    free_slots: int
    # (job stream id, requests) this scheduler dispatched that the worker's
    # heartbeat had not yet counted.
    unseen: list[tuple[tuple[int, int], int]] = field(default_factory=list)

    def available(self) -> int:
        return max(0, self.free_slots - sum(n for _, n in self.unseen))

    def refresh(self, free_slots: int, last_job_read: tuple[int, int]) -> None:
        self.free_slots = free_slots
        self.unseen = [(sid, n) for sid, n in self.unseen if sid > last_job_read]

    def dispatched(self, job_stream_id: tuple[int, int], requests: int) -> None:
        self.unseen.append((job_stream_id, requests))


def pick_worker(workers: dict[str, WorkerCapacity]) -> WorkerCapacity | None:
    """The live worker with the most room, or None when every worker is full."""
    best = max(workers.values(), key=lambda w: w.available(), default=None)
    return best if best is not None and best.available() > 0 else None
