"""A sharded fleet on a real Redis Cluster (redis+cluster://).

A cluster refuses any command whose keys lie in more than one slot, even when one node holds
every slot: so a fleet serving on a one-master cluster shows that no script, transaction or
multi-key read of batchd spans shards. The three-master cluster spreads the shards.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from batchd import AsyncClient, Client
from batchd.client.errors import InvalidRequest
from batchd.client.connection import ClusterAddress, open_redis, parse_cluster_url
from batchd.client.keys import Keys
from batchd.client.protocol import PROTOCOL_VERSION, Request, Result, decode_event
from batchd.client.scripts import LIBRARY, load_library
from batchd.embedded import ClusterSet
from batchd.status import read_status
from batchd.workers.holdings import Held
from batchd.workers.outbox import Outbox, Parcel

ROOT = Path(__file__).resolve().parent.parent



def test_cluster_url_names_the_nodes_and_the_acl_user():
    address = parse_cluster_url("redis+cluster://producer:s3cret@10.0.0.1:7000,10.0.0.2/")
    assert address == ClusterAddress(nodes=(("10.0.0.1", 7000), ("10.0.0.2", 6379)),
                                     username="producer", password="s3cret")
    assert parse_cluster_url("rediss+cluster://h:7000?ssl_ca_certs=/ca.pem").tls_options == {"ssl_ca_certs": "/ca.pem"}


@pytest.mark.parametrize("url, complaint", [
    ("redis+cluster://", "at least one cluster node"),
    ("redis+cluster://h:7000/2", "one database"),
    ("redis+cluster://h:port", "is not host:port"),
    ("redis+cluster://h:7000?db=1", "unknown option"),
])
def test_a_bad_cluster_url_is_one_line_naming_the_problem(url, complaint):
    with pytest.raises(ValueError, match=complaint):
        parse_cluster_url(url)


def _serve_and_check(url: str, fleet_on, shards: int, requests: int = 60) -> dict:
    fleet = fleet_on(url, shards)
    try:
        fleet.scheduler("--max-batch", "8")
        fleet.echo_worker("--slots", "32", "--token-delay-ms", "2")
        fleet.echo_worker("--slots", "32", "--token-delay-ms", "2")
        fleet.wait_for_workers(2)

        async def burst() -> list:
            async with AsyncClient(url, shards=shards) as client:
                return await asyncio.gather(*(client.generate(prompt=f"prompt {i}", max_new_tokens=40, timeout=60)
                                              for i in range(requests)))

        with _PlainSubscribers(url) as plain:
            results = asyncio.run(burst())
        assert [r.text for r in results] == [f"prompt {i}" for i in range(requests)], fleet.logs()
        # Events go out on shard channels (SPUBLISH), which a plain pattern subscriber on any
        # node never hears: nothing crossed the cluster bus.
        assert plain.heard == 0
        with Client(url, shards=shards) as client:
            assert [item for item in client.stream("streamed", max_new_tokens=20)][-1].text == "streamed"
            handle = client.submit("held", max_new_tokens=5)
            channel = Keys(shards=shards, shard_channels=True).channel(handle.request_id)
            # The request's own channel, subscribed on the master of its shard only, until read.
            assert _shard_subscribers(url) == {_master_of(url, channel): [channel]}
            assert handle.result().text == "held"
            deadline = time.monotonic() + 5  # the router sends the SUNSUBSCRIBE between reads
            while _shard_subscribers(url) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _shard_subscribers(url) == {}
        keys = Keys(shards=shards)
        status = read_status(open_redis(url), keys)
        assert status["requests_dispatched"] == requests + 2
        logs = fleet.logs()
        assert "CROSSSLOT" not in logs and "Traceback" not in logs, logs
        return {"shards": Counter(keys.shard_of(r.request_id) for r in results), "status": status}
    finally:
        fleet.stop_all()


class _PlainSubscribers:
    """A PSUBSCRIBE to every event channel on each master, counting what it hears."""

    def __init__(self, url: str):
        self._pubsubs = [redis.Redis(host=node.host, port=node.port).pubsub()
                         for node in open_redis(url).get_primaries()]
        self.heard = 0

    def __enter__(self):
        for pubsub in self._pubsubs:
            pubsub.psubscribe("batchd:*res:*")
        return self

    def __exit__(self, *exc):
        for pubsub in self._pubsubs:
            while (message := pubsub.get_message(timeout=0.1)) is not None:
                self.heard += message["type"] == "pmessage"
            pubsub.close()


def _shard_subscribers(url: str) -> dict:
    """Each master's subscribed shard channels ("host:port" -> channels), those with any."""
    found = {}
    for node in open_redis(url).get_primaries():
        channels = redis.Redis(host=node.host, port=node.port).execute_command("PUBSUB", "SHARDCHANNELS")
        if channels:
            found[node.name] = sorted(c.decode() for c in channels)
    return found


