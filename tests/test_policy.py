"""Batching policy with a fake clock: max batch, max wait, capacity, priority, fairness."""

from __future__ import annotations

import pytest

from batchd.client.keys import format_last_reads, parse_last_reads, parse_stream_id
from batchd.client.errors import UnknownModel
from batchd.scheduler.policy import Batcher, BatchPolicy, ModelBatchers, WorkerCapacity, models_served, pick_worker, route


def batcher(max_batch=4, max_wait_ms=10.0) -> Batcher:
    return Batcher(BatchPolicy(max_batch=max_batch, max_wait_ms=max_wait_ms))


def test_a_batch_closes_when_full_even_before_max_wait():
    b = batcher(max_batch=3)
    for i in range(3):
        b.add(i, arrival=0.0)
    assert b.take(now=0.0, free_slots=10) == [0, 1, 2]
    assert len(b) == 0


def test_a_batch_waits_max_wait_from_its_first_arrival_not_the_last():
    b = batcher(max_batch=10, max_wait_ms=10.0)
    b.add("a", arrival=1.000)
    b.add("b", arrival=1.008)
    assert b.take(now=1.009, free_slots=10) == []
    assert b.seconds_until_due(1.009) == pytest.approx(0.001)
    assert b.take(now=1.010, free_slots=10) == ["a", "b"]


def test_a_batch_is_never_larger_than_the_free_slots():
    b = batcher(max_batch=8)
    for i in range(8):
        b.add(i, arrival=0.0)
    assert b.take(now=0.0, free_slots=3) == [0, 1, 2]
    assert b.take(now=0.0, free_slots=0) == []
    assert len(b) == 5


def test_leftovers_are_due_at_once_because_they_already_waited():
    b = batcher(max_batch=2, max_wait_ms=10.0)
    for i in range(3):
        b.add(i, arrival=0.0)
    assert b.take(now=0.0, free_slots=10) == [0, 1]
    assert b.take(now=0.005, free_slots=10) == []
    assert b.take(now=0.010, free_slots=10) == [2]


def test_higher_priority_goes_first():
    b = batcher(max_batch=2, max_wait_ms=0)
    b.add("low", arrival=0.0, priority=0)
    b.add("high", arrival=0.1, priority=5)
    b.add("mid", arrival=0.2, priority=1)
    assert b.take(now=1.0, free_slots=2) == ["high", "mid"]
    assert b.take(now=1.0, free_slots=2) == ["low"]


def test_a_burst_from_one_producer_does_not_starve_another():
    b = batcher(max_batch=4, max_wait_ms=0)
    for i in range(1000):
        b.add(f"burst-{i}", arrival=0.0, producer="bulk")
    b.add("interactive", arrival=0.5, producer="chat")
    first = b.take(now=1.0, free_slots=4)
    assert "interactive" in first
    assert first.count("interactive") == 1 and len(first) == 4


def test_remove_takes_out_matching_items_and_keeps_order():
    b = batcher(max_batch=10, max_wait_ms=0)
    for i in range(6):
        b.add(i, arrival=0.0, producer=f"p{i % 2}")
    assert sorted(b.remove(lambda item: item % 3 == 0)) == [0, 3]
    assert len(b) == 4
    assert sorted(b.take(now=1.0, free_slots=10)) == [1, 2, 4, 5]


def test_empty_batcher_has_nothing_due():
    b = batcher()
    assert b.seconds_until_due(0.0) is None and b.take(now=99.0, free_slots=99) == []


def test_policy_rejects_nonsense():
    with pytest.raises(ValueError):
        BatchPolicy(max_batch=0)
    with pytest.raises(ValueError):
        BatchPolicy(max_wait_ms=-1)


def test_capacity_subtracts_what_the_worker_has_not_seen_yet():
    worker = WorkerCapacity("w1", free_slots=10)
    worker.dispatched(0, parse_stream_id("100-0"), 4)
    worker.dispatched(0, parse_stream_id("105-1"), 3)
    assert worker.available() == 3
    # The heartbeat says the worker read up to 100-0, and had 8 free after admitting it.
    worker.refresh(free_slots=8, last_jobs_read=parse_last_reads("100-0"))
    assert worker.available() == 5
    worker.refresh(free_slots=8, last_jobs_read=parse_last_reads("105-1"))
    assert worker.available() == 8


