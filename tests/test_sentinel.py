"""batchd on a Sentinel-managed master: redis+sentinel:// URLs, durable submits, and kill -9 of
the master under load (real redis-server and sentinel processes on loopback; cli/embedded.py's
SentinelSet). Figures of the full run are in docs/reliability.md."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import shutil
import socket
import subprocess
import threading
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from batchd.cli import check_redis
from batchd.client import AsyncClient, BrokerUnavailable, Client, UnknownModel
from batchd.client import core
from batchd.client.connection import close_redis, describe, open_redis, parse_sentinel_url, redact
from batchd.client.keys import Keys
from batchd.client.protocol import PROTOCOL_VERSION, Request, encode
from batchd.client.scripts import LIBRARY, load_library
from batchd.embedded import EmbeddedServer, SentinelSet
from batchd.scheduler.daemon import Scheduler, SchedulerConfig
from batchd.status import wait_for_workers
from batchd.workers import outbox
from batchd.workers.echo import EchoEngine
from batchd.workers.worker import Worker, WorkerConfig

ROOT = Path(__file__).resolve().parent.parent
REDIS_SERVER = shutil.which("redis-server")
DOCUMENTED_ACL = re.search(r"```acl\n(.*?)```", (ROOT / "docs" / "security.md").read_text(), re.S).group(1)


# -- URLs ---------------------------------------------------------------------------------
def test_sentinel_url_names_the_sentinels_service_db_and_both_credentials():
    address = parse_sentinel_url("redis+sentinel://batchd-producer:p%40ss@10.0.0.1:26380,10.0.0.2,[::1]:5000/"
                                 "mymaster?db=3&sentinel_password=s3cret")
    assert address.sentinels == (("10.0.0.1", 26380), ("10.0.0.2", 26379), ("::1", 5000))
    assert (address.service_name, address.db) == ("mymaster", 3)
    assert (address.username, address.password) == ("batchd-producer", "p@ss")
    assert (address.sentinel_username, address.sentinel_password, address.tls) == (None, "s3cret", False)
    assert parse_sentinel_url("rediss+sentinel://h:1/m?ssl_ca_certs=/ca.pem").tls_options == {"ssl_ca_certs": "/ca.pem"}


@pytest.mark.parametrize("url, complaint", [
    ("redis+sentinel:///mymaster", "at least one sentinel"),
    ("redis+sentinel://h:26379/", "service name"),
    ("redis+sentinel://h:26379/a/b", "service name"),
    ("redis+sentinel://h:port/m", "not host:port"),
    ("redis+sentinel://h:1/m?db=x", "db must be a number"),
    ("redis+sentinel://h:1/m?sentinel_pasword=x", "unknown option"),
])
def test_a_bad_sentinel_url_is_one_line_naming_the_problem(url, complaint):
    with pytest.raises(ValueError, match=complaint):
        parse_sentinel_url(url)
    problem = check_redis(url)
    assert complaint in problem and "redis+sentinel://" in problem


def test_sentinel_urls_are_logged_without_either_password():
    url = "redis+sentinel://u:master-pw@h1:1,h2:2/svc?sentinel_password=sentinel-pw&db=1"
    for shown in (redact(url), describe(url)):
        assert "master-pw" not in shown and "sentinel-pw" not in shown
    assert "service=svc sentinels=h1:1,h2:2 db=1" in describe(url)


@pytest.mark.parametrize("reply", [
    redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
    redis.ResponseError("NOREPLICAS Not enough good replicas to write."),
    redis.ResponseError("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'."),
    redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"),
    redis.sentinel.MasterNotFoundError("No master found for 'batchd'"),
])
def test_failover_replies_are_retried_within_the_budget(reply):
    assert core.is_transient(reply)


# -- a live Sentinel set ---------------------------------------------------------------------
def test_clients_daemons_and_cli_work_through_sentinel(sentinel_fleet):
    url = sentinel_fleet.url
    with Client(url, durable_replicas=2) as client:
        assert client.generate("through sentinel", timeout=20).text == "through sentinel"

    async def async_generate() -> str:
        async with AsyncClient(url, durable_replicas=1) as client:
            results = await asyncio.gather(*(client.generate(f"async {i}", timeout=20) for i in range(20)))
            return [r.text for r in results]

    assert asyncio.run(async_generate()) == [f"async {i}" for i in range(20)]
    for argv, expected in ((["status", "--json"], '"model": "echo"'), (["health", "--require-workers", "1"], "ok")):
        done = subprocess.run([sys.executable, "-m", "batchd.cli", *argv, "--redis", url],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and expected in done.stdout, done.stderr
    logs = sentinel_fleet.logs()
    assert logs.count(f"sentinel service=batchd sentinels=127.0.0.1:{sentinel_fleet.sentinels.sentinels[0].port}") == 2


def test_the_gateway_submits_durably_through_sentinel(sentinel_fleet):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gateway = sentinel_fleet.start("gateway", "--port", str(port), "--durable-replicas", "2")
    body = {"model": "echo", "messages": [{"role": "user", "content": "via the gateway"}], "max_tokens": 8}
    started = time.monotonic()
    while True:
        assert gateway.poll() is None and time.monotonic() - started < 60, sentinel_fleet.logs()
        try:
            reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=30)
            break
        except httpx.TransportError:
            time.sleep(0.1)  # not listening yet
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"]
    gateway.terminate()
    gateway.wait(timeout=20)
    assert "durable_replicas=2" in gateway.log_path.read_text()


def test_the_documented_producer_and_worker_users_write_durably_through_sentinel(sentinel_fleet):
    # ACLs are per server and not replicated: every server that may become master gets them.
    users = [l for l in DOCUMENTED_ACL.splitlines()
             if l.startswith("ACL SETUSER") and ("batchd-producer" in l or "batchd-worker-gpu-0" in l)]
    assert len(users) == 2
    for server in sentinel_fleet.sentinels.servers:
        admin = redis.Redis(port=server.port)
        for line in users:
            admin.execute_command(*line.split())
        admin.close()
    # The producer's tenant, registered as docs/security.md's SADD line does (on the master).
    registry = open_redis(sentinel_fleet.url)
    registry.sadd(Keys().tenants, "batchd-producer")
    close_redis(registry)
    as_user = lambda user, password: sentinel_fleet.url.replace("redis+sentinel://", f"redis+sentinel://{user}:{password}@")
    fleet_url = sentinel_fleet.url
    sentinel_fleet.url = as_user("batchd-worker-gpu-0", "worker-password")
    try:
        worker = sentinel_fleet.echo_worker("--worker-id", "gpu-0", "--durable-replicas", "2",
                                            "--served-model-name", "acl-model")
    finally:
        sentinel_fleet.url = fleet_url
    wait_for_workers(fleet_url, 2, 60, [worker])  # this module's other tests stop their own processes
    # Two live workers may still count one an earlier test stopped (its beat not yet expired):
    # wait for the one that serves acl-model, as the scheduler learns it from its beats.
    with Client(fleet_url) as watcher:
        deadline = time.monotonic() + 30
        while "acl-model" not in watcher.models():
            assert worker.poll() is None and time.monotonic() < deadline, sentinel_fleet.logs()
            time.sleep(0.1)
    with Client(as_user("batchd-producer", "producer-password"), durable_replicas=2) as client:
        for attempt in range(20):  # the scheduler reads the workers' beats every 0.1 s
            try:
                result = client.generate("as the ACL users", model="acl-model", timeout=20)
                break
            except UnknownModel:
                assert attempt < 19, "the scheduler never saw the worker that serves acl-model"
                time.sleep(0.1)
    assert (result.text, result.worker) == ("as the ACL users", "gpu-0")
    assert "NOPERM" not in sentinel_fleet.logs()


def test_a_submit_short_of_its_durable_replicas_is_broker_unavailable(redis_server, monkeypatch):
    monkeypatch.setattr(core, "RECONNECT_RETRIES", 2)
    monkeypatch.setattr(core, "DURABLE_WAIT_MS", 20)
    admin = redis.Redis.from_url(redis_server.url)
    load_library(admin, LIBRARY)
    with Client(redis_server.url, durable_replicas=1) as client:  # a server with no replica
        with pytest.raises(BrokerUnavailable, match="NOREPLICAS.*0 of 1 replicas.*submitting the same request_id"):
            client.submit("never durable")

    async def async_submit():
        async with AsyncClient(redis_server.url, durable_replicas=1) as client:
            await client.submit("never durable either")

    with pytest.raises(BrokerUnavailable, match="NOREPLICAS"):
        asyncio.run(async_submit())
    admin.close()


def test_a_durable_worker_keeps_its_results_until_a_replica_holds_them(redis_server, monkeypatch):
    monkeypatch.setattr(outbox, "DURABLE_WAIT_MS", 20)
    client = redis.Redis.from_url(redis_server.url)
    scheduler = Scheduler(SchedulerConfig(max_batch=4, max_wait_ms=0), client=client)
    scheduler._setup()
    worker = Worker(WorkerConfig(worker_id="w1", durable_replicas=1, heartbeat_interval_s=0.05), EchoEngine(slots=8),
                    connect=lambda: redis.Redis.from_url(redis_server.url))
    worker._connect()
    request = Request(v=PROTOCOL_VERSION, id="r0", prompt="kept", submitted_at=time.time())
    client.xadd(Keys().requests, {"id": "r0", "data": encode(request)})
    refusals = 0
    for _ in range(200):  # no replica: every round that stores the result is refused
        if refusals == 0:  # until the request is dispatched
            scheduler._next_refresh = 0
            scheduler.run_once()
        try:
            worker.run_once()
        except redis.ResponseError as exc:
            assert str(exc).startswith("NOREPLICAS")
            refusals += 1
            worker._reconnect()
        if refusals >= 3:
            break
    assert refusals >= 3 and "r0" in worker.tracked  # not booked: held until a replica has it
    client.config_set("repl-diskless-sync-delay", 0)  # the replica's first sync starts at once
    with EmbeddedServer(REDIS_SERVER, extra_args=["--replicaof", "127.0.0.1", str(redis_server.port)]) as replica:
        for _ in range(500):
            try:
                worker.run_once()
            except redis.ResponseError:
                worker._reconnect()
                time.sleep(0.02)  # the replica's first sync
            if not worker.tracked:
                break
        assert not worker.tracked
        assert redis.Redis(port=replica.port).get(Keys().result("r0")) is not None
    worker.outbox.close()
    client.close()


def test_sentinel_with_passwords_for_the_master_and_the_sentinels(tmp_path):
    with SentinelSet(REDIS_SERVER, replicas=1, password="master-pw", sentinel_password="sentinel-pw") as sentinels:
        log_path = tmp_path / "scheduler.log"
        with open(log_path, "wb") as log_file:
            scheduler = subprocess.Popen([sys.executable, "-m", "batchd.cli", "scheduler", "--redis", sentinels.url],
                                         stdout=log_file, stderr=subprocess.STDOUT)
        client = open_redis(sentinels.url, socket_timeout=5)
        try:
            client.set("k", "v")
            assert client.get("k") == b"v" and client.wait(1, 1000) == 1
        finally:
            close_redis(client)
        assert check_redis(sentinels.url) is None
        wrong_sentinel = sentinels.url.replace("sentinel_password=sentinel-pw", "sentinel_password=wrong")
        wrong_master = sentinels.url.replace(":master-pw@", ":wrong@")
        assert "No master found" in check_redis(wrong_sentinel)
        assert "refused the credentials" in check_redis(wrong_master)
        assert "pw" not in check_redis(wrong_master).replace("sentinel_password=***", "")
        started = time.monotonic()
        while "created consumer group" not in log_path.read_text() and time.monotonic() - started < 60:
            assert scheduler.poll() is None, log_path.read_text()
            time.sleep(0.05)
        scheduler.terminate()
        scheduler.wait(timeout=20)
    log = log_path.read_text()
    assert "sentinel service=batchd" in log and "sentinel_auth=yes" in log, log
    assert "master-pw" not in log and "sentinel-pw" not in log, log


# -- kill -9 of the master under load -----------------------------------------------------
def _failover_load():
    spec = importlib.util.spec_from_file_location("failover_load", ROOT / "benchmarks" / "failover_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_sentinel_kill_9_of_the_master_under_load_loses_no_durable_request(tmp_path):
    report = _failover_load().run_setting("durable", 2000, 4, REDIS_SERVER, tmp_path)
    assert report["accepted"] + report["refused"] == 2000, report
    assert (report["lost"], report["errors"], report["wrong"], report["answer_differs_from_stored"]) == (0, 0, 0, 0), report
    assert report["answered"] == report["accepted"], report


@pytest.mark.slow
def test_sentinel_kill_9_of_the_master_under_load_default_setting_loss_is_counted(tmp_path):
    report = _failover_load().run_setting("default", 2000, 4, REDIS_SERVER, tmp_path)
    print("default setting, kill -9 of the master:", report)
    # What replication had not carried is lost; everything else is answered, once, correctly.
    assert report["accepted"] + report["refused"] == 2000, report
    assert report["answered"] + report["lost"] + report["errors"] == report["accepted"], report
    assert (report["wrong"], report["answer_differs_from_stored"]) == (0, 0), report
    assert report["answered"] > 0 and report["failover_s"] < 30, report


@pytest.mark.slow
@pytest.mark.parametrize("durable_replicas", [0, 1])
def test_sentinel_a_submit_no_replica_received_is_lost_in_a_failover_unless_durable(durable_replicas):
    with SentinelSet(REDIS_SERVER) as sentinels:
        master = sentinels.master()
        admin = redis.Redis(port=master.port)
        load_library(admin, LIBRARY)
        assert admin.wait(2, 5000) == 2  # the function is on the replicas
        with Client(sentinels.url, durable_replicas=durable_replicas) as client:
            client.submit("opens the pooled connection before the master takes a password")
            # The replicas lose their link and cannot come back (the master now wants a password
            # they do not have); connections already open stay authenticated.
            admin.config_set("requirepass", "replicas-locked-out")
            admin.client_kill_filter(_type="replica")
            outcome: list = []
            submit = threading.Thread(target=lambda: outcome.append(_submit_or_error(client)))
            submit.start()
            if durable_replicas:
                time.sleep(0.3)  # the submit waits for a replica that is not there
            else:
                submit.join(10)
            assert admin.info("replication")["connected_slaves"] == 0
            master.stop(kill=True)
            sentinels.wait_for_failover(master.port)
            submit.join(30)
            new_master = open_redis(sentinels.url)
            queued = {fields[b"id"].decode() for _entry, fields in new_master.xrange(Keys().requests)}
            close_redis(new_master)
    (result,) = outcome
    if durable_replicas:
        # Accepted means on the new master; the alternative is an error the caller sees.
        assert isinstance(result, BrokerUnavailable) or result.request_id in queued, (result, queued)
        assert not isinstance(result, BrokerUnavailable), f"the submit did not ride out the failover: {result}"
    else:
        assert result.request_id not in queued, "the write was replicated after all: nothing was lost"


def _submit_or_error(client: Client):
    try:
        return client.submit("at the kill", timeout=60)
    except BrokerUnavailable as exc:
        return exc
