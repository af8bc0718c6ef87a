"""The fence on a request's outcome, one scheduler step at a time, on fakeredis and a real
redis-server: a request id runs from one stream entry only (scripts.CLAIM), and nothing another
entry carrying the id does reaches its outcome. tests/test_tenancy.py makes the same attacks
through real daemons and the documented ACLs."""

from __future__ import annotations

import logging
import time

import redis

from batchd.client.protocol import decode_request
from batchd.scheduler import daemon as scheduler_daemon

from test_daemons import KEYS, advertise, client, clock, final_of, jobs_of, make_scheduler, settle, submit  # noqa: F401


def test_of_two_entries_for_one_id_in_one_read_only_the_first_runs(client, clock):
    scheduler = make_scheduler(client, clock)
    advertise(client, "w1", 8, clock)
    submit(client, clock, "victim", prompt="the victim's")
    submit(client, clock, "victim", prompt="the attacker's", priority=100)  # would be batched first
    settle(scheduler, clock)
    [job] = jobs_of(client, "w1")
    assert [(r.id, r.prompt) for r in job.requests] == [("victim", "the victim's")]
    assert client.xlen(KEYS.requests) == 0, "the duplicate is dropped, not left pending"


def test_an_entry_for_a_dispatched_or_finished_id_never_runs(client, clock):
    scheduler = make_scheduler(client, clock)
    advertise(client, "w1", 8, clock)
    submit(client, clock, "victim")
    settle(scheduler, clock)
    submit(client, clock, "victim", prompt="in flight again")
    settle(scheduler, clock)
    client.set(KEYS.result("victim"), b"stored")
    client.delete(KEYS.accepted("victim"))  # even once its claim expired, a result fences it
    submit(client, clock, "victim", prompt="finished again")
    settle(scheduler, clock)
    assert [r.prompt for job in jobs_of(client, "w1") for r in job.requests] == ["prompt of victim"]
    assert client.get(KEYS.result("victim")) == b"stored"


def test_an_unreadable_entry_naming_a_claimed_id_is_dead_lettered_without_an_answer(client, clock):
    scheduler = make_scheduler(client, clock)
    submit(client, clock, "victim")
    client.xadd(KEYS.requests, {"id": "victim", "data": b"\xc1" * 5000})
    client.xadd(KEYS.requests, {"id": "free-id", "data": b"\xc1"})
    settle(scheduler, clock)
    assert client.get(KEYS.result("victim")) is None
    assert final_of(client, "free-id").error.type == "invalid_request"
    letters = [fields for _entry, fields in client.xrange(KEYS.dead_letters)]
    assert [(f[b"id"], len(f[b"data"]), int(f[b"data_bytes"])) for f in letters] == [
        (b"victim", 1024, 5000), (b"free-id", 1, 1)]


def test_a_producer_chosen_attempt_becomes_zero(client, clock):
    scheduler = make_scheduler(client, clock)
    advertise(client, "w1", 8, clock)
    submit(client, clock, "mine", attempt=10**6)
    settle(scheduler, clock)
    [job] = jobs_of(client, "w1")
    assert job.requests[0].attempt == 0
    assert client.get(KEYS.owner("mine")) == b"w1/0"


def test_the_request_stream_and_config_are_repaired_after_an_error_reply(client, clock, caplog):
    scheduler = make_scheduler(client, clock)
    client.delete(KEYS.requests, KEYS.config)
    client.set(KEYS.requests, "overwritten")
    client.set(KEYS.config, "overwritten")
    caplog.set_level(logging.INFO, "batchd")
    scheduler._reconnect()
    assert client.type(KEYS.requests) == b"stream" and client.hget(KEYS.config, "max_queue") == b"100000"
    assert "is a string, not a stream" in caplog.text
    submit(client, clock, "after")
    advertise(client, "w1", 8, clock)
    settle(scheduler, clock)
    assert [r.id for r in jobs_of(client, "w1")[0].requests] == ["after"]


def test_consumers_of_dead_schedulers_leave_the_group(redis_client, clock, monkeypatch):
    scheduler = make_scheduler(redis_client, clock)
    for name in ("dead-1", "dead-2"):
        redis_client.xgroup_createconsumer(KEYS.requests, "schedulers", name)
    assert len(redis_client.xinfo_consumers(KEYS.requests, "schedulers")) == 2
    monkeypatch.setattr(scheduler_daemon, "DEAD_CONSUMER_IDLE_S", 0)
    scheduler.config.claim_idle_ms = 0
    time.sleep(0.01)  # idle more than 0 ms
    scheduler._forget_dead_schedulers()
    names = {c["name"] for c in redis_client.xinfo_consumers(KEYS.requests, "schedulers")}
    assert names <= {scheduler.config.scheduler_id.encode(), scheduler.config.scheduler_id}


def test_nan_and_infinite_times_and_deep_nesting_are_invalid_requests():
    import math

    import msgspec
    import pytest

    from batchd.client.errors import InvalidRequest

    for field, value in (("deadline", math.nan), ("deadline", math.inf), ("submitted_at", math.nan),
                         ("submitted_at", -math.inf)):
        data = msgspec.msgpack.encode({"v": 1, "id": "x", "prompt": "p", field: value})
        with pytest.raises(InvalidRequest, match=field):
            decode_request(data, "x")
    for nested in (b"\x91" * 10_000 + b"\xc0", b"\x81\xa1v" * 10_000 + b"\xc0"):
        with pytest.raises(InvalidRequest):
            decode_request(nested, "x")


def test_an_empty_request_id_is_refused_not_replaced(redis_server):
    import pytest

    from batchd import Client
    from batchd.client.errors import InvalidRequest

    with Client(redis_server.url, prefix="empty-id:") as producer:
        with pytest.raises(InvalidRequest):
            producer.submit("x", request_id="")
    assert not redis.Redis.from_url(redis_server.url).exists("empty-id:requests")


def test_a_cancel_flag_stops_a_dispatch_only_with_the_requests_secret(redis_client, clock):
    """Real redis only: fakeredis's Lua has no redis.sha1hex."""
    import hashlib

    client = redis_client
    scheduler = make_scheduler(client, clock)
    advertise(client, "w1", 8, clock)
    for request_id in ("forged-flag", "own-flag"):
        submit(client, clock, request_id, cancel_hash=hashlib.sha1(b"the secret").hexdigest())
    client.set(KEYS.cancelled("forged-flag"), "a guess")
    client.set(KEYS.cancelled("own-flag"), "the secret")
    settle(scheduler, clock)
    assert [r.id for job in jobs_of(client, "w1") for r in job.requests] == ["forged-flag"]
    assert final_of(client, "own-flag").error.type == "cancelled"
