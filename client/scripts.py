"""Lua scripts that make batchd's multi-key steps atomic on the Redis server.

Each one exists because two processes may race on the same request: a client
retrying a submit, a paused worker waking after its requests were handed to
another, two schedulers reaping one dead worker. Scripts touch only the keys
passed in KEYS, so they also run on Redis Cluster once keys share a hash tag.
"""

from __future__ import annotations

# Enqueue unless the id was already accepted (idempotent retries) or the
# backlog is at max_queue (explicit overload instead of silent growth).
# KEYS: requests stream, accepted marker, config hash
# ARGV: request id, payload, accepted ttl seconds
# Returns 1 enqueued, 0 duplicate, -1 overloaded.
SUBMIT = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local max_queue = tonumber(redis.call('HGET', KEYS[3], 'max_queue') or '0')
if max_queue and max_queue > 0 and redis.call('XLEN', KEYS[1]) >= max_queue then return -1 end
redis.call('SET', KEYS[2], '1', 'EX', tonumber(ARGV[3]))
redis.call('XADD', KEYS[1], '*', 'id', ARGV[1], 'data', ARGV[2])
return 1
"""

# Store the final event once and publish it once. A worker whose lease was
# taken over (owner key names another attempt) is refused, so a worker that
# was paused past its lease never delivers a second result.
# KEYS: result key, owner key
# ARGV: channel, final event payload, result ttl seconds, owner token ('' = no lease check)
# Returns 1 delivered, 0 already delivered, -1 fenced.
FINALIZE = """
if ARGV[4] ~= '' then
  local owner = redis.call('GET', KEYS[2])
  if owner and owner ~= ARGV[4] then return -1 end
end
if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'EX', tonumber(ARGV[3])) then
  redis.call('PUBLISH', ARGV[1], ARGV[2])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""

# Publish one engine step's token events in one round trip, dropping those
# of requests this worker no longer owns.
# KEYS: owner key of each event, in order
# ARGV: owner token, then channel and payload for each event
# Returns the number published.
PUBLISH_STEP = """
local token = ARGV[1]
local sent = 0
for i = 1, #KEYS do
  local owner = redis.call('GET', KEYS[i])
  if owner == token then
    redis.call('PUBLISH', ARGV[2 * i], ARGV[2 * i + 1])
    sent = sent + 1
  end
end
return sent
"""


def finalize_keys_args(keys, request_id: str, final_payload: bytes, result_ttl_s: int,
                       owner_token: str = "") -> tuple[list[str], list]:
    """KEYS and ARGV of FINALIZE for one request's final event."""
    return ([keys.result(request_id), keys.owner(request_id)],
            [keys.channel(request_id), final_payload, result_ttl_s, owner_token])


def dead_letter_fields(request_id: str | None, error_type: str, message: str, data: bytes | None) -> dict:
    """Fields of one dead-letter stream entry (docs/protocol.md)."""
    fields = {"id": request_id or "", "error_type": error_type, "reason": message}
    if data is not None:
        fields["data"] = data
    return fields


# Dead letters keep the most recent entries only; operators read them with
# `batchd status` or XRANGE.
DEAD_LETTER_MAXLEN = 100_000


def owner_token(worker_id: str, attempt: int) -> str:
    """The lease value that lets one worker attempt publish for a request."""
    return f"{worker_id}/{attempt}"
