"""Request shards (`--shards N`): the key layout Redis Cluster needs, on one real server.

Each shard's keys share a hash tag, so a script touches one slot; these tests check the layout
itself, and a whole fleet running on it. tests/test_cluster.py runs the same fleet on a cluster,
where Redis itself refuses any command whose keys span slots.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

import pytest
import redis
from redis.crc import key_slot

from batchd import AsyncClient, Client
from batchd.client.errors import Cancelled, DeadlineExceeded, NoWorkers, ResultTimeout, WrongShards
from batchd.client.keys import Keys, format_last_reads, job_ref, parse_job_ref, parse_last_reads, shard_tags
from batchd.status import read_status



def test_one_shard_keeps_the_one_server_layout_key_for_key():
    keys = Keys()
    assert (keys.requests, keys.requests_of("alice"), keys.jobs("w1"), keys.result("r1"), keys.owner("r1"),
            keys.accepted("r1"), keys.cancelled("r1"), keys.workers, keys.heartbeat("w1"), keys.stats,
            keys.dead_letters, keys.config, keys.overloaded_of("alice"), keys.tenant_streams) == (
        "batchd:requests", "batchd:requests:alice", "batchd:jobs:w1", "batchd:result:r1", "batchd:owner:r1",
        "batchd:accepted:r1", "batchd:cancel:r1", "batchd:workers", "batchd:worker:w1", "batchd:stats",
        "batchd:dead", "batchd:config", "batchd:overloaded:alice", "batchd:requests:*")
    assert keys.job_streams("w1") == ["batchd:jobs:w1"] and keys.shared_streams() == ["batchd:requests"]
    assert parse_job_ref(job_ref(0, "5-1")) == (0, "5-1") and format_last_reads({0: "5-1"}) == "5-1"


@pytest.mark.parametrize("request_id", ["r1", "alice/client-7", "é-ü", "x" * 200])
def test_every_key_a_script_touches_for_one_request_lies_in_one_slot(request_id):
    keys = Keys(shards=6)
    shard = keys.shard_of(request_id)
    tenant = request_id.partition("/")[0] if "/" in request_id else ""
    touched = [keys.result(request_id), keys.owner(request_id), keys.accepted(request_id),
               keys.cancelled(request_id), keys.stream_of_request(request_id), keys.requests_of(tenant, shard),
               keys.jobs("worker-1", shard), keys.stats_in(shard), keys.dead_letters_in(shard),
               keys.config_in(shard), keys.overloaded_of(tenant, shard)]
    assert len({key_slot(key.encode()) for key in touched}) == 1, touched
    assert keys.shard_of_key(keys.stream_of_request(request_id)) == shard
    assert keys.tenant_of_stream(keys.stream_of_request(request_id)) == tenant


def test_fleet_keys_share_one_slot_so_heartbeats_are_one_mget():
    keys = Keys(shards=4)
    fleet = [keys.workers, keys.heartbeat("a"), keys.heartbeat("b"), keys.tokenizer("m"), keys.pin("h"), keys.tenants]
    assert len({key_slot(key.encode()) for key in fleet}) == 1


@pytest.mark.parametrize("masters", [3, 6])
def test_shards_lie_evenly_over_the_masters_of_a_cluster_created_with_equal_ranges(masters):
    # redis-cli --cluster create gives master m the slots [m * 16384 / masters, (m + 1) * 16384 / masters).
    shards = 2 * masters
    owner = [key_slot(f"{{{tag}}}".encode()) * masters // 16384 for tag in shard_tags(shards)]
    assert Counter(owner) == {m: 2 for m in range(masters)}


def test_request_ids_spread_over_the_shards():
    keys = Keys(shards=3)
    counts = Counter(keys.shard_of(f"client-1-{i}") for i in range(3000))
    assert set(counts) == {0, 1, 2} and min(counts.values()) > 900


def test_a_heartbeat_names_the_last_job_read_on_each_shard():
    text = format_last_reads({0: "10-0", 2: "7-3"})
    assert parse_last_reads(text) == {0: (10, 0), 2: (7, 3)}
    assert parse_last_reads("12-4") == {0: (12, 4)}  # an unsharded worker's beat


def test_a_shard_count_out_of_range_is_refused():
    with pytest.raises(ValueError, match="shards must be 1..256"):
        Keys(shards=0)


@pytest.fixture
def sharded(redis_server, fleet_on):
    return fleet_on(redis_server.url, shards=3)


def test_a_sharded_fleet_answers_every_request_from_every_shard(sharded, redis_client):
    sharded.scheduler("--max-batch", "8")
    sharded.scheduler("--max-batch", "8")
    sharded.echo_worker("--slots", "16", "--token-delay-ms", "5")
    sharded.echo_worker("--slots", "16", "--token-delay-ms", "5")
    sharded.wait_for_workers(2)

    async def burst() -> list:
        async with AsyncClient(sharded.url, shards=3) as client:
            return await asyncio.gather(*(client.generate(prompt=f"prompt {i}", max_new_tokens=50, timeout=60)
                                          for i in range(90)))

    results = asyncio.run(burst())
    assert [r.text for r in results] == [f"prompt {i}" for i in range(90)]
    keys = Keys(shards=3)
    assert Counter(keys.shard_of(r.request_id) for r in results).keys() == {0, 1, 2}
    with Client(sharded.url, shards=3) as client:
        streamed = list(client.stream(prompt="streamed", max_new_tokens=20))
        assert streamed[-1].text == "streamed"
        handle = client.submit("cancelled " * 200, max_new_tokens=2000)
        stream = iter(handle)
        next(stream)  # running on a worker
        handle.cancel()
        try:
            reason = list(stream)[-1].finish_reason
        except Cancelled:
            reason = "cancelled"
        assert reason == "cancelled"
    # Each shard dispatched its own jobs, counted in its own stats; status sums them.
    per_shard = [int(redis_client.hget(keys.stats_in(s), "requests_dispatched") or 0) for s in range(3)]
    assert all(n > 0 for n in per_shard), per_shard
    status = read_status(redis_client, keys)
    assert status["requests_dispatched"] == sum(per_shard) == 92
    assert len(status["workers"]) == 2
    assert redis_client.exists("batchd:requests") == 0  # nothing went to the unsharded stream


def test_a_sharded_fleet_rehands_a_killed_workers_jobs_on_every_shard(sharded):
    sharded.scheduler()
    doomed = sharded.echo_worker("--slots", "64", "--token-delay-ms", "60")
    sharded.wait_for_workers(1)

    async def run() -> list:
        async with AsyncClient(sharded.url, shards=3) as client:
            pending = [asyncio.ensure_future(client.generate(prompt=f"p{i} " * 8, max_new_tokens=64, timeout=90))
                       for i in range(24)]
            await asyncio.sleep(0.8)  # every request running on the doomed worker
            doomed.kill()
            sharded.echo_worker("--slots", "64")
            return await asyncio.gather(*pending)

    results = asyncio.run(run())
    assert [r.text for r in results] == [f"p{i} " * 8 for i in range(24)]
    assert {r.attempt for r in results} == {1}, "each request restarted once, on the new worker"


def test_an_id_on_another_shards_stream_is_dead_lettered_and_the_fleet_serves_on(sharded, redis_client):
    sharded.scheduler()
    sharded.echo_worker()
    sharded.wait_for_workers(1)
    keys = Keys(shards=3)
    wrong = next(s for s in range(3) if s != keys.shard_of("stray-1"))
    redis_client.xadd(keys.requests_of("", wrong), {"id": "stray-1", "data": b"\x80"})
    with Client(sharded.url, shards=3) as client:
        assert client.generate(prompt="after", max_new_tokens=8).text == "after"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not redis_client.xlen(keys.dead_letters_in(wrong)):
        time.sleep(0.1)
    (_, fields), = redis_client.xrange(keys.dead_letters_in(wrong))
    assert b"belongs to shard" in fields[b"reason"] and fields[b"id"] == b"stray-1"
    assert redis_client.exists(keys.result("stray-1")) == 0


def test_producers_and_workers_of_another_shard_count_are_refused(sharded, redis_client):
    """A producer or worker whose --shards differs from the schedulers' would use streams
    nobody reads (its requests would wait out their timeouts): each is refused at its start,
    with the fleet's count in the message."""
    sharded.scheduler()
    sharded.echo_worker()
    sharded.wait_for_workers(1)
    # The scheduler writes the count as it starts, which a worker registering does not wait for.
    deadline = time.monotonic() + 10
    while redis_client.hget("batchd:config", "shards") is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert redis_client.hget("batchd:config", "shards") == b"3"  # the untagged hash, for any count
    for shards in (1, 2):
        with pytest.raises(WrongShards, match="into 3 shard"):
            Client(sharded.url, shards=shards)

    async def async_submit():
        async with AsyncClient(sharded.url, shards=1) as client:
            await client.generate(prompt="lost", max_new_tokens=2, timeout=5)

    with pytest.raises(WrongShards, match="use shards=3"):
        asyncio.run(async_submit())
    wrong_worker = sharded.echo_worker("--shards", "1")
    assert wrong_worker.wait(timeout=30) == 2
    assert "uses 1" in wrong_worker.log_path.read_text() and "--shards 3" in wrong_worker.log_path.read_text()
    with Client(sharded.url, shards=3) as client:  # the fleet's own count is served
        assert client.generate(prompt="served", max_new_tokens=20, timeout=30).text == "served"