def test_capacity_counts_each_shards_job_stream_on_its_own():
    # Job stream ids of different shards are not comparable (other streams, on a cluster other
    # servers' clocks): a read on shard 1 says nothing of shard 2's jobs.
    worker = WorkerCapacity("w1", free_slots=10)
    worker.dispatched(1, parse_stream_id("500-0"), 4)
    worker.dispatched(2, parse_stream_id("100-0"), 3)
    worker.refresh(free_slots=10, last_jobs_read=parse_last_reads(format_last_reads({1: "900-0"})))
    assert worker.available() == 7
    worker.refresh(free_slots=10, last_jobs_read=parse_last_reads(format_last_reads({1: "900-0", 2: "100-0"})))
    assert worker.available() == 10


def test_pick_worker_prefers_the_most_room_and_none_when_full():
    a, b = WorkerCapacity("a", 2), WorkerCapacity("b", 5)
    assert pick_worker({"a": a, "b": b}) is b
    assert pick_worker({"a": WorkerCapacity("a", 0)}) is None
    assert pick_worker({}) is None


# -- routing by model -------------------------------------------------------------------
def test_a_batch_holds_one_model_and_each_closes_on_its_own_clock():
    batchers = ModelBatchers(BatchPolicy(max_batch=3, max_wait_ms=10))
    batchers.add("a1", 0.000, model="a")
    batchers.add("b1", 0.005, model="b")
    batchers.add("a2", 0.006, model="a")
    assert batchers.due(0.009) == []
    assert batchers.due(0.011) == ["a"]  # b opened 5 ms later
    assert batchers.take("a", 0.011, free_slots=10) == ["a1", "a2"]
    assert batchers.models() == ["b"] and len(batchers) == 1
    assert batchers.seconds_until_due(0.011, ["b"]) == pytest.approx(0.004)
    assert batchers.seconds_until_due(0.011, ["a"]) is None
    assert batchers.take("b", 0.016, free_slots=10) == ["b1"]
    assert len(batchers) == 0 and batchers.models() == []


def test_route_names_the_fleets_only_model_and_refuses_what_nobody_serves():
    assert route("", {"m"}) == "m"
    assert route("m", {"m", "n"}) == "m"
    assert route("", set()) is None and route("m", set()) is None  # no live worker yet: wait
    with pytest.raises(UnknownModel, match="name one") as none_named:
        route("", {"m", "n"})
    assert "m, n" in none_named.value.message
    with pytest.raises(UnknownModel, match="'x'.*m, n"):
        route("x", {"n", "m"})


def test_a_model_whose_workers_went_quiet_a_moment_ago_waits_instead_of_failing():
    # Its only worker's heartbeat is late: the request waits for it, as for a fleet with no worker yet.
    assert route("tiny", {"echo"}, recent={"tiny", "echo"}) is None
    # A request naming no model still needs the fleet to have one model, counting the quiet one.
    with pytest.raises(UnknownModel, match="name one"):
        route("", {"echo"}, recent={"tiny"})
    with pytest.raises(UnknownModel, match="'x'"):
        route("x", {"echo"}, recent={"tiny"})


def test_pick_worker_takes_only_workers_serving_the_model():
    a = WorkerCapacity("a", free_slots=10, models=frozenset({"m"}))
    b = WorkerCapacity("b", free_slots=2, models=frozenset({"n", "m"}))
    workers = {"a": a, "b": b}
    assert pick_worker(workers, "m") is a
    assert pick_worker(workers, "n") is b
    assert pick_worker(workers, "x") is None
    b.free_slots = 0
    assert pick_worker(workers, "n") is None
    assert models_served(workers) == {"m", "n"}


def test_tenants_take_turns_before_their_producers_do():
    """A tenant naming many producers gets one turn among tenants, not one per producer."""
    b = Batcher(BatchPolicy(max_batch=4, max_wait_ms=0))
    for i in range(8):
        b.add(f"many-{i}", arrival=0.0, producer=f"p{i}", tenant="many")
    b.add("one-0", arrival=0.0, producer="only", tenant="one")
    b.add("one-1", arrival=0.0, producer="only", tenant="one")
    assert b.take(now=0.0, free_slots=4) == ["many-0", "one-0", "many-1", "one-1"]