def _master_of(url: str, key: str) -> str:
    return open_redis(url).get_node_from_key(key).name


def test_cluster_one_master_refuses_cross_slot_commands_and_the_sharded_fleet_never_sends_one(server_binary, fleet_on):
    with ClusterSet(server_binary, masters=1, replicas_per_master=0) as cluster:
        seen = _serve_and_check(cluster.url, fleet_on, shards=3)
    assert set(seen["shards"]) == {0, 1, 2}


def test_cluster_a_shard_subscription_never_confirmed_is_made_again_on_a_fresh_subscription(server_binary, fleet_on):
    """While slots move or a master fails over, redis-py's sharded subscription could lose
    track of a node: SSUBSCRIBEs sent there were never confirmed, and submits were refused
    after 10 s (up to 247 of 3,000 in benchmarks/failover_load.py's reshard settings). Here the
    subscription swallows every SSUBSCRIBE: after 2 s unconfirmed, each client starts a fresh
    one, and the request is answered."""
    with ClusterSet(server_binary, masters=1, replicas_per_master=0) as cluster:
        fleet = fleet_on(cluster.url, 3)
        try:
            fleet.scheduler()
            fleet.echo_worker()
            fleet.wait_for_workers(1)
            with Client(cluster.url, shards=3) as client:
                assert client.generate("first", max_new_tokens=5, timeout=30).text == "first"
                lost = client._router._pubsub
                lost.ssubscribe = lambda *channels, **kw: None
                assert client.generate("lost once", max_new_tokens=9, timeout=30).text == "lost once"
                assert client._router._pubsub is not lost

            async def run_async() -> None:
                async with AsyncClient(cluster.url, shards=3) as client:
                    assert (await client.generate(prompt="first", max_new_tokens=5, timeout=30)).text == "first"
                    lost = client._pubsub

                    async def swallow(*channels, **kw):
                        return None

                    lost.ssubscribe = swallow
                    assert (await client.generate(prompt="lost once", max_new_tokens=9, timeout=30)).text == "lost once"
                    assert client._pubsub is not lost

            asyncio.run(run_async())
        finally:
            fleet.stop_all()


