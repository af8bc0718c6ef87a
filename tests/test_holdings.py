"""The worker's bookkeeping with no Redis and no engine: held jobs, results, capacity, heartbeats."""

from __future__ import annotations

import pytest

from batchd.client.protocol import PROTOCOL_VERSION, Heartbeat, Request, Result
from batchd.daemon.toolkit import SERVER_TICK_MS
from batchd.workers.engine import StepOutput
from batchd.workers.holdings import CHANGED_BEAT_GAP_S, IDLE_READ_MAX_MS, Advertisement, Held, Holdings, can_take, free_slots


def held(request_id: str, job: str = "1-0", submitted_at: float = 100.0, admitted_at: float = 101.0) -> Held:
    return Held(Request(v=PROTOCOL_VERSION, id=request_id, prompt="p", submitted_at=submitted_at), job,
                "w1/0", admitted_at)


def done(*helds: Held) -> list[tuple[Held, Result]]:
    return [(h, Result(h.request.id, "stop")) for h in helds]


def test_a_job_closes_with_the_result_of_its_last_open_request():
    holdings = Holdings()
    a, b, c = held("a"), held("b"), held("c")
    holdings.open_job("1-0", ["a", "b", "c"])
    for h in (a, b, c):
        holdings.hold(h)
    assert holdings.jobs_closed_by(done(a, b)) == {}
    assert holdings.jobs_closed_by(done(a, b, c)) == {"1-0": c}
    holdings.delivered(a)
    holdings.delivered(b)
    assert holdings.is_open("1-0") and list(holdings.requests) == ["c"]
    assert holdings.jobs_closed_by(done(c)) == {"1-0": c}
    holdings.delivered(c)
    assert not holdings.is_open("1-0") and not holdings.requests


def test_a_result_outside_any_open_job_closes_nothing():
    holdings = Holdings()
    holdings.open_job("1-0", ["a"])
    stray = held("z", job="9-0")
    assert holdings.jobs_closed_by(done(stray)) == {}
    holdings.delivered(stray)
    assert holdings.is_open("1-0")


def test_a_job_of_duplicates_only_is_done_at_once_and_acks_forget_it():
    holdings = Holdings()
    holdings.open_job("2-0", [])
    assert holdings.job_is_done("2-0") and not holdings.job_is_done("3-0")
    holdings.jobs_acked(["2-0"])
    assert not holdings.is_open("2-0")


def test_tokens_build_the_stream_and_the_final_result():
    h = held("r", submitted_at=100.0, admitted_at=100.5)
    first = h.add_tokens([72, 105], "Hi", now=101.0)
    second = h.add_tokens([33], "!", now=101.2)
    assert (first.index, second.index, second.token_ids) == (0, 2, [33])
    result = h.result(StepOutput("r", [], finish_reason="length", prompt_tokens=4), now=102.0, worker_id="w1")
    assert (result.text, result.token_ids, result.finish_reason, result.worker) == ("Hi!", [72, 105, 33], "length", "w1")
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (4, 3)
    assert result.timings.queued_s == pytest.approx(0.5)
    assert result.timings.first_token_s == pytest.approx(1.0)
    assert result.timings.total_s == pytest.approx(2.0)


def test_a_request_nobody_hears_is_abandoned_once_per_period():
    h = held("r")
    assert h.unheard_for(0, now=0.0, abandoned_after_s=10) is None  # the silence starts
    assert h.unheard_for(0, now=9.0, abandoned_after_s=10) is None
    assert h.unheard_for(0, now=10.5, abandoned_after_s=10) == pytest.approx(10.5)
    assert h.unheard_for(0, now=12.0, abandoned_after_s=10) is None  # not again at every step
    assert h.unheard_for(1, now=30.0, abandoned_after_s=10) is None  # a listener came back
    assert h.unheard_for(0, now=31.0, abandoned_after_s=10) is None


def test_can_take_is_free_slots_plus_the_prefetch_queue():
    assert can_take(total_slots=8, prefetch=None, running=0, waiting=0) == 12  # prefetch: half the slots
    assert can_take(total_slots=8, prefetch=2, running=8, waiting=1) == 1
    assert can_take(total_slots=1, prefetch=None, running=1, waiting=5) == 0
    assert can_take(total_slots=1, prefetch=None, running=0, waiting=0) == 2  # at least one queued


def test_free_slots_never_count_the_prefetch_queue():
    # What operators read as free: an idle worker has all its slots free, never more.
    assert free_slots(total_slots=8, running=0, waiting=0) == 8
    assert free_slots(total_slots=8, running=5, waiting=0) == 3
    assert free_slots(total_slots=8, running=8, waiting=3) == 0  # requests wait for slots: none free
    assert free_slots(total_slots=8, running=6, waiting=1) == 1


def beat(can_take: int, last_job_read: str, sent_at: float) -> Heartbeat:
    return Heartbeat(v=PROTOCOL_VERSION, worker_id="w1", model="m", engine="echo", total_slots=8,
                     free_slots=min(8, can_take), can_take=can_take, last_job_read=last_job_read, sent_at=sent_at)


def test_a_heartbeat_of_an_older_worker_counts_free_slots_as_what_it_can_take():
    older = Heartbeat(v=PROTOCOL_VERSION, worker_id="w1", model="m", engine="echo", total_slots=8, free_slots=12)
    assert older.can_take is None and older.requests_it_can_take() == 12
    assert beat(12, "0-0", 0.0).requests_it_can_take() == 12


def test_a_heartbeat_is_due_periodically_and_when_it_would_say_something_new():
    advertised = Advertisement(interval_s=1.0)
    assert advertised.is_due(now=0.0, can_take=8, last_job_read="0-0", busy=False)  # never beat yet
    advertised.sent(beat(8, "0-0", sent_at=0.0))
    assert not advertised.is_due(now=0.5, can_take=8, last_job_read="0-0", busy=True)
    assert advertised.is_due(now=1.0, can_take=8, last_job_read="0-0", busy=True)
    # Other free slots, or a job read the schedulers still count as queued: at once when idle...
    assert advertised.is_due(now=0.001, can_take=7, last_job_read="0-0", busy=False)
    assert advertised.is_due(now=0.001, can_take=8, last_job_read="5-0", busy=False)
    # ...and no sooner than CHANGED_BEAT_GAP_S after the last beat while busy.
    assert not advertised.is_due(now=CHANGED_BEAT_GAP_S / 2, can_take=7, last_job_read="0-0", busy=True)
    assert advertised.is_due(now=CHANGED_BEAT_GAP_S, can_take=7, last_job_read="0-0", busy=True)


def test_an_idle_worker_waits_for_jobs_until_its_next_beat_is_due():
    advertised = Advertisement(interval_s=1.0)
    advertised.sent(beat(8, "0-0", sent_at=10.0))
    assert advertised.idle_wait_ms(now=10.85, can_take=8, last_job_read="0-0") in (149, 150)
    # At most IDLE_READ_MAX_MS, so a SIGTERM is answered soon after.
    assert advertised.idle_wait_ms(now=10.2, can_take=8, last_job_read="0-0") == IDLE_READ_MAX_MS
    # Never a wait shorter than a server tick when nothing is owed: that would be a busy poll.
    assert advertised.idle_wait_ms(now=10.95, can_take=8, last_job_read="0-0") == SERVER_TICK_MS
    # Something new to say: wake in time for the changed-slots beat.
    assert 14 <= advertised.idle_wait_ms(now=10.005, can_take=6, last_job_read="0-0") <= 15
    assert advertised.idle_wait_ms(now=10.5, can_take=6, last_job_read="0-0") == 1
