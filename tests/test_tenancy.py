"""Issue 16's attacks, each made by a producer holding only the ACL docs/security.md prescribes,
against a real redis-server, a real scheduler and two real echo workers (each as its own ACL user).

Every attack checks what a victim would notice: its request finishes with its own text, exactly
one final event is published for it, the stored result is its own, and every daemon is still
running. Where the ACL refuses the attack outright, the test also makes the same change as an
administrator (a misconfigured ACL) to show the daemons survive it anyway.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import threading
import time
import urllib.request
from pathlib import Path

import msgspec
import pytest
import redis

from batchd import AsyncClient, BrokerUnavailable, Client, InvalidRequest, Overloaded
from batchd.client import core
from batchd.client.keys import Keys
from batchd.client.core import Delta, StreamRestarted
from batchd.client.protocol import (PROTOCOL_VERSION, FinalEvent, Request, RestartEvent, Result, TokenEvent,
                                   decode_event, encode, error_result)
from batchd.daemon.scripts import DEAD_LETTER_DATA_BYTES
from batchd.embedded import EmbeddedServer, free_port

from faults.conftest import Observer, wait_until
from test_security import PASSWORDS, documented_acl, refused

# tests/conftest.py by path: the bare name `conftest` may be tests/engine's in a whole-suite run.
_spec = importlib.util.spec_from_file_location("batchd_tests_conftest", Path(__file__).with_name("conftest.py"))
_shared = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_shared)
Daemons, redis_binary = _shared.Daemons, _shared.redis_binary

KEYS = Keys()
# The attacker's own request stream: the only one its ACL lets it XADD to (docs/security.md).
OWN = KEYS.requests_of("batchd-producer")
# 72 bytes: the echo engine streams one byte a step, 72 steps of 15 ms (about a second in flight).
VICTIM_TEXT = "the victim's own text, " * 3 + "end"
ATTACKER_TEXT = "ATTACKER " * 8
ADMIN_PASSWORD = "admin-password"


class Fleet:
    def __init__(self, server: EmbeddedServer, daemons: Daemons):
        self.server = server
        self.daemons = daemons
        self.admin = redis.Redis.from_url(self.url("admin"))
        self.attacker = redis.Redis.from_url(self.url("batchd-producer"))
        self.observer = Observer(self.url("admin"))

    def url(self, user: str) -> str:
        password = ADMIN_PASSWORD if user == "admin" else PASSWORDS[user]
        return f"redis://{user}:{password}@127.0.0.1:{self.server.port}/0"

    def producer(self, user: str = "batchd-producer") -> Client:
        return Client(self.url(user))

    def assert_daemons_up(self) -> None:
        dead = [p.args for p in self.daemons.processes if p.poll() is not None]
        assert not dead, f"daemons exited: {dead}\n{self.daemons.logs()}"

    def assert_victim_served(self, client: Client, handle, text: str = VICTIM_TEXT, forged: int = 0) -> Result:
        result = handle.result()
        assert result.text == text and result.error is None
        stored = client.fetch_result(handle.request_id)
        assert stored.text == text
        if forged:  # the attacker's final events are on the wire too; the fleet published one
            time.sleep(0.5)
            assert [r.text for r in self.observer.finals[handle.request_id]].count(text) == 1
        else:
            self.observer.assert_exactly_once([handle.request_id])
        self.assert_daemons_up()
        return result


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    server = EmbeddedServer(binary=redis_binary()).start()
    setup = redis.Redis.from_url(server.url)
    acl = documented_acl()
    for line in acl:
        setup.execute_command(*line.split())
    # A second worker, as docs/security.md says: the gpu-0 user with its id replaced.
    [gpu0] = [line for line in acl if "batchd-worker-gpu-0" in line]
    setup.execute_command(*gpu0.replace("gpu-0", "gpu-1").split())
    # A second tenant: the producer line with its user name (and so its stream) replaced.
    [producer] = [line for line in acl if "SETUSER batchd-producer " in line]
    setup.execute_command(*producer.replace("batchd-producer", "batchd-tenant-b").split())
    setup.sadd(KEYS.tenants, "batchd-tenant-b")
    setup.execute_command("ACL", "SETUSER", "admin", "on", f">{ADMIN_PASSWORD}", "~*", "&*", "+@all")
    setup.execute_command("ACL", "SETUSER", "default", "off")
    setup.close()
    PASSWORDS.setdefault("batchd-worker-gpu-1", PASSWORDS["batchd-worker-gpu-0"])
    PASSWORDS.setdefault("batchd-tenant-b", PASSWORDS["batchd-producer"])
    daemons = Daemons(server.url, tmp_path_factory.mktemp("tenancy"))
    fleet = Fleet(server, daemons)
    try:
        daemons.url = fleet.url("batchd-scheduler")
        daemons.scheduler("--claim-idle-ms", "2000")
        for worker_id in ("gpu-0", "gpu-1"):
            daemons.url = fleet.url(f"batchd-worker-{worker_id}")
            daemons.echo_worker("--worker-id", worker_id, "--token-delay-ms", "15", "--slots", "64")
        daemons.url = fleet.url("admin")
        daemons.wait_for_workers(2)
        yield fleet
    finally:
        daemons.stop_all()
        logs = daemons.logs()
        server.cleanup()
    assert "Traceback" not in logs, logs


def in_flight(fleet: Fleet, client: Client, tokens: int = 10):
    handle = client.submit(VICTIM_TEXT, timeout=30)
    fleet.observer.wait_for_tokens(handle.request_id, tokens)
    return handle


def raw_request(request_id: str, prompt: str, **fields) -> bytes:
    return encode(Request(v=PROTOCOL_VERSION, id=request_id, prompt=prompt, submitted_at=time.time(), **fields))


# -- 1: a valid entry reusing an in-flight id, by a raw XADD and by SUBMIT ------------------------
@pytest.mark.parametrize("path", ["raw XADD", "SUBMIT function"])
def test_1_a_second_submission_of_an_in_flight_id_never_runs(fleet, path):
    with fleet.producer() as client:
        victim = in_flight(fleet, client)
        payload = raw_request(victim.request_id, ATTACKER_TEXT)
        if path == "raw XADD":
            fleet.attacker.xadd(OWN, {"id": victim.request_id, "data": payload})
        else:
            fleet.attacker.fcall("batchd_v1_submit", 3, OWN, KEYS.config, KEYS.overloaded_of("batchd-producer"),
                                 victim.request_id, payload)
        fleet.assert_victim_served(client, victim)
    # Its stream never went back to token 0: no restart, and exactly its own bytes.
    assert not fleet.observer.restarts[victim.request_id]
    assert fleet.observer.tokens[victim.request_id] == len(VICTIM_TEXT.encode())


def test_a_raw_duplicate_of_a_finished_request_never_runs_again(fleet):
    with fleet.producer() as client:
        victim = client.submit(VICTIM_TEXT, timeout=30)
        fleet.assert_victim_served(client, victim)
        tokens = fleet.observer.tokens[victim.request_id]
        fleet.attacker.xadd(OWN, {"id": victim.request_id, "data": raw_request(victim.request_id, ATTACKER_TEXT)})
        wait_until(lambda: fleet.admin.xlen(OWN) == 0, 10, "the duplicate to be dropped")
        time.sleep(0.5)
        assert fleet.observer.tokens[victim.request_id] == tokens
        assert client.fetch_result(victim.request_id).text == VICTIM_TEXT
        fleet.observer.assert_exactly_once([victim.request_id])


def test_a_producer_cannot_choose_its_attempt(fleet):
    request_id = "batchd-producer/chosen-attempt"
    fleet.attacker.xadd(OWN, {"id": request_id, "data": raw_request(request_id, "mine", attempt=10**6)})
    fleet.observer.wait_for_finals([request_id], timeout=20)
    [result] = fleet.observer.finals[request_id]
    assert (result.text, result.attempt, result.error) == ("mine", 0, None)


# -- 2: a malformed entry carrying an in-flight id ---------------------------------------------
def test_2_a_malformed_entry_reusing_an_in_flight_id_does_not_fail_the_victim(fleet):
    with fleet.producer() as client:
        victim = in_flight(fleet, client)
        fleet.attacker.xadd(OWN, {"id": victim.request_id, "data": b"\xc1 not msgpack"})
        fleet.attacker.xadd(OWN, {"id": victim.request_id, "data": raw_request(victim.request_id, "x", priority=1000)})
        fleet.assert_victim_served(client, victim)
    dead = [fields for _entry, fields in fleet.admin.xrevrange(KEYS.dead_letters, count=10)
            if fields[b"id"] == victim.request_id.encode()]
    assert len(dead) == 2, "both hostile entries are kept for operators"


# -- 3: a forged final event PUBLISHed on the victim's channel ------------------------------------
def test_3_a_forged_final_event_is_never_returned(fleet):
    with fleet.producer() as client:
        victim = in_flight(fleet, client, tokens=1)
        forged = encode(FinalEvent(Result(victim.request_id, "stop", text="forged")))
        assert fleet.attacker.publish(KEYS.channel(victim.request_id), forged) >= 1
        fleet.assert_victim_served(client, victim, forged=1)


def test_3_asyncclient_never_returns_a_forged_final_event(fleet):
    async def run() -> str:
        async with AsyncClient(fleet.url("batchd-producer")) as client:
            handle = await client.submit(VICTIM_TEXT, timeout=30)
            await asyncio.to_thread(fleet.observer.wait_for_tokens, handle.request_id, 1)
            forged = encode(FinalEvent(Result(handle.request_id, "stop", text="forged")))
            fleet.attacker.publish(KEYS.channel(handle.request_id), forged)
            return (await handle.result()).text

    assert asyncio.run(run()) == VICTIM_TEXT
    fleet.assert_daemons_up()


def test_forged_and_replayed_token_events_are_never_shown(fleet):
    """Any producer may PSUBSCRIBE to the result channels and PUBLISH on them: token and restart
    events it forges (untagged, or with a made-up tag) and the request's own events it replays
    are dropped by the victim's stream, which shows its own text once, with no restart."""
    sniffer = fleet.attacker.pubsub()
    sniffer.psubscribe(KEYS.channel_pattern(""))
    with fleet.producer() as client:
        handle = client.submit(VICTIM_TEXT, timeout=30)
        items: list = []
        reader = threading.Thread(target=lambda: items.extend(handle))
        reader.start()
        fleet.observer.wait_for_tokens(handle.request_id, 10)
        genuine = []
        while len(genuine) < 3 and (message := sniffer.get_message(timeout=5)) is not None:
            if message["type"] == "pmessage" and message["channel"].decode() == KEYS.channel(handle.request_id):
                genuine.append(message["data"])
        assert len(genuine) == 3 and decode_event(genuine[0]).tag  # sealed by the worker
        channel = KEYS.channel(handle.request_id)
        forged = [TokenEvent(index=10, token_ids=[70], text="FORGED"),
                  TokenEvent(index=10, token_ids=[70], text="FORGED", tag=b"\0" * 16),
                  TokenEvent(index=10 ** 6, token_ids=[70], text="FORGED", tag=decode_event(genuine[0]).tag),
                  RestartEvent(attempt=1, reason="forged"), RestartEvent(attempt=0, reason="forged")]
        for event in forged:
            assert fleet.attacker.publish(channel, encode(event)) >= 1
        for payload in genuine * 3:
            fleet.attacker.publish(channel, payload)
        reader.join(30)
        sniffer.close()
    assert not any(isinstance(item, StreamRestarted) for item in items)
    assert "".join(item.text for item in items if isinstance(item, Delta)) == VICTIM_TEXT
    assert items[-1].text == VICTIM_TEXT
    fleet.assert_daemons_up()