@pytest.mark.slow
def test_cluster_a_master_refusing_subscriptions_holds_back_only_its_requests_in_the_sync_client(
        server_binary, fleet_on, monkeypatch, caplog):
    """While one master refuses SSUBSCRIBE (killed, its replica not yet promoted), the sync
    Client's reader holds back that master's subscriptions and goes on: the other masters'
    requests are answered meanwhile, and the held-back ones once the master is back. Before, a
    refusal made the reader back off whole (up to 2 s at a time, no event read meanwhile)."""
    from redis.cluster import ClusterPubSub

    with ClusterSet(server_binary, masters=3, replicas_per_master=0) as cluster:
        fleet = fleet_on(cluster.url, 6)
        try:
            fleet.scheduler()
            fleet.echo_worker("--slots", "16")
            fleet.wait_for_workers(1)
            keys = Keys(shards=6, shard_channels=True)
            down = {cluster.masters()[-1].port}
            original = ClusterPubSub.ssubscribe

            def ssubscribe(pubsub, *channels, **kw):
                for channel in channels:
                    node = pubsub.cluster.get_node_from_key(channel)
                    if node.port in down:
                        raise redis.ConnectionError(f"Error 111 connecting to {node.name}. Connection refused.")
                return original(pubsub, *channels, **kw)

            monkeypatch.setattr(ClusterPubSub, "ssubscribe", ssubscribe)
            with Client(cluster.url, shards=6) as client:
                on_down, healthy = [], []
                for i in range(60):
                    request_id = f"sync-held-{i}"
                    port = _master_of(cluster.url, keys.channel(request_id)).rsplit(":", 1)[1]
                    (on_down if int(port) in down else healthy).append(request_id)
                held = [concurrent_submit(client, request_id) for request_id in on_down[:3]]
                answered = [client.generate(f"prompt {i}", request_id=request_id, max_new_tokens=20, timeout=30).text
                            for i, request_id in enumerate(healthy[:6])]
                assert answered == [f"prompt {i}" for i in range(6)]
                assert not any(thread.done() for thread in held)  # still waiting for their master
                down.clear()
                assert [thread.result(timeout=30).text for thread in held] == ["held"] * 3
        finally:
            fleet.stop_all()
    messages = [record.getMessage() for record in caplog.records]
    assert any("shard-channel subscription(s)" in m and "trying again shortly" in m for m in messages), messages
    assert not any("pub/sub connection lost" in m for m in messages), messages


