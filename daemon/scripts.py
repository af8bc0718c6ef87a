"""The daemons' Lua scripts, each with the KEYS and ARGV it is called with.

Each one exists because two processes may race on the same request: a paused
worker waking after its requests were handed to another, two schedulers
reaping one dead worker, a cancel landing during a dispatch. They run the way
every batchd script does (batchd.client.scripts.Script).
"""

from __future__ import annotations

from typing import Sequence

from batchd.client.keys import Keys
from batchd.client.scripts import Script, ScriptCall

# Store the final event once and publish it once. A worker whose lease was
# taken over (owner key names another attempt) is refused, so a worker that
# was paused past its lease never delivers a second result. A worker whose job
# this result completes passes the job too: it is acknowledged in the same
# step, after the result is stored (a job is acked whatever the outcome: a
# fenced or duplicate result leaves nothing more to do for it).
# KEYS: result key, owner key, [job stream]
# ARGV: channel, final event payload, result ttl seconds, owner token ('' = no lease check),
#       [worker group, job entry id]
# Returns 1 delivered, 0 already delivered, -1 fenced.
FINALIZE = Script("""
local outcome = 0
if ARGV[4] ~= '' then
  local owner = redis.call('GET', KEYS[2])
  if owner and owner ~= ARGV[4] then outcome = -1 end
end
if outcome == 0 and redis.call('SET', KEYS[1], ARGV[2], 'NX', 'EX', tonumber(ARGV[3])) then
  redis.call('PUBLISH', ARGV[1], ARGV[2])
  redis.call('DEL', KEYS[2])
  outcome = 1
end
if KEYS[3] then
  redis.call('XACK', KEYS[3], ARGV[5], ARGV[6])
  redis.call('XDEL', KEYS[3], ARGV[6])
end
return outcome
""")

# Publish one engine step's token events in one round trip, dropping those
# of requests this worker no longer owns.
# KEYS: owner key of each event, in order
# ARGV: owner token, then channel and payload for each event
# Returns, per event, how many subscribers received it (-1: not published,
# the lease is gone), so the worker notices a caller that went away.
PUBLISH_STEP = Script("""
local token = ARGV[1]
local heard = {}
for i = 1, #KEYS do
  local owner = redis.call('GET', KEYS[i])
  if owner == token then
    heard[i] = redis.call('PUBLISH', ARGV[2 * i], ARGV[2 * i + 1])
  else
    heard[i] = -1
  end
end
return heard
""")

# Give a request its worker could not finish back to the schedulers, or, on
# its last attempt, finish it with its error and keep it as a dead letter.
# Skipped when the request already has a result or its lease names another
# attempt (a duplicate of a request that already runs elsewhere). A requeued
# request's lease is set to a marker at once, so the worker that lost it is
# fenced from that moment, not only once the request is dispatched again.
# KEYS: result key, owner key, requests stream, dead-letter stream, stats hash
# ARGV: expected owner token ('' = no check), request id, 'requeue' or 'dead',
#       request payload, channel, event payload (restart or final event),
#       ttl seconds, lease marker, error type, error message, dead-letter maxlen
# Returns 1 requeued, 2 dead-lettered, 0 skipped.
HAND_BACK = Script("""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if ARGV[1] ~= '' then
  local owner = redis.call('GET', KEYS[2])
  if owner and owner ~= ARGV[1] then return 0 end
end
local ttl = tonumber(ARGV[7])
if ARGV[3] == 'requeue' then
  redis.call('SET', KEYS[2], ARGV[8], 'EX', ttl)
  redis.call('XADD', KEYS[3], '*', 'id', ARGV[2], 'data', ARGV[4])
  redis.call('PUBLISH', ARGV[5], ARGV[6])
  return 1
end
redis.call('SET', KEYS[1], ARGV[6], 'EX', ttl)
redis.call('PUBLISH', ARGV[5], ARGV[6])
redis.call('DEL', KEYS[2])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[11], '*',
           'id', ARGV[2], 'error_type', ARGV[9], 'reason', ARGV[10], 'data', ARGV[4])
redis.call('HINCRBY', KEYS[5], 'dead_letters', 1)
return 2
""")

