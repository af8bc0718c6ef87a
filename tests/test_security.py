"""The ACL users of docs/security.md and TLS, against a real redis-server.

The ACL rules are read from the docs themselves, so the documented users are
the tested ones.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from batchd import Client
from batchd.embedded import EmbeddedServer, free_port


DOCS = Path(__file__).resolve().parent.parent / "docs" / "security.md"
PASSWORDS = {"batchd-producer": "producer-password", "batchd-gateway": "gateway-password",
             "batchd-scheduler": "scheduler-password",
             "batchd-worker-gpu-0": "worker-password", "batchd-operator": "operator-password"}


def documented_acl() -> list[str]:
    block = re.search(r"```acl\n(.*?)```", DOCS.read_text(), re.S)
    assert block, "docs/security.md has no ```acl block"
    return [line for line in block.group(1).splitlines() if line.strip()]


@pytest.fixture
def acl_server(redis_server):
    admin = redis.Redis.from_url(redis_server.url)
    for line in documented_acl():
        assert admin.execute_command(*line.split()) in (b"OK", "OK", True, 2)  # SADD: the tenants it added
    admin.execute_command("ACL", "SETUSER", "default", "off")  # nothing runs unauthenticated
    yield redis_server
    admin.close()


def url_for(server, user: str) -> str:
    return f"redis://{user}:{PASSWORDS[user]}@127.0.0.1:{server.port}/0"


def as_user(server, user: str) -> redis.Redis:
    return redis.Redis.from_url(url_for(server, user))


def refused(client: redis.Redis, *command) -> bool:
    try:
        client.execute_command(*command)
    except redis.exceptions.NoPermissionError:
        return True
    except redis.ResponseError as exc:
        return "NOPERM" in str(exc)
    return False


ADMIN = [("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("SCRIPT", "FLUSH"), ("ACL", "LIST"),
         ("SHUTDOWN",)]

FORBIDDEN = {
    "batchd-producer": [
        ("XREADGROUP", "GROUP", "schedulers", "x", "STREAMS", "batchd:requests", ">"),
        ("XRANGE", "batchd:jobs:gpu-0", "-", "+"),
        ("SET", "batchd:result:someone", "forged"),
        ("GET", "batchd:owner:someone"),
        ("SET", "batchd:worker:gpu-0", "forged"),
        ("ZADD", "batchd:workers", "1", "fake"),
        ("GET", "batchd:cancel:someone"),
        ("HSET", "batchd:config", "max_queue", "0"),
        ("XADD", "batchd:dead", "*", "id", "x"),
        # Attacks 4, 5, 6 and 7 of issue 16: no SET on the stream or the config, no scripts
        # of its own, no claim of an id.
        ("SET", "batchd:requests", "x"),
        ("SET", "batchd:config", "x"),
        ("DEL", "batchd:requests"),
        ("XTRIM", "batchd:requests", "MAXLEN", "0"),
        ("XADD", "batchd:config", "*", "id", "x"),
        ("SCRIPT", "LOAD", "return 1"),
        ("EVAL", "return 1", "0"),
        ("EVALSHA", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", "0"),
        ("FUNCTION", "LOAD", "#!lua name=x\nredis.register_function('x', function() return 1 end)"),
        ("FUNCTION", "DELETE", "batchd_v1"),
        ("SET", "batchd:accepted:someone", "1"),
        # A pinned prefix is the workers' to write: a producer cannot make a handle mean other tokens.
        ("SET", "batchd:pin:" + "ab" * 16, "forged"),
        ("GET", "batchd:pin:" + "ab" * 16),
        ("SET", "batchd:overloaded", "-1000"),
        ("INCRBY", "batchd:overloaded", "1000"),
        # Another tenant's stream and overload counter, and the shared ones (docs/security.md,
        # "Tenants"): a producer appends to its own stream only.
        ("XADD", "batchd:requests", "*", "id", "x"),
        ("XADD", "batchd:requests:victim", "MAXLEN", "0", "*", "id", "x"),
        ("XLEN", "batchd:requests:victim"),
        ("INCR", "batchd:overloaded:victim"),
        ("SCAN", "0"),
    ],
    # A producer that may also read heartbeats: refused all a producer is.
    "batchd-gateway": [],
    "batchd-scheduler": [
        ("SET", "batchd:worker:gpu-0", "forged"),
        ("PUBLISH", "batchd:cancels", "someone"),
    ],
    "batchd-operator": [
        ("SET", "batchd:result:someone", "forged"),
        ("XADD", "batchd:requests", "*", "id", "x"),
        ("PUBLISH", "batchd:cancels", "someone"),
        ("DEL", "batchd:workers"),
    ],
    "batchd-worker-gpu-0": [
        ("XADD", "batchd:jobs:gpu-1", "*", "job", "x"),
        ("SET", "batchd:worker:gpu-1", "forged"),
        ("HSET", "batchd:config", "max_queue", "0"),
        ("SET", "batchd:cancel:someone", "1"),
        ("FUNCTION", "LOAD", "#!lua name=x\nredis.register_function('x', function() return 1 end)"),
        ("XREADGROUP", "GROUP", "worker", "gpu-0", "STREAMS", "batchd:jobs:gpu-1", ">"),
    ],
}

FORBIDDEN["batchd-gateway"] = FORBIDDEN["batchd-producer"]


@pytest.mark.parametrize("user", sorted(PASSWORDS))
def test_each_role_is_refused_what_it_must_not_touch(acl_server, user):
    client = as_user(acl_server, user)
    assert client.ping()
    denied = [command for command in ADMIN + FORBIDDEN[user] if not refused(client, *command)]
    assert not denied, f"{user} was allowed: {denied}"
    client.close()


def test_unauthenticated_and_wrong_password_are_refused(acl_server):
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=acl_server.port).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(f"redis://batchd-producer:wrong@127.0.0.1:{acl_server.port}/0").ping()


def test_the_whole_path_runs_with_the_documented_users(acl_server, daemons):
    fleet = daemons
    fleet.url = url_for(acl_server, "batchd-scheduler")
    try:
        fleet.scheduler()
        fleet.url = url_for(acl_server, "batchd-worker-gpu-0")
        worker = fleet.echo_worker("--worker-id", "gpu-0", "--lease-ms", "1500", "--heartbeat-interval", "0.3",
                                   "--drain-timeout", "5")
        fleet.url = url_for(acl_server, "batchd-operator")
        fleet.wait_for_workers(1)
        status = subprocess.run([sys.executable, "-m", "batchd.cli", "status", "--json", "--redis", fleet.url],
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0 and '"worker_id": "gpu-0"' in status.stdout, status.stderr
        with Client(url_for(acl_server, "batchd-producer")) as client:
            handles = [client.submit(f"over ACLs {i}", timeout=20) for i in range(10)]
            assert [h.result().text for h in handles] == [f"over ACLs {i}" for i in range(10)]
            explicit = client.submit("explicit id", request_id="acl-explicit", timeout=20)
            assert explicit.result().text == "explicit id"
            assert client.fetch_result("acl-explicit").text == "explicit id"
            streamed = client.submit("cancel me " * 50, timeout=20)
            client.cancel(streamed.request_id)
            # Pins: the worker writes, renews and deletes the registry entry under its user.
            pin = client.pin(list(b"a pinned prefix"), ttl_s=30, timeout=20)
            assert client.renew_pin(pin.handle, ttl_s=30, timeout=20).handle == pin.handle
            client.unpin(pin.handle, timeout=20)
        # A graceful worker stop (drain + hand back) works under its ACL too.
        worker.terminate()
        assert worker.wait(timeout=20) == 0
    finally:
        fleet.stop_all()
    logs = "\n".join(p.log_path.read_text() for p in fleet.processes)
    assert "redis://batchd-scheduler:***@" in logs
    for password in PASSWORDS.values():
        assert password not in logs, "a password was logged"
    assert "NOPERM" not in logs, logs


# -- TLS ---------------------------------------------------------------------------
@pytest.fixture
def tls_server(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(paths["ca"])
    cert.cert_chain_pems[0].write_to_path(paths["cert"])
    cert.private_key_pem.write_to_path(paths["key"])
    port = free_port()
    server = EmbeddedServer(binary=shutil.which("redis-server"), port=free_port(), extra_args=[
        "--tls-port", str(port), "--port", "0", "--tls-cert-file", str(paths["cert"]),
        "--tls-key-file", str(paths["key"]), "--tls-ca-cert-file", str(paths["ca"]),
        "--tls-auth-clients", "no"])
    try:
        _start_tls_only(server, port, paths["ca"])
    except RuntimeError as exc:
        pytest.skip(f"this redis-server has no TLS support: {exc}")
    server.tls_url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={paths['ca']}"
    server.bare_tls_url = f"rediss://127.0.0.1:{port}/0"
    yield server
    server.cleanup()


def _start_tls_only(server: EmbeddedServer, tls_port: int, ca: Path) -> None:
    """EmbeddedServer waits on the plain port; with --port 0 wait on the TLS one instead."""
    import time

    args = [server.binary, "--bind", "127.0.0.1", "--dir", str(server.data_dir), "--save", "",
            "--appendonly", "no", *server.extra_args]
    log = open(server.data_dir / "server.log", "ab")
    server.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    client = redis.Redis(host="127.0.0.1", port=tls_port, ssl=True, ssl_ca_certs=str(ca), socket_connect_timeout=0.5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError((server.data_dir / "server.log").read_text()[-500:])
        try:
            if client.ping():
                return
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not answer on its TLS port")


def test_daemons_and_clients_work_over_tls(tls_server, daemons):
    fleet = daemons
    fleet.url = tls_server.tls_url  # not the fixture's plain server
    try:
        fleet.scheduler()
        fleet.echo_worker()
        fleet.wait_for_workers(1)
        with Client(tls_server.tls_url) as client:
            assert client.generate("over TLS", timeout=20).text == "over TLS"
            handle = client.submit("explicit over TLS", request_id="tls-explicit", timeout=20)
            assert handle.result().text == "explicit over TLS"
    finally:
        fleet.stop_all()
    # Without the CA the server's certificate is not trusted.
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(tls_server.bare_tls_url, socket_connect_timeout=2).ping()
    # And plain TCP to the TLS port gets nothing.
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(tls_server.bare_tls_url.replace("rediss://", "redis://"), socket_timeout=2,
                             socket_connect_timeout=2).ping()


def test_workers_store_the_served_tokenizer_and_producers_only_read_it(acl_server):
    """The fields and expiry a worker writes (workers/worker.py _ServedTokenizer, the outbox's
    heartbeat) and the reads a producer's served_tokenizer makes, each as its documented user."""
    worker, producer = as_user(acl_server, "batchd-worker-gpu-0"), as_user(acl_server, "batchd-producer")
    try:
        key = "batchd:tokenizer:some-model"
        worker.hset(key, mapping={"info": b"i", "files": b"f"})
        assert worker.pexpire(key, 3_600_000)
        assert producer.hmget(key, ["info", "files"]) == [b"i", b"f"]
        assert producer.hget(key, "info") == b"i"
        assert refused(producer, "HSET", key, "info", "forged")
        assert refused(producer, "DEL", key)
    finally:
        worker.close()
        producer.close()