def test_asyncclient_never_shows_a_forged_token_event(fleet):
    async def run() -> list:
        async with AsyncClient(fleet.url("batchd-producer")) as client:
            handle = await client.submit(VICTIM_TEXT, timeout=30)
            items = []
            async for item in handle:
                items.append(item)
                if len(items) == 5:  # mid-stream: a forged token and a forged restart
                    channel = KEYS.channel(handle.request_id)
                    for event in (TokenEvent(index=5, token_ids=[70], text="FORGED"),
                                  RestartEvent(attempt=1, reason="forged")):
                        fleet.attacker.publish(channel, encode(event))
            return items

    items = asyncio.run(run())
    assert not any(isinstance(item, StreamRestarted) for item in items)
    assert "".join(item.text for item in items if isinstance(item, Delta)) == VICTIM_TEXT
    fleet.assert_daemons_up()


# -- 4 and 5: the request stream and the config overwritten -------------------------------------
def test_4_the_request_stream_overwritten_or_deleted_is_recreated(fleet):
    assert refused(fleet.attacker, "SET", KEYS.requests, "x")
    with fleet.producer() as client:
        fleet.admin.set(KEYS.requests, "overwritten by a misconfigured ACL")
        wait_until(lambda: fleet.admin.type(KEYS.requests) == b"stream", 15, "the stream to be recreated")
        fleet.assert_victim_served(client, client.submit(VICTIM_TEXT, timeout=30))
        fleet.admin.delete(KEYS.requests)  # while the scheduler blocks on it: "UNBLOCKED ... no longer exists"
        wait_until(lambda: fleet.admin.type(KEYS.requests) == b"stream", 15, "the stream to be recreated")
        fleet.assert_victim_served(client, client.submit(VICTIM_TEXT, timeout=30))
        fleet.admin.delete(OWN)  # a tenant's stream deleted (by an administrator): found again on its next submit
        fleet.assert_victim_served(client, client.submit(VICTIM_TEXT, timeout=30))
    assert "recreate" in fleet.daemons.logs() or "created consumer group" in fleet.daemons.logs()