def concurrent_submit(client: Client, request_id: str):
    """generate() in a thread of its own: a sync submit waits for its subscription."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(client.generate, "held", request_id=request_id, max_new_tokens=20, timeout=30)
    pool.shutdown(wait=False)
    return future


@pytest.mark.slow
def test_cluster_three_masters_serve_a_sharded_fleet(server_binary, fleet_on):
    with ClusterSet(server_binary, masters=3, replicas_per_master=0) as cluster:
        seen = _serve_and_check(cluster.url, fleet_on, shards=6, requests=120)
        # Each master holds two shards' streams (keys.shard_tags spreads them over the slots).
        clients = {m.port: open_redis(m.url) for m in cluster.masters()}
        holding = Counter(port for port, c in clients.items() for key in c.scan_iter(match="batchd:{*}:requests", _type="stream"))
    assert sorted(holding.values()) == [2, 2, 2], holding
    assert set(seen["shards"]) == set(range(6))


@pytest.mark.slow
def test_cluster_kill_9_of_a_master_under_load_every_request_is_answered_once(server_binary, fleet_on):
    """Default (asynchronous) replication: a submit the dead master had not passed on may be
    lost; every other request is answered once, with its own text, and a lost one ends with a
    typed error rather than a hang."""
    with ClusterSet(server_binary, masters=3, replicas_per_master=1) as cluster:
        fleet = fleet_on(cluster.url, 6)
        try:
            _start_echo_fleet(fleet)
            victim = cluster.masters()[-1]

            def kill() -> None:
                cluster.kill_master(victim)
                cluster.wait_for_failover(victim.port, 30)

            outcomes = _under_load(cluster.url, 1.5, kill)
        finally:
            fleet.stop_all()
    answered = [o for o in outcomes if not isinstance(o, Exception)]
    failed = [o for o in outcomes if isinstance(o, Exception)]
    assert all(o.text == f"prompt {i}" for i, o in enumerate(outcomes) if not isinstance(o, Exception))
    assert len({o.request_id for o in answered}) == len(answered)
    print(f"cluster failover: {len(answered)} of 400 answered, {len(failed)} failed: {[repr(e)[:120] for e in failed[:3]]}")
    assert len(answered) >= 390, (len(failed), [repr(e)[:200] for e in failed[:5]], fleet.logs()[-3000:])


@pytest.mark.slow
def test_cluster_reshard_under_load_every_request_is_answered_once(server_binary, fleet_on):
    """Half of a master's slots (shard 0's among them) move to another master while 400
    requests are in flight: scripts whose keys are split mid-move get TRYAGAIN and are tried
    again; every request is answered once, with its own text."""
    with ClusterSet(server_binary, masters=3, replicas_per_master=0) as cluster:
        fleet = fleet_on(cluster.url, 6)
        try:
            _start_echo_fleet(fleet)
            shard_0_slot = key_slot(Keys(shards=6).requests_of("", 0).encode())
            first = _owner(cluster, 0)
            assert _owner(cluster, shard_0_slot) is first and shard_0_slot < 2730
            second = next(m for m in cluster.masters() if m is not first)
            outcomes = _under_load(cluster.url, 1.0, lambda: cluster.move_slots(2730, first.port, second.port))
            moved = _owner(cluster, shard_0_slot) is second
        finally:
            fleet.stop_all()
    answered = [o for o in outcomes if not isinstance(o, Exception)]
    failed = [o for o in outcomes if isinstance(o, Exception)]
    print(f"cluster reshard: {len(answered)} of 400 answered, {len(failed)} failed: {[repr(e)[:120] for e in failed[:3]]}")
    assert all(o.text == f"prompt {i}" for i, o in enumerate(outcomes) if not isinstance(o, Exception))
    assert len({o.request_id for o in answered}) == len(answered)
    assert not failed, (failed[:3], fleet.logs()[-3000:])
    assert moved, "shard 0's stream moved to the other master"


def _start_echo_fleet(fleet) -> None:
    fleet.scheduler("--max-batch", "8")
    fleet.echo_worker("--slots", "64", "--token-delay-ms", "2")
    fleet.wait_for_workers(1)


def _under_load(url: str, event_after_s: float, event) -> list:
    """400 generate calls through AsyncClient, one every 10 ms; event_after_s into them, event()
    runs (in a thread, blocking until done). Each call's Result, or the error it raised."""
    async def load() -> list:
        async with AsyncClient(url, shards=6) as client:
            async def one(i: int):
                await asyncio.sleep(i * 0.01)
                try:
                    return await client.generate(prompt=f"prompt {i}", max_new_tokens=20, timeout=60)
                except Exception as exc:  # noqa: BLE001 - counted by the caller
                    return exc
            calls = asyncio.gather(*(one(i) for i in range(400)))
            await asyncio.sleep(event_after_s)
            await asyncio.to_thread(event)
            return await calls

    return asyncio.run(load())


def _owner(cluster: ClusterSet, slot: int):
    """The master that holds a slot, as it says itself (CLUSTER NODES, its `myself` line)."""
    for master in cluster.masters():
        for node in redis.Redis(port=master.port).cluster("nodes").values():
            if "myself" in node["flags"] and any(int(r[0]) <= slot <= int(r[-1]) for r in node["slots"]):
                return master
    return None


@pytest.mark.slow
def test_cluster_kill_9_of_a_master_then_a_reshard_under_load_lose_no_durable_request(server_binary, tmp_path):
    """appendfsync always on every node, producers with durable_replicas=1 and the worker with
    --durable-replicas 1: each submit and each result is on a replica before it counts, WAIT
    sent on a connection to the master that took the write (not any node). The master holding
    shard 0 is killed, then shard 0's slots move off the master promoted in its place."""
    spec = importlib.util.spec_from_file_location("failover_load", ROOT / "benchmarks" / "failover_load.py")
    failover_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(failover_load)
    report = failover_load.run_cluster_setting("cluster-both", 1200, 4, server_binary, tmp_path, shards=6)
    print("cluster, durable, kill -9 of a master and a reshard:", report)
    assert report["accepted"] + report["refused"] == 1200, report
    assert (report["lost"], report["errors"], report["wrong"], report["answer_differs_from_stored"]) == (0, 0, 0, 0), report
    assert report["answered"] == report["accepted"] and report["final_events_seen_twice"] == 0, report


