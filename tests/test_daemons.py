"""Scheduler and worker driven step by step on fakeredis and on a real redis-server.

The daemons run in this process with a fake clock; each test calls run_once()
and looks at what landed in Redis, as a producer or operator would.
"""

from __future__ import annotations

import threading
import time

import fakeredis
import redis
import msgpack
import pytest

from batchd.daemon import scripts
from batchd.client.keys import Keys
from batchd.client.protocol import (
    PROTOCOL_VERSION,
    FinalEvent,
    Heartbeat,
    Request,
    SamplingParams,
    decode_event,
    decode_job,
    encode,
)
from batchd.scheduler.daemon import Scheduler, SchedulerConfig
from batchd.workers.echo import EchoEngine
from batchd.workers.worker import Worker, WorkerConfig

KEYS = Keys()


class FakeClock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=["fakeredis", "redis-server"])
def client(request):
    if request.param == "fakeredis":
        yield fakeredis.FakeRedis()
    else:
        yield request.getfixturevalue("redis_client")


@pytest.fixture
def clock():
    return FakeClock()


def settle(scheduler: Scheduler, clock: FakeClock) -> None:
    """Read what is queued, then let its batch window pass and dispatch."""
    scheduler._next_refresh = 0
    scheduler.run_once()
    clock.advance(0.011)
    scheduler._next_refresh = 0
    scheduler.run_once()


def make_scheduler(client, clock, **overrides) -> Scheduler:
    config = SchedulerConfig(max_batch=4, max_wait_ms=10, claim_idle_ms=60_000, **overrides)
    scheduler = Scheduler(config, client=client, clock=clock)
    scheduler._setup()
    return scheduler


def submit(client, clock, request_id: str, **fields) -> None:
    request = Request(v=PROTOCOL_VERSION, id=request_id, prompt=fields.pop("prompt", f"prompt of {request_id}"),
                      submitted_at=clock(), **fields)
    client.xadd(KEYS.requests, {"id": request_id, "data": encode(request)})


def advertise(client, worker_id: str, free_slots: int, clock, last_job_read: str = "0-0") -> None:
    beat = Heartbeat(v=PROTOCOL_VERSION, worker_id=worker_id, model="echo", engine="echo", total_slots=free_slots,
                     free_slots=free_slots, last_job_read=last_job_read, sent_at=clock())
    client.set(KEYS.heartbeat(worker_id), encode(beat), px=5000)
    client.zadd(KEYS.workers, {worker_id: clock()})


def final_of(client, request_id: str):
    raw = client.get(KEYS.result(request_id))
    assert raw is not None, f"no stored result for {request_id}"
    event = decode_event(raw)
    assert isinstance(event, FinalEvent)
    return event.result


def jobs_of(client, worker_id: str):
    return [decode_job(fields[b"job"]) for _, fields in client.xrange(KEYS.jobs(worker_id))]


def test_requests_are_coalesced_into_one_job_for_a_live_worker(client, clock):
    scheduler = make_scheduler(client, clock)
    advertise(client, "w1", 8, clock)
    for i in range(3):
        submit(client, clock, f"r{i}")
    scheduler.run_once()
    assert jobs_of(client, "w1") == []  # batch open, max_wait not reached
    clock.advance(0.011)
    scheduler.run_once()
    jobs = jobs_of(client, "w1")
    assert [[r.id for r in job.requests] for job in jobs] == [["r0", "r1", "r2"]]
    assert client.xlen(KEYS.requests) == 0  # dispatched entries leave the backlog
    assert client.get(KEYS.owner("r1")) == scripts.owner_token("w1", 0).encode()


def test_jobs_never_exceed_free_slots_and_wait_without_workers(client, clock):
    scheduler = make_scheduler(client, clock)
    for i in range(4):
        submit(client, clock, f"r{i}")
    settle(scheduler, clock)
    assert client.xlen(KEYS.requests) == 4  # nobody to run them: they stay queued
    advertise(client, "w1", 3, clock)
    scheduler._next_refresh = 0
    scheduler.run_once()
    assert [len(job.requests) for job in jobs_of(client, "w1")] == [3]
    scheduler.run_once()
    assert [len(job.requests) for job in jobs_of(client, "w1")] == [3]  # no room for the fourth