def test_5_a_config_of_the_wrong_type_fails_no_submit_and_is_rewritten(fleet):
    assert refused(fleet.attacker, "SET", KEYS.config, "x")
    with fleet.producer() as client:
        fleet.admin.set(KEYS.config, "overwritten by a misconfigured ACL")
        fleet.assert_victim_served(client, client.submit(VICTIM_TEXT, timeout=30))
        wait_until(lambda: fleet.admin.type(KEYS.config) == b"hash"
                   and fleet.admin.hget(KEYS.config, "max_queue") == b"100000", 10, "max_queue to be back")


# -- 6: scripts, and the server BUSY for seconds ----------------------------------------------
def test_6_a_producer_cannot_run_scripts_and_busy_replies_stop_no_daemon(fleet):
    for command in (("SCRIPT", "LOAD", "return 1"), ("EVAL", "return 1", "0"),
                    ("FUNCTION", "LOAD", "#!lua name=spin\nredis.register_function('spin', function() end)")):
        assert refused(fleet.attacker, *command)
    # An administrator's long script, with Redis answering BUSY after 100 ms (not 5 s).
    fleet.admin.config_set("busy-reply-threshold", 100)
    try:
        with fleet.producer() as client:
            victim = in_flight(fleet, client, tokens=5)
            spinner = threading.Thread(target=spin, args=(fleet.url("admin"), 3.0), daemon=True)
            spinner.start()
            wait_until(lambda: busy(fleet.admin), 5, "Redis to answer BUSY")
            spinner.join()
            fleet.assert_victim_served(client, victim)
            fleet.assert_victim_served(client, client.submit(VICTIM_TEXT, timeout=30))
    finally:
        fleet.admin.config_set("busy-reply-threshold", 5000)
    assert "BUSY" in fleet.daemons.logs(), "the daemons met no BUSY reply: the test proves nothing"
    # Both workers' leases are still kept (their lease threads survived BUSY).
    time.sleep(1.5)
    assert all(fleet.admin.pttl(KEYS.heartbeat(w)) > 0 for w in ("gpu-0", "gpu-1"))