def test_schedulers_publish_their_count_and_hear_of_another(redis_client):
    """publish_settings writes the count where any layout reads it and returns the count that
    stood there, which is how a scheduler hears of another one running another --shards."""
    from batchd.daemon.toolkit import publish_settings

    three, one = Keys(shards=3), Keys(shards=1)
    assert publish_settings(redis_client, three, max_queue=10, max_attempts=2) is None
    assert publish_settings(redis_client, three, max_queue=10, max_attempts=2) == 3
    assert [redis_client.hget(three.config_in(s), "shards") for s in range(3)] == [b"3"] * 3
    assert publish_settings(redis_client, one, max_queue=10, max_attempts=2) == 3  # a scheduler of 1 hears of 3
    assert redis_client.hget("batchd:config", "shards") == b"1"
    redis_client.hset("batchd:config", "shards", "many")  # not a scheduler's writing: no count
    assert publish_settings(redis_client, one, max_queue=10, max_attempts=2) is None


def test_a_scheduler_sends_nothing_to_a_worker_of_another_shard_count(sharded, redis_client):
    """A worker started before any scheduler cannot check the fleet's count; its heartbeat
    names its own, and a scheduler of another count leaves it idle and says why."""
    early = sharded.echo_worker("--shards", "2")
    sharded.wait_for_workers(1)  # heartbeats share the fleet tag for any count above 1
    scheduler = sharded.scheduler()
    with Client(sharded.url, shards=3) as client:
        with pytest.raises((NoWorkers, ResultTimeout, DeadlineExceeded)):
            client.generate(prompt="nobody", max_new_tokens=5, timeout=3)
        assert early.poll() is None
        assert "runs --shards 2 against this scheduler's 3" in scheduler.log_path.read_text()
        sharded.echo_worker()
        assert client.generate(prompt="served", max_new_tokens=20, timeout=30).text == "served"


