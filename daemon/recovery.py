"""Where a request goes when its worker cannot finish it.

Schedulers (reaping a dead worker) and workers (draining, or after an engine
failure) both hand requests back through hand_back, so the retry count, the
lease fence and the dead-letter format have one definition. Each request is
handed back by one HAND_BACK script call: checking for a stored result and
requeueing (or dead-lettering) are one atomic step, so a worker that finishes
the request at the same moment cannot cause a second delivery.
"""

from __future__ import annotations

import msgspec
import redis

from batchd.client.errors import WorkerFailed
from batchd.client.keys import Keys
from batchd.client.protocol import Request, RestartEvent, encode, error_result, seal_event, seal_final
from batchd.client.scripts import ScriptCall, raise_any_error, run_in_pipeline

from . import scripts


def hand_back(client: redis.Redis, keys: Keys, requests: list[Request], reason: str, *,
              max_attempts: int, result_ttl_s: int, count_attempt: bool = True,
              worker_id: str = "") -> tuple[int, int]:
    """Put unfinished requests back on their request stream (their tenant's), or dead-letter them.

    A request that already has a stored result, or whose lease names another
    attempt than worker_id's (when given), is left alone. count_attempt is
    False for a graceful hand-back (a draining worker), which is no failure.
    Returns (requeued, dead_lettered).
    """
    if not requests:
        return 0, 0
    calls = [_hand_back_call(keys, request, reason, max_attempts, result_ttl_s, count_attempt, worker_id)
             for request in requests]
    outcomes, _ = run_in_pipeline(client, calls)
    raise_any_error(outcomes)
    return outcomes.count(1), outcomes.count(2)


def _hand_back_call(keys: Keys, request: Request, reason: str, max_attempts: int, result_ttl_s: int,
                    count_attempt: bool, worker_id: str) -> ScriptCall:
    expected = scripts.owner_token(worker_id, request.attempt) if worker_id else ""
    attempt = request.attempt + 1 if count_attempt else request.attempt
    if attempt >= max_attempts:
        mode, payload, event, error = _dead_letter(request, reason, max_attempts)
    else:
        mode, error = "requeue", None
        payload = encode(msgspec.structs.replace(request, attempt=attempt))
        event = seal_event(RestartEvent(attempt=attempt, reason=reason), request)
    return (scripts.published(scripts.HAND_BACK, keys),
            [keys.result(request.id), keys.owner(request.id), keys.stream_of_request(request.id),
             keys.dead_letters_in(keys.shard_of(request.id)), keys.stats_in(keys.shard_of(request.id)),
             keys.accepted(request.id)],
            [expected, request.id, mode, payload, keys.channel(request.id), event, result_ttl_s,
             scripts.requeued_token(attempt), error.code if error else "",
             error.message[:scripts.DEAD_LETTER_REASON_CHARS] if error else "", scripts.DEAD_LETTER_MAXLEN,
             scripts.CLAIM_TTL_S, scripts.DEAD_LETTER_DATA_BYTES])


def _dead_letter(request: Request, reason: str, max_attempts: int):
    error = WorkerFailed(f"request {request.id} failed {max_attempts} times (last: {reason}); "
                         "it is in the dead-letter stream for inspection", request.id)
    final = seal_final(error_result(request.id, error, "error", request.submitted_at), request)
    return "dead", encode(request), final, error