SPIN = "local x = 0 for i = 1, tonumber(ARGV[1]) do x = x + i end return x"


def spin(url: str, seconds: float) -> None:
    """Keep Redis inside one script for about this long (Lua in Redis has no clock: calibrated)."""
    admin = redis.Redis.from_url(url)
    started = time.perf_counter()
    admin.eval(SPIN, 0, 2_000_000)
    rate = 2_000_000 / max(time.perf_counter() - started, 1e-3)
    admin.eval(SPIN, 0, int(rate * seconds))


def busy(client: redis.Redis) -> bool:
    try:
        client.ping()
    except redis.ResponseError as exc:
        return "BUSY" in str(exc)
    return False


# -- 7: an id's claim is not the producers' to write ---------------------------------------------
def test_7_a_producer_cannot_claim_a_predictable_id(fleet):
    assert refused(fleet.attacker, "SET", KEYS.accepted("order-42"), "1")
    with fleet.producer() as client:
        fleet.assert_victim_served(client, client.submit(VICTIM_TEXT, request_id="order-42", timeout=30))


# -- id squatting: an id another producer took first ----------------------------------------------
@pytest.mark.parametrize("path", ["raw XADD", "SUBMIT function", "malformed entry"])
def test_an_id_another_producer_took_first_never_returns_its_result(fleet, path):
    """The first entry read for an id runs it (the claim); a producer that guesses an id the
    victim will choose submits it first. The victim's call then fails with InvalidRequest
    naming the squatted id, and is never handed the attacker's text."""
    request_id = f"batchd-producer/order-squatted-{path.replace(' ', '-')}"
    if path == "SUBMIT function":
        with fleet.producer() as attacker:
            attacker.submit(ATTACKER_TEXT, request_id=request_id, timeout=30)
    else:
        data = b"\xc1" if path == "malformed entry" else raw_request(request_id, ATTACKER_TEXT)
        fleet.attacker.xadd(OWN, {"id": request_id, "data": data})
    with fleet.producer() as client:
        handle = client.submit(VICTIM_TEXT, request_id=request_id, timeout=30)
        with pytest.raises(InvalidRequest, match="taken by another submission"):
            handle.result()
    fleet.assert_daemons_up()