def test_schedulers_can_split_the_shards_between_them(sharded, redis_client):
    first = sharded.scheduler("--read-shards", "0")
    second = sharded.scheduler("--read-shards", "1-2")
    sharded.echo_worker("--slots", "32")
    sharded.wait_for_workers(1)

    async def burst() -> list:
        async with AsyncClient(sharded.url, shards=3) as client:
            return await asyncio.gather(*(client.generate(prompt=f"p{i}", max_new_tokens=10, timeout=60)
                                          for i in range(60)))

    assert [r.text for r in asyncio.run(burst())] == [f"p{i}" for i in range(60)]
    keys = Keys(shards=3)
    # Each stream is read by its own scheduler's group consumer only.
    for shard, reader in ((0, first), (1, second), (2, second)):
        consumers = [c["name"].decode() for c in redis_client.xinfo_consumers(keys.requests_of("", shard), "schedulers")]
        assert len(consumers) == 1 and f"-{reader.pid}-" in consumers[0], (shard, consumers, reader.pid)


def test_a_shard_no_scheduler_reads_is_reported(redis_client):
    from batchd.daemon.toolkit import UNREAD_AFTER_S, mark_shards_read

    keys = Keys(shards=3)
    assert mark_shards_read(redis_client, keys, (0, 1), now_s=1000.0) == [2]
    assert mark_shards_read(redis_client, keys, (2,), now_s=1000.0 + UNREAD_AFTER_S / 2) == []
    # Nobody marks 0 and 1 again: once they are older than UNREAD_AFTER_S they are unread.
    assert mark_shards_read(redis_client, keys, (2,), now_s=1001.0 + UNREAD_AFTER_S) == [0, 1]


