"""Batching policy: which pending requests form the next job, and when.

Pure: no I/O and no clock of its own (every call takes `now`), so it is tested
with plain values. A batch opens at its first request and closes when it
holds max_batch requests or max_wait_ms after that first arrival, whichever
comes first, and never larger than the free slots the caller reports.

Within a batch, higher priority goes first; within one priority, tenants take
turns (one request each, round robin), and within a tenant its producers do,
so one producer's burst cannot starve another producer's occasional request,
and a tenant cannot widen its share by naming many producers. (A tenant is a
request stream, docs/protocol.md; requests of the shared stream are tenant "".)

A batch holds requests for one model only and goes only to a worker that
serves that model (ModelBatchers, route, pick_worker).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Collection, Generic, Iterable, Iterator, TypeVar

from batchd.client.errors import UnknownModel

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
class _Turns(Generic[Item]):
    """Queues that take turns, one item each (round robin), keyed by who queued them."""

    queues: dict[str, deque] = field(default_factory=dict)
    turn: deque = field(default_factory=deque)

    def add(self, key: str, pending: _Pending) -> None:
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = deque()
            self.turn.append(key)
        queue.append(pending)

    def pop_fair(self) -> _Pending:
        key = self.turn.popleft()
        queue = self.queues[key]
        pending = queue.popleft()
        if queue:
            self.turn.append(key)
        else:
            del self.queues[key]
        return pending

    def heads(self) -> Iterator[_Pending]:
        """The oldest item of each queue (the oldest of all is among them)."""
        return (queue[0] for queue in self.queues.values())

    def remove(self, should_remove: Callable[[Item], bool]) -> list[Item]:
        removed: list[Item] = []
        for key in list(self.queues):
            kept: deque = deque()
            for pending in self.queues[key]:
                if should_remove(pending.item):
                    removed.append(pending.item)
                else:
                    kept.append(pending)
            if kept:
                self.queues[key] = kept
            else:
                del self.queues[key]
                self.turn.remove(key)
        return removed

    def __iter__(self) -> Iterator[_Pending]:
        for queue in self.queues.values():
            yield from queue

    def __bool__(self) -> bool:
        return bool(self.queues)


@dataclass
class _PriorityLevel(Generic[Item]):
    """Requests of one priority: tenants take turns, and within each tenant its producers."""

    tenants: dict[str, _Turns] = field(default_factory=dict)
    turn: deque = field(default_factory=deque)

    def add(self, tenant: str, producer: str, pending: _Pending) -> None:
        producers = self.tenants.get(tenant)
        if producers is None:
            producers = self.tenants[tenant] = _Turns()
            self.turn.append(tenant)
        producers.add(producer, pending)

    def pop_fair(self) -> _Pending:
        tenant = self.turn.popleft()
        producers = self.tenants[tenant]
        pending = producers.pop_fair()
        if producers:
            self.turn.append(tenant)
        else:
            del self.tenants[tenant]
        return pending

    def heads(self) -> Iterator[_Pending]:
        for producers in self.tenants.values():
            yield from producers.heads()

    def remove(self, should_remove: Callable[[Item], bool]) -> list[Item]:
        removed: list[Item] = []
        for tenant in list(self.tenants):
            producers = self.tenants[tenant]
            removed += producers.remove(should_remove)
            if not producers:
                del self.tenants[tenant]
                self.turn.remove(tenant)
        return removed

    def __iter__(self) -> Iterator[_Pending]:
        for producers in self.tenants.values():
            yield from producers

    def __bool__(self) -> bool:
        return bool(self.tenants)


class Batcher(Generic[Item]):
    """Holds requests that are not yet dispatched and cuts them into batches."""

    def __init__(self, policy: BatchPolicy):
        self.policy = policy
        self._levels: dict[int, _PriorityLevel] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, item: Item, arrival: float, *, priority: int = 0, producer: str = "", tenant: str = "") -> None:
        """Hold a request that arrived at `arrival` (the caller's clock, like every `now`)."""
        level = self._levels.get(priority)
        if level is None:
            level = self._levels[priority] = _PriorityLevel()
        level.add(tenant, producer, _Pending(item, arrival))
        self._count += 1

    def opened_at(self) -> float | None:
        """Arrival time of the oldest pending request: when the current batch opened."""
        arrivals = [head.arrival for level in self._levels.values() for head in level.heads()]
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
            while level and len(batch) < size:
                batch.append(level.pop_fair().item)
            if not level:
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
            removed += level.remove(should_remove)
            if not level:
                del self._levels[priority]
        self._count -= len(removed)
        return removed

    def items(self) -> Iterator[Item]:
        for level in self._levels.values():
            for pending in level:
                yield pending.item


class ModelBatchers(Generic[Item]):
    """One Batcher per model a request names ("" for requests that name none), so a batch
    never mixes models; each closes by the same policy."""

    def __init__(self, policy: BatchPolicy):
        self.policy = policy
        self._by_model: dict[str, Batcher[Item]] = {}

    def __len__(self) -> int:
        return sum(len(b) for b in self._by_model.values())

    def models(self) -> list[str]:
        """The models with requests held."""
        return list(self._by_model)

    def add(self, item: Item, arrival: float, *, model: str, priority: int = 0, producer: str = "",
            tenant: str = "") -> None:
        batcher = self._by_model.get(model)
        if batcher is None:
            batcher = self._by_model[model] = Batcher(self.policy)
        batcher.add(item, arrival, priority=priority, producer=producer, tenant=tenant)

    def due(self, now: float) -> list[str]:
        """Models whose batch is due, the longest open first."""
        due = [m for m, b in self._by_model.items() if b.is_due(now)]
        return sorted(due, key=lambda m: self._by_model[m].opened_at() or now)

    def is_due(self, model: str, now: float) -> bool:
        batcher = self._by_model.get(model)
        return batcher is not None and batcher.is_due(now)

    def opened_at(self, model: str) -> float | None:
        batcher = self._by_model.get(model)
        return batcher.opened_at() if batcher is not None else None

    def seconds_until_due(self, now: float, models: Iterable[str]) -> float | None:
        """How long until the first batch of the given models closes; None when none is held."""
        waits = [self._by_model[m].seconds_until_due(now) for m in models if m in self._by_model]
        waits = [w for w in waits if w is not None]
        return min(waits) if waits else None

    def take(self, model: str, now: float, free_slots: int) -> list[Item]:
        batcher = self._by_model.get(model)
        if batcher is None:
            return []
        batch = batcher.take(now, free_slots)
        if not len(batcher):
            del self._by_model[model]
        return batch

    def remove(self, should_remove: Callable[[Item], bool]) -> list[Item]:
        removed: list[Item] = []
        for model in list(self._by_model):
            removed += self._by_model[model].remove(should_remove)
            if not len(self._by_model[model]):
                del self._by_model[model]
        return removed

    def items(self) -> Iterator[Item]:
        for batcher in self._by_model.values():
            yield from batcher.items()


def route(requested: str, served: Collection[str], recent: Collection[str] = ()) -> str | None:
    """The model that answers a request: the one it names, or the fleet's only model when it
    names none. None while no worker is live (the request waits, as it always has), and while
    the model's workers went quiet only a moment ago (`recent`: a late heartbeat, a worker
    restarting); raises UnknownModel when live workers serve other models only, naming those
    they serve."""
    if not served:
        return None
    if not requested:
        known = set(served) | set(recent)
        if len(known) == 1:
            return next(iter(served))
        raise UnknownModel(f"this fleet serves {len(known)} models ({', '.join(sorted(known))}): "
                           "name one with model=")
    if requested in served:
        return requested
    if requested in recent:
        return None
    raise UnknownModel(f"no live worker serves model {requested!r}; the models served are: "
                       f"{', '.join(sorted(served))}")


@dataclass
class WorkerCapacity:
    """A scheduler's view of one worker: advertised slots minus what it sent since."""

    worker_id: str
    free_slots: int
    # (shard, job stream id, requests) this scheduler dispatched that the worker's
    # heartbeat had not yet counted.
    unseen: list[tuple[int, tuple[int, int], int]] = field(default_factory=list)
    # The model names it answers to (Heartbeat.models).
    models: frozenset[str] = frozenset()

    def available(self) -> int:
        return max(0, self.free_slots - sum(n for _, _, n in self.unseen))

    def refresh(self, free_slots: int, last_jobs_read: dict[int, tuple[int, int]]) -> None:
        """A heartbeat: free slots, and the newest job read on each shard's job stream."""
        self.free_slots = free_slots
        self.unseen = [(shard, sid, n) for shard, sid, n in self.unseen if sid > last_jobs_read.get(shard, (0, 0))]

    def dispatched(self, shard: int, job_stream_id: tuple[int, int], requests: int) -> None:
        self.unseen.append((shard, job_stream_id, requests))


def pick_worker(workers: dict[str, WorkerCapacity], model: str | None = None) -> WorkerCapacity | None:
    """The live worker serving model (None: any) with the most room, or None when each is full."""
    candidates = (w for w in workers.values() if model is None or model in w.models)
    best = max(candidates, key=lambda w: w.available(), default=None)
    return best if best is not None and best.available() > 0 else None


def models_served(workers: dict[str, WorkerCapacity]) -> set[str]:
    return {model for worker in workers.values() for model in worker.models}