# -- the request stream's last id at the end of time ---------------------------------------------
def test_an_entry_id_at_the_end_of_time_stops_submits_for_a_second_at_most(fleet):
    """XADD with the largest explicit id (a producer may XADD, and Redis cannot restrict its
    arguments) makes every later `XADD *` fail; a scheduler sets the last id back within its
    next housekeeping, and the victim's submit, retried meanwhile, runs."""
    end_of_time = "18446744073709551615-18446744073709551615"
    fleet.attacker.xadd(OWN, {"id": "end-of-time", "data": b"\xc1"}, id=end_of_time)
    with pytest.raises(redis.ResponseError, match="exhausted"):
        fleet.attacker.xadd(OWN, {"id": "next", "data": b"\xc1"})
    with fleet.producer() as client:
        handle = client.submit(VICTIM_TEXT, timeout=30)
        fleet.assert_victim_served(client, handle)
    assert "last entry id far in the future" in fleet.daemons.logs()


# -- 8: dead letters stay bounded -----------------------------------------------------------------
def test_8_garbage_entries_cost_bounded_dead_letters(fleet):
    before = fleet.admin.memory_usage(KEYS.dead_letters) or 0
    garbage = b"\xc1" * (4 * 1024 * 1024)
    for i in range(20):
        fleet.attacker.xadd(OWN, {"id": f"batchd-producer/garbage-{i}", "data": garbage})
    wait_until(lambda: fleet.admin.xlen(OWN) == 0, 30, "the garbage to be rejected")
    letters = fleet.admin.xrevrange(KEYS.dead_letters, count=20)
    assert all(len(fields[b"data"]) <= DEAD_LETTER_DATA_BYTES for _entry, fields in letters)
    assert {int(fields[b"data_bytes"]) for _entry, fields in letters} == {len(garbage)}
    assert fleet.admin.memory_usage(KEYS.dead_letters) - before < 200_000
    with fleet.producer() as client:
        fleet.assert_victim_served(client, client.submit(VICTIM_TEXT, timeout=30))


# -- 9: connection loss is a batchd error; an AsyncClient opened during an outage works later -----
def test_9_connection_loss_is_a_typed_error(redis_server, monkeypatch):
    monkeypatch.setattr(core, "RECONNECT_RETRIES", 2)
    monkeypatch.setattr(core, "RETRY_BUDGET_S", 1.0)
    with Client(redis_server.url, prefix="outage:") as client:
        redis_server.stop(kill=True)
        with pytest.raises(BrokerUnavailable, match="Redis"):
            client.submit("during the outage")
        with pytest.raises(BrokerUnavailable):
            client.cancel("anything")
    with Client(redis_server.url, prefix="outage:") as client:  # created during the outage
        with pytest.raises(BrokerUnavailable, match="Redis"):
            client.submit("during the outage")