def test_cluster_durable_writes_go_to_a_replica_of_their_master_and_find_its_successor_after_a_kill(server_binary):
    """Durable writes on a cluster go to the master of their shard on a connection of their
    own (the write, then WAIT: WAIT counts that connection's writes), so what returned is on a
    replica: submits from Client and AsyncClient, and a worker's stored result.

    Such a connection follows no redirection, and a cluster client refreshes its slot table
    only after its own commands fail. The worker's outbox has a cluster client of its own, and
    when a result is all it has left to send, nothing else fails there: after the master is
    killed, the outbox must ask the cluster for the promoted replica (before, it retried the
    dead address for ever; seen in CI as 1,534 of 2,000 requests lost under the kill -9 and
    reshard test)."""
    keys = Keys(shards=3)
    with ClusterSet(server_binary, masters=3, replicas_per_master=2) as cluster:
        admin = open_redis(cluster.url)
        load_library(admin, LIBRARY)  # a scheduler's job; no fleet here
        victim = _owner(cluster, key_slot(keys.requests_of("", 0).encode()))
        # A result of shard 0 the worker holds, under its lease (FINALIZE fences any other).
        outbox = Outbox(open_redis(cluster.url), keys, "w1", result_ttl_s=60, lease_ms=5000, durable_replicas=1)
        request_id = next(f"held-{i}" for i in range(100) if keys.shard_of(f"held-{i}") == 0)
        held = Held(request=Request(v=PROTOCOL_VERSION, id=request_id, prompt="hi"), job_entry="0/1-0",
                    owner="lease-1", admitted_at=0.0)
        admin.set(keys.owner(request_id), "lease-1")
        assert admin.wait(1, 1000) >= 1

        def kill() -> None:
            cluster.kill_master(victim)
            cluster.wait_for_failover(victim.port)

        async def submit_async() -> None:
            async with AsyncClient(cluster.url, shards=3, durable_replicas=1) as client:
                await asyncio.gather(*(client.submit(f"async {i}", max_new_tokens=1) for i in range(30)))
                await asyncio.to_thread(kill)  # every client here still routes shard 0 to the dead master
                await asyncio.gather(*(client.submit(f"async after {i}", max_new_tokens=1) for i in range(30)))

        with Client(cluster.url, shards=3, durable_replicas=1) as client:
            for i in range(12):
                client.submit(f"sync {i}", max_new_tokens=1)
            asyncio.run(submit_async())
            for i in range(12):
                client.submit(f"sync after {i}", max_new_tokens=1)
        parcel = Parcel(finished=[(held, Result(request_id=request_id, finish_reason="stop", text="hi"))])
        with pytest.raises(redis.ConnectionError):
            outbox.send(parcel)  # the outbox's slot table still names the dead master
        receipt = outbox.send(parcel)  # what the worker does after its back-off
        stored = open_redis(cluster.url).get(keys.result(request_id))
        lengths, copies = {}, []
        for master in cluster.masters():
            for stream in keys.shared_streams():
                try:
                    lengths[stream] = redis.Redis(port=master.port).xlen(stream)
                except redis.ResponseError:  # MOVED: another master's shard
                    pass
        masters = {m.port for m in cluster.masters()}
        for replica in (s for s in cluster.live() if s.port not in masters):
            reader = redis.Redis(port=replica.port)
            reader.execute_command("READONLY")
            for stream in keys.shared_streams():
                try:
                    copies.append((stream, reader.xlen(stream)))
                except redis.ResponseError:
                    pass
    assert receipt.outcomes == [1] and decode_event(stored).result.text == "hi"
    assert sum(lengths.values()) == 84 and lengths[keys.requests_of("", 0)] > 0, lengths
    # 5 replicas live (the dead master's other replica follows the promoted one): each holds
    # every request its master does.
    assert len(copies) == 5 and all(length == lengths[stream] for stream, length in copies), (copies, lengths)