def test_bad_entries_get_errors_and_dead_letters_while_good_ones_run(client, clock):
    scheduler = make_scheduler(client, clock)
    advertise(client, "w1", 8, clock)
    client.xadd(KEYS.requests, {"id": "bad-msgpack", "data": b"\xc1\xc1"})
    client.xadd(KEYS.requests, {"id": "bad-version", "data": msgpack.packb({"v": 9, "id": "bad-version", "prompt": "x"})})
    client.xadd(KEYS.requests, {"id": "bad-type", "data": msgpack.packb({"v": 1, "id": "bad-type", "prompt": 5})})
    client.xadd(KEYS.requests, {"nothing": "useful"})
    submit(client, clock, "good")
    settle(scheduler, clock)
    assert "msgpack" in final_of(client, "bad-msgpack").error.message
    assert final_of(client, "bad-version").error.type == "unsupported_version"
    assert final_of(client, "bad-type").error.type == "invalid_request"
    dead = client.xrange(KEYS.dead_letters)
    assert len(dead) == 4
    assert {fields[b"id"] for _, fields in dead} == {b"bad-msgpack", b"bad-version", b"bad-type", b""}
    assert [r.id for job in jobs_of(client, "w1") for r in job.requests] == ["good"]


def test_expired_and_cancelled_requests_are_answered_without_a_slot(client, clock):
    scheduler = make_scheduler(client, clock)
    advertise(client, "w1", 8, clock)
    submit(client, clock, "late", deadline=clock() + 0.005)
    submit(client, clock, "cancelled")
    submit(client, clock, "fine")
    client.set(KEYS.cancelled("cancelled"), 1)
    clock.advance(0.02)
    settle(scheduler, clock)
    assert final_of(client, "late").error.type == "deadline_exceeded"
    assert final_of(client, "late").finish_reason == "deadline"
    assert final_of(client, "cancelled").error.type == "cancelled"
    assert [r.id for job in jobs_of(client, "w1") for r in job.requests] == ["fine"]


def test_a_dead_workers_requests_go_back_then_to_dead_letters(client, clock):
    scheduler = make_scheduler(client, clock, max_attempts=2)
    advertise(client, "w1", 8, clock)
    submit(client, clock, "r0")
    submit(client, clock, "r1")
    settle(scheduler, clock)
    assert len(jobs_of(client, "w1")) == 1
    # r0 finished before the worker died; r1 did not.
    client.set(KEYS.result("r0"), encode(FinalEvent(final_result("r0"))))
    client.delete(KEYS.heartbeat("w1"))
    assert scheduler.reap_worker("w1") == 1
    assert client.exists(KEYS.jobs("w1")) == 0
    entries = client.xrange(KEYS.requests)
    assert [fields[b"id"] for _, fields in entries] == [b"r1"]
    # r1 goes to a second worker which dies too: that was its last attempt.
    advertise(client, "w2", 8, clock)
    scheduler._next_refresh = 0
    settle(scheduler, clock)
    [job] = jobs_of(client, "w2")
    assert job.requests[0].attempt == 1
    client.delete(KEYS.heartbeat("w2"))
    assert scheduler.reap_worker("w2") == 0
    assert final_of(client, "r1").error.type == "worker_failed"
    assert [fields[b"id"] for _, fields in client.xrange(KEYS.dead_letters)] == [b"r1"]


def final_result(request_id: str):
    from batchd.client.protocol import Result

    return Result(request_id=request_id, finish_reason="stop", text="done")


def run_worker_until_idle(worker: Worker, rounds: int = 200) -> None:
    for _ in range(rounds):
        worker.run_once()
        if not worker.engine.has_work() and not worker.tracked:
            return