def test_9_an_asyncclient_opened_during_an_outage_works_once_redis_is_back(redis_server):
    async def run() -> None:
        redis_server.stop(kill=True)
        async with AsyncClient(redis_server.url, prefix="outage:") as client:
            threading.Timer(1.0, redis_server.start).start()
            handle = await client.submit("after the outage")
            assert handle.request_id
    asyncio.run(run())
    after = redis.Redis.from_url(redis_server.url)
    [(_stream, [(_entry, fields)])] = after.xread({"outage:requests": "0"})
    assert msgspec.msgpack.decode(fields[b"data"])["prompt"] == "after the outage"


# -- overload, counted where Prometheus sees it ---------------------------------------------------
def test_overload_refusals_reach_the_schedulers_metrics(redis_server, daemons):
    port = free_port()
    daemons.scheduler("--max-queue", "2", "--metrics-port", str(port))  # no worker: the queue fills
    refusals = 0
    with Client(redis_server.url) as client:
        wait_until(lambda: redis.Redis.from_url(redis_server.url).hget(KEYS.config, "max_queue") == b"2", 20,
                   "the scheduler's settings")
        for i in range(7):
            try:
                client.submit(f"queued {i}")
            except Overloaded:
                refusals += 1
    assert refusals == 5

    def exported() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        match = re.search(r'^batchd:requests_overloaded_total\{tenant=""\} (\S+)$', text, re.M)
        return float(match.group(1)) if match else -1.0

    wait_until(lambda: exported() == refusals, 10, "the refusals on /metrics")


def test_stored_result_is_authoritative_for_fetch(fleet):
    """A final event on the channel that disagrees with the stored result is a forgery, and the
    clients decode only stored results: the one path both wait loops share."""
    forged = encode(FinalEvent(Result("x", "stop", text="forged")))
    assert core.is_final_event(forged)
    assert not core.is_final_event(b"\xc1")
    assert isinstance(decode_event(forged), FinalEvent)


# -- cancel: only the submitter ---------------------------------------------------------------------
def test_another_producer_cannot_cancel_a_request_its_submitter_can(fleet):
    with fleet.producer() as client, fleet.producer() as other:
        victim = in_flight(fleet, client)
        other.cancel(victim.request_id)  # another client's key: the wrong secret
        fleet.attacker.set(KEYS.cancelled(victim.request_id), "a guess")
        fleet.attacker.publish(KEYS.cancel_channel, victim.request_id)
        fleet.attacker.publish(KEYS.cancel_channel, f"{victim.request_id} a-guess")
        fleet.assert_victim_served(client, victim)
        mine = in_flight(fleet, client)
        client.cancel(mine.request_id)
        assert mine.result().finish_reason == "cancelled"


# -- tenants: an id in another tenant's namespace ---------------------------------------------------
@pytest.mark.parametrize("path", ["raw XADD", "SUBMIT function", "malformed entry"])
def test_an_id_in_another_tenants_namespace_is_never_taken(fleet, path):
    """Ids of a tenant's requests start with its name, and run only from its own stream, where no
    one else may XADD: another tenant submitting the victim's next id first (on its own stream,
    the only one it may write) neither runs it nor answers it, and the victim's request runs."""
    local = f"order-{path.replace(' ', '-')}"
    victim_id = f"batchd-tenant-b/{local}"
    squatter = redis.Redis.from_url(fleet.url("batchd-producer"))
    assert refused(squatter, "XADD", KEYS.requests_of("batchd-tenant-b"), "*", "id", victim_id, "data", "x")
    data = b"\xc1" if path == "malformed entry" else raw_request(victim_id, ATTACKER_TEXT)
    if path == "SUBMIT function":
        squatter.fcall("batchd_v1_submit", 3, OWN, KEYS.config, KEYS.overloaded_of("batchd-producer"), victim_id, data)
    else:
        squatter.xadd(OWN, {"id": victim_id, "data": data})
    wait_until(lambda: fleet.admin.xlen(OWN) == 0, 10, "the squatting entry to be dropped")
    assert fleet.admin.get(KEYS.result(victim_id)) is None and fleet.admin.get(KEYS.accepted(victim_id)) is None
    with fleet.producer("batchd-tenant-b") as client:
        handle = client.submit(VICTIM_TEXT, request_id=local, timeout=30)
        assert handle.request_id == victim_id
        fleet.assert_victim_served(client, handle)
    [letter] = [fields for _entry, fields in fleet.admin.xrevrange(KEYS.dead_letters, count=20)
                if fields[b"id"] == victim_id.encode()]
    assert b"namespace" in letter[b"reason"]