def test_a_producer_trims_only_its_own_stream(acl_server, daemons):
    """An ACL cannot refuse XADD's MAXLEN, so each tenant has a stream of its own: a producer's
    trim deletes its own backlog, never another tenant's, whose request then runs."""
    from batchd.client.keys import Keys
    from batchd.client.scripts import LIBRARY, load_library

    keys = Keys()
    load_library(redis.Redis.from_url(url_for(acl_server, "batchd-scheduler")), LIBRARY)
    with Client(url_for(acl_server, "batchd-gateway")) as victim:
        handle = victim.submit("queued behind a backlog", timeout=30)  # no scheduler runs yet
        attacker = as_user(acl_server, "batchd-producer")
        assert refused(attacker, "XADD", keys.requests_of("batchd-gateway"), "MAXLEN", "0", "*", "id", "x")
        assert refused(attacker, "XADD", keys.requests, "MAXLEN", "0", "*", "id", "x")
        attacker.xadd(keys.requests_of("batchd-producer"), {"id": "trimmer", "data": b"\xc1"}, maxlen=0,
                      approximate=False)
        assert attacker.xlen(keys.requests_of("batchd-producer")) == 0
        daemons.url = url_for(acl_server, "batchd-scheduler")
        daemons.scheduler()
        daemons.url = url_for(acl_server, "batchd-worker-gpu-0")
        daemons.echo_worker("--worker-id", "gpu-0")
        assert handle.result().text == "queued behind a backlog"
        assert handle.request_id.startswith("batchd-gateway/")
    daemons.stop_all()