def test_worker_streams_tokens_stores_results_and_acks_its_job(client, clock):
    scheduler = make_scheduler(client, clock)
    worker = Worker(WorkerConfig(worker_id="w1"), EchoEngine(slots=8, clock=clock), connect=lambda: client, clock=clock)
    worker._connect()
    pubsub = client.pubsub()
    pubsub.subscribe(KEYS.channel("r0"))
    pubsub.get_message(timeout=1)
    submit(client, clock, "r0", prompt="héllo", params=SamplingParams(max_new_tokens=3))
    submit(client, clock, "r1", prompt="ok")
    settle(scheduler, clock)
    run_worker_until_idle(worker)
    r0, r1 = final_of(client, "r0"), final_of(client, "r1")
    assert (r0.text, r0.finish_reason, r0.usage.completion_tokens) == ("hé", "length", 3)
    assert (r1.text, r1.finish_reason) == ("ok", "stop")
    assert client.xlen(KEYS.jobs("w1")) == 0  # acked and deleted only after both results were stored
    events = []
    while (message := pubsub.get_message(timeout=0.2)) is not None:
        events.append(decode_event(message["data"]))
    tokens = [t for e in events if hasattr(e, "token_ids") for t in e.token_ids]
    assert tokens == list("hé".encode()) and isinstance(events[-1], FinalEvent)


def test_a_fenced_worker_cannot_deliver_a_second_result(client, clock):
    scheduler = make_scheduler(client, clock)
    worker = Worker(WorkerConfig(worker_id="w1"), EchoEngine(slots=8, clock=clock), connect=lambda: client, clock=clock)
    worker._connect()
    submit(client, clock, "r0", prompt="abc")
    settle(scheduler, clock)
    worker.run_once()  # admitted and one token out
    # Meanwhile the request was re-dispatched to another worker attempt.
    client.set(KEYS.owner("r0"), scripts.owner_token("w2", 1))
    run_worker_until_idle(worker)
    assert client.get(KEYS.result("r0")) is None
    assert not worker.tracked


class Intercepted:
    """A Redis client that runs hook() before each call of one command, as a fault would strike."""

    def __init__(self, client, command: str, hook):
        self._client, self._command, self._hook = client, command, hook

    def __getattr__(self, name):
        attribute = getattr(self._client, name)
        if name != self._command:
            return attribute

        def intercepted(*args, **kwargs):
            self._hook()
            return attribute(*args, **kwargs)

        return intercepted


def drops_once(client, command: str) -> Intercepted:
    """The connection drops at the first call of `command` (a Redis restart)."""
    dropped = []

    def drop():
        if not dropped:
            dropped.append(True)
            raise redis.ConnectionError("connection reset by peer")

    return Intercepted(client, command, drop)


def test_a_connection_lost_while_admitting_a_job_loses_none_of_its_requests(client, clock):
    # Regression: the job used to be marked open before its cancel flags were read, so after the
    # reconnect it looked finished and was acked with its requests never run.
    scheduler = make_scheduler(client, clock)
    flaky = drops_once(client, "mget")
    worker = Worker(WorkerConfig(worker_id="w1"), EchoEngine(slots=8, clock=clock), connect=lambda: flaky, clock=clock)
    worker._connect()
    submit(client, clock, "r0", prompt="abc")
    submit(client, clock, "r1", prompt="de")
    settle(scheduler, clock)
    with pytest.raises(redis.ConnectionError):
        worker.run_once()  # the job was delivered to the worker, then the connection dropped
    worker._reconnect()
    run_worker_until_idle(worker)
    assert (final_of(client, "r0").text, final_of(client, "r1").text) == ("abc", "de")
    assert client.xlen(KEYS.jobs("w1")) == 0


def test_a_refused_request_keeps_its_job_open_until_its_error_is_stored(client, clock):
    scheduler = make_scheduler(client, clock)
    flaky = drops_once(client, "pipeline")  # the first pipeline is the refusal's FINALIZE
    worker = Worker(WorkerConfig(worker_id="w1"), EchoEngine(slots=8, clock=clock), connect=lambda: client, clock=clock)
    worker._connect()
    worker.outbox.redis = flaky
    submit(client, clock, "r0", prompt="abc")
    settle(scheduler, clock)
    client.set(KEYS.cancelled("r0"), 1)  # cancelled after dispatch, before the worker read the job
    with pytest.raises(redis.ConnectionError):
        worker.run_once()
    worker._reconnect()
    assert client.xlen(KEYS.jobs("w1")) == 1  # not acked: the refusal is not stored yet
    run_worker_until_idle(worker)
    assert final_of(client, "r0").error.type == "cancelled"
    assert client.xlen(KEYS.jobs("w1")) == 0


