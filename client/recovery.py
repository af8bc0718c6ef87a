"""Where a request goes when its worker cannot finish it.

Schedulers (reaping a dead worker) and workers (draining, or after an engine
failure) both hand requests back through these two functions, so the retry
count and the dead-letter format have one definition.
"""

from __future__ import annotations

import msgspec
import redis

from . import scripts
from .errors import WorkerFailed
from .keys import Keys
from .protocol import FinalEvent, Request, RestartEvent, encode, error_result


def hand_back(client: redis.Redis, keys: Keys, requests: list[Request], reason: str, *,
              max_attempts: int, result_ttl_s: int, count_attempt: bool = True) -> tuple[int, int]:
    """Put unfinished requests back on the request stream, or dead-letter them.

    A request that already has a stored result is left alone. count_attempt
    is False for a graceful hand-back (a draining worker), which is no failure.
    Returns (requeued, dead_lettered).
    """
    if not requests:
        return 0, 0
    done = client.mget([keys.result(r.id) for r in requests])
    requeued = dead = 0
    with client.pipeline(transaction=True) as pipe:
        for request, stored in zip(requests, done):
            if stored is not None:
                continue
            attempt = request.attempt + 1 if count_attempt else request.attempt
            if attempt >= max_attempts:
                _dead_letter(pipe, keys, request, reason, max_attempts, result_ttl_s)
                dead += 1
                continue
            retry = msgspec.structs.replace(request, attempt=attempt)
            pipe.xadd(keys.requests, {"id": retry.id, "data": encode(retry)})
            pipe.publish(keys.channel(retry.id), encode(RestartEvent(attempt=attempt, reason=reason)))
            requeued += 1
        pipe.execute()
    return requeued, dead


def _dead_letter(pipe, keys: Keys, request: Request, reason: str, max_attempts: int, result_ttl_s: int) -> None:
    error = WorkerFailed(f"request {request.id} failed {max_attempts} times (last: {reason}); "
                         "it is in the dead-letter stream for inspection", request.id)
    result = error_result(request.id, error, "error", request.submitted_at)
    final = encode(FinalEvent(result))
    # Inline FINALIZE semantics (SET NX, then publish) inside this MULTI.
    pipe.set(keys.result(request.id), final, nx=True, ex=result_ttl_s)
    pipe.publish(keys.channel(request.id), final)
    pipe.delete(keys.owner(request.id))
    pipe.xadd(keys.dead_letters, scripts.dead_letter_fields(request.id, error.code, error.message, encode(request)),
              maxlen=scripts.DEAD_LETTER_MAXLEN, approximate=True)
    pipe.hincrby(keys.stats, "dead_letters", 1)
