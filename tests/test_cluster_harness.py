"""cli/embedded.py's ClusterSet: a real Redis Cluster (3 masters + 3 replicas on loopback)
that redis-py's RedisCluster can use, fail over, and reshard under a client's feet."""

from __future__ import annotations

import shutil
import threading

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from batchd.embedded import ClusterSet


@pytest.fixture
def cluster():
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH: install it (apt-get install redis-server)")
    with ClusterSet(binary=binary) as cluster:
        yield cluster


@pytest.fixture
def client(cluster):
    client = RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in cluster.startup_nodes],
                          decode_responses=True)
    yield client
    client.close()


def keys_in_slots(client: RedisCluster, slots: set[int], count: int) -> list[str]:
    """count key names that hash into the given slots."""
    keys, i = [], 0
    while len(keys) < count:
        if client.keyslot(f"key:{i}") in slots:
            keys.append(f"key:{i}")
        i += 1
    return keys


def slots_of(cluster: ClusterSet, port: int) -> list[int]:
    """The slots a master serves, in order, as the cluster itself reports them."""
    ranges = redis.Redis(port=cluster.masters()[0].port).cluster("SLOTS")
    return [slot for low, high, primary, *_ in ranges if primary[1] == port for slot in range(low, high + 1)]


def test_a_cluster_client_writes_and_reads_keys_on_every_master(cluster, client):
    assert cluster.url == "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for _, port in cluster.startup_nodes)
    masters = {server.port for server in cluster.masters()}
    assert len(masters) == 3 and len(cluster.servers) == 6
    keys = [f"key:{i}" for i in range(300)]
    for key in keys:
        client.set(key, key.upper())
    assert {client.get_node_from_key(key).port for key in keys} == masters
    assert [client.get(key) for key in keys] == [key.upper() for key in keys]


@pytest.mark.slow
def test_keys_a_replica_acknowledged_survive_kill_9_of_their_master(cluster, client):
    victim = cluster.masters()[0]
    keys = keys_in_slots(client, set(slots_of(cluster, victim.port)), 100)
    # On one connection, so that WAIT covers these writes.
    with redis.Redis(port=victim.port, single_connection_client=True) as direct:
        for key in keys:
            direct.set(key, "before")
        assert direct.wait(1, 0) >= 1
    cluster.kill_master(victim)
    assert cluster.wait_for_failover(victim.port, timeout=15) < 15
    assert victim.port not in {server.port for server in cluster.masters()}
    assert [client.get(key) for key in keys] == ["before"] * len(keys)
    client.set(keys[0], "after")
    assert client.get(keys[0]) == "after"


@pytest.mark.slow
def test_moving_slots_under_a_busy_client_shows_it_no_error(cluster, client):
    source, target = (server.port for server in cluster.masters()[:2])
    moving = set(slots_of(cluster, source)[:100])  # redis-cli reshard takes a source's lowest slots
    keys = keys_in_slots(client, moving, 1000)
    for key in keys:
        client.set(key, 0)
    done, errors, rounds = threading.Event(), [], [0]

    def busy() -> None:
        while not done.is_set():
            for key in keys[rounds[0] % 10::10]:
                try:
                    client.set(key, rounds[0])
                    if client.get(key) != str(rounds[0]):
                        errors.append(f"{key}: lost a write")
                except redis.RedisError as error:
                    errors.append(f"{key}: {error!r}")
            rounds[0] += 1

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        cluster.move_slots(100, source, target, timeout=15)
    finally:
        done.set()
        thread.join()
    assert errors == []
    assert rounds[0] > 1
    assert moving <= set(slots_of(cluster, target))
    with redis.Redis(port=target) as direct, direct.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.exists(key)
        assert pipe.execute() == [1] * len(keys)
    assert all(client.get(key) is not None for key in keys)