def confirmed_worker(client, clock, worker_id: str = "w1") -> Worker:
    """A connected worker whose cancel subscription Redis has confirmed."""
    worker = Worker(WorkerConfig(worker_id=worker_id), EchoEngine(slots=8, clock=clock), connect=lambda: client, clock=clock)
    worker._connect()
    for _ in range(50):
        worker._apply_cancels()
        if not worker._cancels.needs_flags("99999999999999-0"):
            return worker
        time.sleep(0.01)
    raise AssertionError("the cancel subscription was never confirmed")


def test_a_cancel_heard_before_its_job_is_read_refuses_the_request(client, clock):
    scheduler = make_scheduler(client, clock)
    worker = confirmed_worker(client, clock)
    submit(client, clock, "r0", prompt="abc")
    submit(client, clock, "r1", prompt="de")
    settle(scheduler, clock)
    # Broadcast only (no flag): the worker can know of this cancel only from its subscription.
    client.publish(KEYS.cancel_channel, "r0")
    time.sleep(0.05)
    worker._apply_cancels()  # heard before the job is read; remembered
    run_worker_until_idle(worker)
    assert final_of(client, "r0").error.type == "cancelled"
    assert final_of(client, "r1").text == "de"


def test_jobs_dispatched_before_the_subscription_was_confirmed_read_their_flags(client, clock):
    scheduler = make_scheduler(client, clock)
    submit(client, clock, "r0", prompt="abc")
    settle(scheduler, clock)
    advertise(client, "w1", 8, clock)
    settle(scheduler, clock)
    client.set(KEYS.cancelled("r0"), 1)  # its broadcast went out before this worker subscribed
    worker = confirmed_worker(client, clock)
    run_worker_until_idle(worker)
    assert final_of(client, "r0").error.type == "cancelled"


def test_after_a_gap_in_the_cancel_subscription_held_requests_read_their_flags(redis_client, clock):
    client = redis_client
    scheduler = make_scheduler(client, clock)
    worker = confirmed_worker(client, clock)
    worker.engine.token_delay_s = 0
    submit(client, clock, "long", prompt="x" * 50)
    settle(scheduler, clock)
    worker.run_once()
    assert "long" in worker.tracked
    # The subscription drops; a cancel broadcast meanwhile is lost, only its flag remains.
    client.client_kill_filter(_type="pubsub")
    client.set(KEYS.cancelled("long"), 1)
    for _ in range(200):  # as Worker.run does: a lost connection means reconnect and go on
        try:
            worker.run_once()
        except redis.ConnectionError:
            worker._reconnect()
        if not worker.tracked:
            break
    result = final_of(client, "long")
    assert result.finish_reason == "cancelled" and len(result.text) < 50


def test_a_batch_window_counts_from_when_the_request_reached_redis(client, clock):
    scheduler = make_scheduler(client, clock)  # max_wait_ms=10
    # Redis's clock runs 100 s ahead of this scheduler's; TIME tells it so.
    scheduler._note_broker_time(clock() + 100.0, sent=clock(), received=clock())
    entered_ms = int((clock() + 100.0 - 0.0015) * 1000)  # 1.5 ms before the read, on Redis's clock
    client.xadd(KEYS.requests, {"id": "r0", "data": encode(Request(v=PROTOCOL_VERSION, id="r0", prompt="p"))},
                id=f"{entered_ms}-0")
    scheduler._read(None)
    assert scheduler.batcher.opened_at("") == pytest.approx(clock() - 0.0015, abs=0.001)
    # An entry id far in the past (or a skewed clock) earns at most MAX_TRANSIT_CREDIT_S.
    scheduler._accept(KEYS.requests, [("1000-0", {b"id": b"r1", b"data": encode(Request(v=PROTOCOL_VERSION, id="r1", prompt="p"))})])
    assert scheduler.batcher.opened_at("") == pytest.approx(clock() - 0.002)