def test_read_shards_takes_numbers_and_ranges_within_the_fleet(sharded):
    from batchd.cli import shard_list

    assert shard_list("0-2,5") == (0, 1, 2, 5) and shard_list("3") == (3,)
    for bad in ("", "a", "2-x", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            shard_list(bad)
    beyond = sharded.scheduler("--read-shards", "1,3")
    assert beyond.wait(timeout=30) == 2
    assert "names 3, but the fleet has 3 shard(s)" in beyond.log_path.read_text()


def test_an_idle_cluster_read_waits_longer_each_time_up_to_its_cap_and_a_hit_resets_it(monkeypatch):
    from batchd.daemon import toolkit

    slept = []
    monkeypatch.setattr(toolkit.time, "sleep", slept.append)
    poll = toolkit.ClusterPoll()
    for _ in range(6):
        poll.after(False, block_ms=1000)
    poll.after(False, block_ms=5)  # never longer than the block asked for
    poll.after(True, block_ms=1000)
    poll.after(False, block_ms=1000)
    poll.after(False, block_ms=None)  # a read that asked not to block does not sleep
    assert slept == [0.002, 0.004, 0.008, 0.016, 0.016, 0.016, 0.005, 0.002]


def test_shard_channels_carry_the_request_shard_tag_and_route_back_to_the_request():
    from batchd.client.keys import Keys, uses_shard_channels

    assert uses_shard_channels(cluster=True, shards=6)
    assert not uses_shard_channels(cluster=True, shards=1) and not uses_shard_channels(cluster=False, shards=6)
    plain, sharded = Keys(shards=6), Keys(shards=6, shard_channels=True)
    request_id = "acme/client-1-7"
    assert plain.channel(request_id) == f"batchd:res:{request_id}"
    channel = sharded.channel(request_id)
    # In the request's slot: a script's SPUBLISH on it stays with the script's keys.
    assert key_slot(channel.encode()) == key_slot(sharded.owner(request_id).encode())
    assert sharded.request_of_channel(channel) == request_id
    assert plain.request_of_channel(plain.channel(request_id)) == request_id
    assert sharded.request_of_channel("batchd:cancels") is None and sharded.request_of_channel("other:res:x") is None


def test_an_unasked_shard_subscription_confirmation_makes_its_request_read_what_it_missed():
    """A shard channel moved to its slot's new master (or a reconnect) is confirmed again with
    nobody waiting: the request then reads its stored result, as after a reconnect."""
    from batchd.client.core import RECHECK, Routes
    from batchd.client.keys import Keys

    keys = Keys(shards=3, shard_channels=True)
    delivered: dict[str, list] = {"a": [], "b": []}

    class Handle:
        def __init__(self, request_id):
            self.request_id = request_id

        def _deliver(self, payload):
            delivered[self.request_id].append(payload)

    routes, handles = Routes(keys), {"a": Handle("a"), "b": Handle("b")}
    waiter = object()
    confirmations = {keys.channel("a"): waiter}
    assert routes.route({"type": "ssubscribe", "channel": keys.channel("a").encode(), "data": 1},
                        handles, confirmations) is waiter
    assert delivered == {"a": [], "b": []}  # the first confirmation was asked for
    assert routes.route({"type": "ssubscribe", "channel": keys.channel("a").encode(), "data": 1},
                        handles, confirmations) is None
    routes.route({"type": "smessage", "channel": keys.channel("b").encode(), "data": b"event"}, handles, {})
    assert delivered == {"a": [RECHECK], "b": [b"event"]}


def test_a_shard_subscription_whose_master_is_down_is_held_back_while_the_others_go_out():
    """A pass over shard-channel changes (both clients' readers run it): a change whose master
    refuses is held back with the others for that master, the rest go out in the same pass;
    the held-back ones are tried again after a back-off that doubles while the master stays
    down, and an unsubscription whose subscription never went out cancels it."""
    from batchd.client.core import ShardChanges

    node = {"a1": "A", "a2": "A", "b1": "B", "b2": "B", "c1": "C"}
    changes, sent, down = ShardChanges(), [], {"A"}

    def run_pass(now, queued):
        sending = changes.begin(now, queued, node.get)
        for change in sending:
            if node[change[1]] in down:
                sending.fail(ConnectionError(f"master {node[change[1]]} refused"))
            else:
                sent.append(change)
        return changes.end(sending, now)

    failure = run_pass(0.0, [(True, "a1"), (True, "b1"), (True, "a2"), (True, "c1")])
    assert "master A refused" in str(failure)
    assert sent == [(True, "b1"), (True, "c1")]  # A tried once, then skipped for this pass
    assert changes and changes.held_back() == {"a1", "a2"}
    assert run_pass(0.05, [(True, "b2")]) is None and sent[-1] == (True, "b2")  # not due yet: not tried
    assert run_pass(0.1, []) is not None  # due after 0.1 s, A still down: held back for 0.2 s
    assert run_pass(0.25, []) is None and changes.held_back() == {"a1", "a2"}
    down.clear()
    assert run_pass(0.35, [(False, "a2")]) is None  # a2's request went away before it was subscribed
    assert sent[-1] == (True, "a1") and (True, "a2") not in sent and (False, "a2") not in sent
    assert not changes
    # Both still unsent in one pass: they cancel out too.
    assert run_pass(0.4, [(True, "c2"), (False, "c2"), (False, "b1")]) is None
    assert sent[-1] == (False, "b1") and (True, "c2") not in sent