def test_submit_bounds_each_tenant_on_its_own(acl_server):
    """max_queue holds per tenant stream: one tenant's full queue refuses its own submits only,
    and counts them in its own counter."""
    from batchd.client.keys import Keys
    from batchd.client.protocol import PROTOCOL_VERSION, Request, encode
    from batchd.client.scripts import LIBRARY, load_library, submit_call
    from batchd.daemon.toolkit import publish_settings

    keys = Keys()
    scheduler = as_user(acl_server, "batchd-scheduler")
    load_library(scheduler, LIBRARY)
    publish_settings(scheduler, keys, max_queue=1, max_attempts=3)
    outcomes = {}
    for tenant in ("batchd-producer", "batchd-gateway"):
        producer = as_user(acl_server, tenant)
        payload = encode(Request(v=PROTOCOL_VERSION, id=f"{tenant}/bounded", prompt="x"))
        function, call_keys, args = submit_call(keys, tenant, f"{tenant}/bounded", payload)
        outcomes[tenant] = [function.run(producer, call_keys, args) for _ in range(1 if tenant == "batchd-gateway" else 3)]
    assert outcomes == {"batchd-producer": [1, -1, -1], "batchd-gateway": [1]}
    assert scheduler.get(keys.overloaded_of("batchd-producer")) == b"2"
    assert scheduler.get(keys.overloaded_of("batchd-gateway")) is None