def test_a_job_read_twice_is_admitted_once_and_acked_only_when_done(client, clock):
    # The step pipeline reads the job stream; after a reconnect the pending list is read too,
    # so one job entry can come back twice. The second must not reset (and ack) the running job.
    scheduler = make_scheduler(client, clock)
    worker = confirmed_worker(client, clock)
    submit(client, clock, "long", prompt="x" * 30)
    settle(scheduler, clock)
    worker.run_once()
    assert "long" in worker.tracked
    worker._jobs_in_hand = [client.xreadgroup("worker", "w1", {KEYS.jobs("w1"): "0"})]  # the same entry again
    worker.run_once()
    assert client.xlen(KEYS.jobs("w1")) == 1 and "long" in worker.tracked
    run_worker_until_idle(worker)
    assert final_of(client, "long").text == "x" * 30
    assert client.xlen(KEYS.jobs("w1")) == 0


def test_a_result_whose_pipeline_failed_in_flight_is_stored_after_the_reconnect(client, clock):
    scheduler = make_scheduler(client, clock)
    worker = confirmed_worker(client, clock)
    submit(client, clock, "r0", prompt="a")
    submit(client, clock, "r1", prompt="bcd")
    settle(scheduler, clock)
    worker.outbox.redis = drops_once(client, "pipeline")  # the first step's pipeline, sent from the publisher thread
    lost = 0
    for _ in range(100):
        try:
            worker.run_once()
        except redis.ConnectionError:
            lost += 1
            worker._reconnect()
        if not worker.tracked and not worker.engine.has_work():
            break
    assert lost == 1
    assert (final_of(client, "r0").text, final_of(client, "r1").text) == ("a", "bcd")
    assert client.xlen(KEYS.jobs("w1")) == 0


def test_a_result_finished_while_the_previous_pipeline_failed_is_stored_after_the_reconnect(client, clock):
    # Regression, found by benchmarks/failover_load.py (kill -9 of a Sentinel master): the step
    # after a failed in-flight pipeline finished a request, booking the failed pipeline raised,
    # and that step's final result was dropped: the request stayed held, its job open, forever.
    scheduler = make_scheduler(client, clock)
    worker = confirmed_worker(client, clock)
    submit(client, clock, "r0", prompt="ab")  # its first token's pipeline fails; it finishes in the next step
    settle(scheduler, clock)
    worker.outbox.redis = drops_once(client, "pipeline")
    lost = 0
    for _ in range(100):
        try:
            worker.run_once()
        except redis.ConnectionError:
            lost += 1
            worker._reconnect()
        if not worker.tracked and not worker.engine.has_work():
            break
    assert lost == 1
    assert final_of(client, "r0").text == "ab"
    assert client.xlen(KEYS.jobs("w1")) == 0


def test_jobs_read_by_two_pipelines_before_the_next_take_all_run(client, clock):
    # Regression: a step books one pipeline's job read, then the engine runs dry and the next
    # iteration books the last pipeline's read too; the first reply was overwritten and its job
    # sat on the worker's pending list, never run (found by test_load's quiet producer).
    scheduler = make_scheduler(client, clock)
    worker = confirmed_worker(client, clock)
    gate = threading.Event()
    gate.set()
    worker.outbox.redis = Intercepted(client, "pipeline", lambda: gate.wait(10))  # the publisher thread's sends
    submit(client, clock, "r0", prompt="ab")
    settle(scheduler, clock)
    gate.clear()
    worker.run_once()  # r0's first token; its pipeline (with a job read) waits at the gate
    submit(client, clock, "r1", prompt="x")
    settle(scheduler, clock)  # r1's job is on the stream before that read runs
    gate.set()
    worker.outbox._in_flight[1].result(timeout=10)  # the read took r1's job
    worker.run_once()  # r0 finishes; books the first read (r1's job), sends the last pipeline
    run_worker_until_idle(worker)
    assert (final_of(client, "r0").text, final_of(client, "r1").text) == ("ab", "x")
    assert client.xlen(KEYS.jobs("w1")) == 0


class FailingOnceEngine(EchoEngine):
    """An engine whose first step fails, as a transient device fault would."""

    failed = False

    def step(self):
        if not self.failed:
            self.failed = True
            raise RuntimeError("device lost")
        return super().step()