def test_a_client_refuses_an_id_outside_its_namespace(fleet):
    with fleet.producer() as client:
        with pytest.raises(InvalidRequest, match="namespace"):
            client.submit("x", request_id="batchd-tenant-b/theirs")
        assert client.submit("mine", request_id="batchd-producer/mine", timeout=30).result().text == "mine"


# -- scoring requests carry the secrets every request does --------------------------------------------
def test_scoring_requests_carry_a_cancel_hash_and_an_event_key(fleet):
    """Without them anyone who knows a scoring request's id could cancel it, and its events would
    be unauthenticated (docs/security.md): the clients send both on every request they make."""
    sent: list[Request] = []

    def capture(request, payload, explicit, timeout):
        sent.append(request)
        raise InvalidRequest("captured")

    with fleet.producer() as client:
        client._send = capture
        for call in (lambda: client.next_token_logprobs([1, 2, 3]), lambda: client.score("a", "b"),
                     lambda: client.next_token_logprobs([1, 2], top_k=2)):
            with pytest.raises(InvalidRequest, match="captured"):
                call()
    assert [r.task for r in sent] == ["next_token_logprobs", "score", "next_token_logprobs"]
    assert all(r.cancel_hash and r.event_key and r.id.startswith("batchd-producer/") for r in sent)


def test_a_scoring_requests_final_is_taken_only_with_its_seal():
    """A full-vector result is published as a vector-free cue (workers/outbox.py), sealed like the
    stored result: the client reads the stored result on it, takes a sealed final that carries
    its answer, and ignores a final without the request's seal (a forgery)."""
    from batchd.client.protocol import seal_final
    from batchd.workers.outbox import _cue

    secrets = core.CancelSecrets(None)
    request = Request(v=PROTOCOL_VERSION, id="t/score-1", prompt_token_ids=[1], task="next_token_logprobs",
                      event_key=secrets.event_key("t/score-1"))
    reading = core.Reading(request.id, 10, request.event_key, expects_vector=True)
    full = Result(request.id, "stop", logprobs=b"\0" * 8)
    cue = _cue(full, request)
    assert decode_event(cue).result.logprobs is None
    assert reading.triage(cue) == core.STORED
    assert reading.triage(seal_final(full, request)) == core.TAKE
    failed = error_result(request.id, Overloaded("full", request.id))
    assert reading.triage(seal_final(failed, request)) == core.TAKE
    forged = encode(FinalEvent(Result(request.id, "stop", logprobs=b"\1" * 8)))
    assert reading.triage(forged) == core.IGNORE
    assert reading.triage(_cue(full, msgspec.structs.replace(request, event_key="0" * 32))) == core.IGNORE


def test_one_tenants_backlog_does_not_hold_up_another_tenants_request(redis_server, daemons):
    """Schedulers ask every tenant's stream for an equal share of their read-ahead and batches
    take turns by tenant: a request of a quiet tenant runs next, not behind a flood's backlog."""
    redis.Redis.from_url(redis_server.url).sadd(KEYS.tenants, "flood", "quiet")  # docs/security.md
    daemons.scheduler("--read-ahead", "8", "--max-wait-ms", "5")
    daemons.echo_worker("--slots", "4", "--token-delay-ms", "5")
    daemons.wait_for_workers(1)
    with Client(redis_server.url, tenant="flood") as flood, Client(redis_server.url, tenant="quiet") as quiet:
        for client in (quiet, flood):  # both streams are read from here on
            assert client.submit("first", timeout=30).result().text == "first"
        backlog = [flood.submit("flooding", timeout=60) for _ in range(150)]
        handle = quiet.submit("quiet one", timeout=30)
        assert handle.result().text == "quiet one"
        done = sum(flood.fetch_result(h.request_id) is not None for h in backlog)
        assert done < 50, f"the quiet tenant's request waited for {done} of the flood's 150"
        assert backlog[-1].result().text == "flooding"