# Hand a batch to a worker unless one of its requests was cancelled meanwhile,
# in one atomic step: the job lands on the worker's stream, each request gets its
# lease, and its entry leaves the request stream, all or nothing. Checking the
# cancel flags here saves the scheduler a round trip per job.
# KEYS: job stream, request stream, stats hash, owner key of each request, cancel key of each request
# ARGV: job payload, scheduler group, lease ttl seconds, owner token of each request, entry id of each request
# Returns {1, job stream id} dispatched, or {0, {positions (1-based) of cancelled requests}}: nothing written.
DISPATCH = Script("""
local n = (#KEYS - 3) / 2
local cancelled = {}
for i = 1, n do
  if redis.call('EXISTS', KEYS[3 + n + i]) == 1 then cancelled[#cancelled + 1] = i end
end
if #cancelled > 0 then return {0, cancelled} end
local job_id = redis.call('XADD', KEYS[1], '*', 'job', ARGV[1])
local entries = {}
for i = 1, n do
  redis.call('SET', KEYS[3 + i], ARGV[3 + i], 'EX', tonumber(ARGV[3]))
  entries[i] = ARGV[3 + n + i]
end
redis.call('XACK', KEYS[2], ARGV[2], unpack(entries))
redis.call('XDEL', KEYS[2], unpack(entries))
redis.call('HINCRBY', KEYS[3], 'jobs', 1)
redis.call('HINCRBY', KEYS[3], 'requests_dispatched', n)
redis.call('HINCRBY', KEYS[3], 'job_size:' .. n, 1)
return {1, job_id}
""")

# Dead letters keep the most recent entries only; operators read them with
# `batchd status` or XRANGE.
DEAD_LETTER_MAXLEN = 100_000


def finalize_call(keys: Keys, request_id: str, final_payload: bytes, result_ttl_s: int,
                  owner_token: str = "", ack: tuple[str, str, str] | None = None) -> ScriptCall:
    """FINALIZE for one request's final event; ack = (job stream, group, entry id) when this
    result completes that job."""
    call_keys = [keys.result(request_id), keys.owner(request_id)]
    args = [keys.channel(request_id), final_payload, result_ttl_s, owner_token]
    if ack is not None:
        stream, group, entry_id = ack
        call_keys.append(stream)
        args += [group, entry_id]
    return FINALIZE, call_keys, args


def publish_step_call(keys: Keys, owner_token: str, events: Sequence[tuple[str, bytes]]) -> ScriptCall:
    """PUBLISH_STEP for the (request id, token event payload) pairs of one lease token."""
    args: list = [owner_token]
    for request_id, payload in events:
        args += [keys.channel(request_id), payload]
    return PUBLISH_STEP, [keys.owner(request_id) for request_id, _payload in events], args


def dispatch_call(keys: Keys, worker_id: str, job_payload: bytes, group: str, lease_ttl_s: int,
                  requests: Sequence[tuple[str, int, str]]) -> ScriptCall:
    """DISPATCH of one job to worker_id; requests are its (request id, attempt, request entry id)."""
    call_keys = [keys.jobs(worker_id), keys.requests, keys.stats,
                 *[keys.owner(request_id) for request_id, _attempt, _entry in requests],
                 *[keys.cancelled(request_id) for request_id, _attempt, _entry in requests]]
    args = [job_payload, group, lease_ttl_s,
            *[owner_token(worker_id, attempt) for _request_id, attempt, _entry in requests],
            *[entry_id for _request_id, _attempt, entry_id in requests]]
    return DISPATCH, call_keys, args


def dead_letter_fields(request_id: str | None, error_type: str, message: str, data: bytes | None) -> dict:
    """Fields of one dead-letter stream entry (docs/protocol.md)."""
    fields = {"id": request_id or "", "error_type": error_type, "reason": message}
    if data is not None:
        fields["data"] = data
    return fields


def owner_token(worker_id: str, attempt: int) -> str:
    """The lease value that lets one worker attempt publish for a request."""
    return f"{worker_id}/{attempt}"


def requeued_token(attempt: int) -> str:
    """The lease value of a request waiting to be dispatched again: fences every worker."""
    return f"queued/{attempt}"