def test_a_raw_xadd_flood_is_answered_overloaded_and_a_forged_count_stays_its_own(acl_server, daemons):
    """A raw XADD skips SUBMIT's max_queue; a scheduler answers what a tenant queued beyond it with
    Overloaded, so its stream stays near the bound and its callers hear why. Only a tenant may
    write its overload counter: an INCR it forges moves its own series, no other tenant's."""
    import time
    import urllib.request

    from batchd.client.keys import Keys
    from batchd.client.protocol import PROTOCOL_VERSION, Request, decode_event, encode

    keys = Keys()
    port = free_port()
    daemons.url = url_for(acl_server, "batchd-scheduler")
    daemons.scheduler("--max-queue", "3", "--read-ahead", "2", "--metrics-port", str(port))  # no worker yet
    flood = keys.requests_of("batchd-producer")
    attacker = as_user(acl_server, "batchd-producer")
    admin = redis.Redis(port=acl_server.port, username="batchd-scheduler", password=PASSWORDS["batchd-scheduler"])
    ids = [f"batchd-producer/flood-{i}" for i in range(20)]
    for request_id in ids:
        attacker.xadd(flood, {"id": request_id, "data": encode(Request(v=PROTOCOL_VERSION, id=request_id,
                                                                       prompt="flood", submitted_at=time.time()))})
    forged = [attacker.execute_command("INCR", keys.overloaded_of("batchd-producer")) for _ in range(5)]  # its own counter: allowed
    assert forged[-1] == 5
    assert refused(attacker, "INCR", keys.overloaded_of("batchd-gateway"))
    assert refused(attacker, "INCR", keys.overloaded)

    def answered() -> list[str]:
        stored = [admin.get(keys.result(request_id)) for request_id in ids]
        return [request_id for request_id, raw in zip(ids, stored)
                if raw is not None and decode_event(raw).result.error.type == "overloaded"]

    deadline = time.monotonic() + 15
    while len(answered()) < 17 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert answered() == ids[3:], "the newest entries past the bound are answered, the oldest 3 stay queued"
    assert admin.xlen(flood) == 3

    def exported(tenant: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        match = re.search(rf'^batchd:requests_overloaded_total\{{tenant="{tenant}"\}} (\S+)$', text, re.M)
        return float(match.group(1)) if match else 0.0

    deadline = time.monotonic() + 10
    while exported("batchd-producer") < 17 + 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert exported("batchd-producer") == 17 + 5
    queued = 'batchd:num_requests_queued_by_tenant{tenant="batchd-producer"} 3.0'
    deadline = time.monotonic() + 5
    while queued not in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode():
        assert time.monotonic() < deadline, "the flooding tenant's backlog on /metrics"
        time.sleep(0.2)
    with Client(url_for(acl_server, "batchd-gateway")) as victim:  # another tenant: its own bound, its own count
        handle = victim.submit("not crowded out", timeout=30)
        daemons.url = url_for(acl_server, "batchd-worker-gpu-0")
        daemons.echo_worker("--worker-id", "gpu-0")
        assert handle.result().text == "not crowded out"
    assert exported("batchd-gateway") == 0.0