@pytest.mark.parametrize("max_attempts, dead_lettered", [(1, True), (3, False)])
def test_a_worker_hands_back_against_the_schedulers_max_attempts(client, clock, max_attempts, dead_lettered):
    scheduler = make_scheduler(client, clock, max_attempts=max_attempts)  # published in the config hash
    worker = Worker(WorkerConfig(worker_id="w1"), FailingOnceEngine(slots=8, clock=clock), connect=lambda: client,
                    clock=clock)
    worker._connect()
    submit(client, clock, "r0", prompt="abc")
    settle(scheduler, clock)
    worker.run_once()  # admitted, then the step fails: the worker hands r0 back
    assert client.exists(KEYS.result("r0")) == dead_lettered
    assert client.xlen(KEYS.dead_letters) == int(dead_lettered)
    assert client.xlen(KEYS.requests) == int(not dead_lettered)


class CountingEngine(EchoEngine):
    """An echo engine that keeps prefix-cache totals, as the hf engine will."""

    def __init__(self, **options):
        super().__init__(**options)
        self.steps = 0

    def step(self):
        self.steps += 1
        return super().step()

    def stats(self) -> dict[str, int]:
        return {"prefix_cache_queries": 10 * self.steps, "prefix_cache_hits": 4 * self.steps}


def test_the_engines_running_totals_become_counters(client, clock):
    from batchd.daemon.metrics import WORKER_REGISTRY

    scheduler = make_scheduler(client, clock)
    engine = CountingEngine(slots=8, clock=clock)
    worker = Worker(WorkerConfig(worker_id="counting"), engine, connect=lambda: client, clock=clock)
    worker._connect()
    labels = {"worker": "counting", "model_name": "echo"}
    before = {name: WORKER_REGISTRY.get_sample_value(name, labels) or 0.0
              for name in ("batchd:prefix_cache_queries_total", "batchd:prefix_cache_hits_total",
                           "batchd:num_preemptions_total")}
    submit(client, clock, "r0", prompt="abcd")
    settle(scheduler, clock)
    run_worker_until_idle(worker)
    grown = {name: WORKER_REGISTRY.get_sample_value(name, labels) - value for name, value in before.items()}
    assert engine.steps >= 4
    assert grown == {"batchd:prefix_cache_queries_total": 10 * engine.steps,
                     "batchd:prefix_cache_hits_total": 4 * engine.steps,
                     "batchd:num_preemptions_total": 0}


def submit_as(client, clock, tenant: str, local_id: str) -> str:
    """A raw submit to a tenant's own stream (docs/protocol.md, "Tenants")."""
    request_id = f"{tenant}/{local_id}"
    request = Request(v=PROTOCOL_VERSION, id=request_id, prompt=f"prompt of {request_id}", submitted_at=clock())
    client.xadd(KEYS.requests_of(tenant), {"id": request_id, "data": encode(request)})
    return request_id


def test_recovery_covers_every_tenants_stream(client, clock):
    """A dead worker's request goes back to its tenant's stream and runs again; a dead
    scheduler's held requests on a tenant's stream are taken over by another scheduler."""
    client.sadd(KEYS.tenants, "alice", "bob")  # registered beside their ACL users (docs/security.md)
    scheduler = make_scheduler(client, clock)
    advertise(client, "w1", 8, clock)
    reaped = submit_as(client, clock, "alice", "r0")
    settle(scheduler, clock)
    assert [r.id for r in jobs_of(client, "w1")[0].requests] == [reaped]
    client.delete(KEYS.heartbeat("w1"))
    assert scheduler.reap_worker("w1") == 1
    assert [fields[b"id"] for _, fields in client.xrange(KEYS.requests_of("alice"))] == [reaped.encode()]
    assert client.xlen(KEYS.requests) == 0
    # Another scheduler reads both tenants' requests and dies before any worker has room.
    held = submit_as(client, clock, "bob", "r1")
    dying = make_scheduler(client, clock, scheduler_id="dying")
    settle(dying, clock)
    assert sorted(h.request.id for h in dying.batcher.items()) == [reaped, held]
    taker = make_scheduler(client, clock, scheduler_id="taker")
    taker.config.claim_idle_ms = 0
    advertise(client, "w2", 8, clock)
    taker._next_housekeeping = 0
    settle(taker, clock)
    dispatched = [(r.id, r.attempt) for job in jobs_of(client, "w2") for r in job.requests]
    assert sorted(dispatched) == sorted([(reaped, 1), (held, 0)])
