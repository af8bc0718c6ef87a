"""The daemons' Lua scripts, each with the KEYS and ARGV it is called with.

Each one exists because two processes may race on the same request: a paused
worker waking after its requests were handed to another, two schedulers
reaping one dead worker, a cancel landing during a dispatch, a second
submission of an id already claimed (a retry, or a producer reusing an id it
saw in flight). They run the way every batchd script does
(batchd.client.scripts.Script).

One request's state machine lives in two keys (docs/security.md, "Fenced
delivery"): its claim (`accepted:<id>`, the stream entry allowed to run it) and
its lease (`owner:<id>`: `queued/<attempt>` while a scheduler holds it,
`<worker>/<attempt>` while a worker does). Every write of its outcome checks
both.
"""

from __future__ import annotations

from typing import Sequence

from batchd.client.keys import Keys
from batchd.client.protocol import Request
from batchd.client.scripts import Script, ScriptCall

# Store the final event once and publish it once. A worker whose lease was
# taken over (owner key names another attempt) is refused, so a worker that
# was paused past its lease never delivers a second result. A worker whose job
# this result completes passes the job too: it is acknowledged in the same
# step, after the result is stored (a job is acked whatever the outcome: a
# fenced or duplicate result leaves nothing more to do for it).
# The event published may be a smaller cue than the one stored: callers read the stored
# result whatever the event says (docs/protocol.md), so a full next-token vector need not
# travel by pub/sub as well (docs/integrations.md measures it). A cue that reached a
# subscriber is read at once by its caller, so its result is kept only for that read (the
# cue's read window) instead of the whole TTL: full vectors are most of what Redis holds
# in an SMC run, and a caller that was not listening still finds its result for the TTL.
# KEYS: result key, owner key, [job stream]
# ARGV: channel, final event payload, result ttl seconds, owner token ('' = no lease check),
#       event to publish ('' = the stored payload), seconds a heard cue's result is kept
#       (0: the TTL), [worker group, job entry id]
# Returns 1 delivered, 0 already delivered, -1 fenced.
FINALIZE = Script("""
local outcome = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[4] ~= '' then
    local owner = redis.call('GET', KEYS[2])
    if owner and owner ~= ARGV[4] then outcome = -1 end
  end
  if outcome == 0 then
    redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
    if ARGV[5] ~= '' then
      local heard = redis.call('PUBLISH', ARGV[1], ARGV[5])
      if heard > 0 and tonumber(ARGV[6]) > 0 then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[6])) end
    else
      redis.call('PUBLISH', ARGV[1], ARGV[2])
    end
    redis.call('DEL', KEYS[2])
    outcome = 1
  end
end
if KEYS[3] then
  redis.call('XACK', KEYS[3], ARGV[7], ARGV[8])
  redis.call('XDEL', KEYS[3], ARGV[8])
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
# fenced from that moment, not only once the request is dispatched again; its
# claim moves to the new stream entry, the only one a scheduler will run.
# KEYS: result key, owner key, requests stream, dead-letter stream, stats hash, claim key
# ARGV: expected owner token ('' = no check), request id, 'requeue' or 'dead',
#       request payload, channel, event payload (restart or final event),
#       ttl seconds, lease marker, error type, error message, dead-letter maxlen,
#       claim ttl seconds, dead-letter payload bytes kept
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
  local entry = redis.call('XADD', KEYS[3], '*', 'id', ARGV[2], 'data', ARGV[4])
  redis.call('SET', KEYS[6], entry, 'EX', tonumber(ARGV[12]))
  redis.call('PUBLISH', ARGV[5], ARGV[6])
  return 1
end
redis.call('SET', KEYS[1], ARGV[6], 'EX', ttl)
redis.call('PUBLISH', ARGV[5], ARGV[6])
redis.call('DEL', KEYS[2])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[11], '*', 'id', ARGV[2], 'error_type', ARGV[9],
           'reason', ARGV[10], 'data', string.sub(ARGV[4], 1, tonumber(ARGV[13])), 'data_bytes', #ARGV[4])
redis.call('HINCRBY', KEYS[5], 'dead_letters', 1)
return 2
""")

# Claim each request a scheduler reads, in stream order, before it is batched: a
# request id runs from one stream entry only. The first entry read for an id
# claims it (its lease becomes queued/0: a producer cannot choose its attempt);
# an entry HAND_BACK requeued holds the claim already and keeps its attempt. Any
# other entry for a claimed or finished id is a second submission (a retry, a
# raw XADD, a producer reusing an id it saw in flight) and is dropped without
# touching the request's outcome.
# KEYS: per entry, its request's claim key, owner key and result key
# ARGV: claim ttl seconds, lease ttl seconds, then each entry's stream id
# Returns, per entry, the attempt to run it as, or -1: drop it.
CLAIM = Script("""
local claim_ttl, lease_ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local attempts = {}
for i = 1, #ARGV - 2 do
  local claim, owner, result, entry = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i], ARGV[i + 2]
  local attempt = -1
  if redis.call('EXISTS', result) == 0 then
    local claimed = redis.call('GET', claim)
    if not claimed then
      redis.call('SET', claim, entry, 'EX', claim_ttl)
      redis.call('SET', owner, 'queued/0', 'EX', lease_ttl)
      attempt = 0
    elseif claimed == entry then
      local lease = redis.call('GET', owner)
      if not lease then attempt = 0
      else attempt = tonumber(string.match(lease, '^queued/(%d+)$')) or -1 end
    end
  end
  attempts[i] = attempt
end
return attempts
""")

# Finish a request the scheduler still holds (cancelled or expired before it was
# dispatched), only while the request is still this entry's: the entry holds the
# claim, no worker holds the lease and there is no result yet.
# KEYS: result key, owner key, claim key
# ARGV: channel, final event payload, result ttl seconds, entry id, queued lease token
# Returns 1 delivered, 0 not this entry's to answer.
ANSWER = Script("""
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('GET', KEYS[3]) ~= ARGV[4] then return 0 end
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[5] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
redis.call('PUBLISH', ARGV[1], ARGV[2])
redis.call('DEL', KEYS[2])
return 1
""")

# Keep an unreadable entry as a dead letter (its payload cut to a bounded
# prefix), drop it from the request stream, and answer its caller only when the
# id it names is unclaimed: a malformed entry reusing the id of a request in
# flight or finished must not fail that request.
# KEYS: requests stream, dead-letter stream, stats hash, [claim key, result key]
# ARGV: scheduler group, entry id, dead-letter maxlen, payload bytes kept, request id, error type,
#       message, payload, [channel, final event payload, result ttl, claim ttl]
# Returns 1 answered, 0 dead-lettered only.
REJECT = Script("""
local answered = 0
if KEYS[4] and redis.call('EXISTS', KEYS[5]) == 0 then
  local claimed = redis.call('GET', KEYS[4])
  if not claimed or claimed == ARGV[2] then
    redis.call('SET', KEYS[4], ARGV[2], 'EX', tonumber(ARGV[12]))
    redis.call('SET', KEYS[5], ARGV[10], 'EX', tonumber(ARGV[11]))
    redis.call('PUBLISH', ARGV[9], ARGV[10])
    answered = 1
  end
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'id', ARGV[5], 'error_type', ARGV[6],
           'reason', ARGV[7], 'data', string.sub(ARGV[8], 1, tonumber(ARGV[4])), 'data_bytes', #ARGV[8])
redis.call('HINCRBY', KEYS[3], 'dead_letters', 1)
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return answered
""")

# Hand a batch to a worker unless one of its requests was cancelled meanwhile,
# in one atomic step: the job lands on the worker's stream, each request gets its
# lease, and its entry leaves its request stream (the shared one or its tenant's), all
# or nothing. Checking the cancel flags here saves the scheduler a round trip per job. A
# request is dispatched only from the entry that holds its claim, while it has no result
# and no worker holds its lease (the fence against a second submission of its id, and
# against two schedulers holding one entry); any other is stale.
# A cancel flag counts only if it hashes to the request's cancel hash (or the request has
# none): another producer's flag for the id is ignored.
# KEYS: job stream, stats hash, then per request its owner, cancel, claim and result keys and
#       the request stream its entry is on
# ARGV: job payload, scheduler group, lease ttl seconds, then per request its owner token,
#       entry id, queued lease token and cancel hash ('' = none)
# Returns {1, job stream id} dispatched, or {0, {positions (1-based) of cancelled requests},
# {positions of stale requests}}: nothing written.
DISPATCH = Script("""
local n = (#KEYS - 2) / 5
local cancelled, stale = {}, {}
for i = 1, n do
  local k, a = 5 * i - 2, 4 * i
  local owner = redis.call('GET', KEYS[k])
  local flag = redis.call('GET', KEYS[k + 1])
  if redis.call('GET', KEYS[k + 2]) ~= ARGV[a + 1] or redis.call('EXISTS', KEYS[k + 3]) == 1
     or (owner and owner ~= ARGV[a + 2]) then
    stale[#stale + 1] = i
  elseif flag and (ARGV[a + 3] == '' or redis.sha1hex(flag) == ARGV[a + 3]) then
    cancelled[#cancelled + 1] = i
  end
end
if #cancelled > 0 or #stale > 0 then return {0, cancelled, stale} end
local job_id = redis.call('XADD', KEYS[1], '*', 'job', ARGV[1])
for i = 1, n do
  local k, a = 5 * i - 2, 4 * i
  redis.call('SET', KEYS[k], ARGV[a], 'EX', tonumber(ARGV[3]))
  redis.call('XACK', KEYS[k + 4], ARGV[2], ARGV[a + 1])
  redis.call('XDEL', KEYS[k + 4], ARGV[a + 1])
end
redis.call('HINCRBY', KEYS[2], 'jobs', 1)
redis.call('HINCRBY', KEYS[2], 'requests_dispatched', n)
redis.call('HINCRBY', KEYS[2], 'job_size:' .. n, 1)
return {1, job_id}
""")

# Answer an entry a tenant queued beyond max_queue (a raw XADD skips SUBMIT's bound) with
# Overloaded and drop it, while it is still undelivered (on the stream and in no
# scheduler's pending list) and its id unclaimed; an entry that holds its id's claim (a
# hand-back) is left to run. Its tenant's stream so stays near max_queue whatever the tenant
# XADDs, and the caller hears why.
# KEYS: request stream, claim key, result key
# ARGV: scheduler group, entry id, channel, final event payload ('' = drop unanswered),
#       result ttl seconds, claim ttl seconds
# Returns 1 answered, 0 dropped unanswered, -1 left alone.
OVERFLOW = Script("""
if #redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2]) == 0 then return -1 end
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) > 0 then return -1 end
local claimed = redis.call('GET', KEYS[2])
if claimed == ARGV[2] then return -1 end
local answered = 0
if ARGV[4] ~= '' and not claimed and redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('SET', KEYS[2], ARGV[2], 'EX', tonumber(ARGV[6]))
  redis.call('SET', KEYS[3], ARGV[4], 'EX', tonumber(ARGV[5]))
  redis.call('PUBLISH', ARGV[3], ARGV[4])
  answered = 1
end
redis.call('XDEL', KEYS[1], ARGV[2])
return answered
""")

# Undo an entry id from the far future on the request stream. Producers hold XADD on it
# and Redis cannot restrict XADD's arguments: an explicit id of
# 18446744073709551615-18446744073709551615 leaves the stream's last id at the largest
# there is, and every later `XADD *` (SUBMIT, a hand-back) fails until it is set back.
# Once no entry beyond `now + margin` remains (the scheduler read and deleted it): a stream
# with no entry and nothing pending is recreated with its groups at 0 (lossless; the only
# way on Redis 7.2 and Valkey, whose XSETID refuses to go below the largest deleted id);
# otherwise the last id goes back to now (or the newest entry) where XSETID allows it
# (Redis 7.0), and so does each group's position where it was past that: every entry left
# was delivered already, since a group delivers in stream order, so none is skipped.
# KEYS: request stream
# ARGV: margin ms
# Returns 0 nothing to do, 1 repaired, -1 a far-future entry is still unread, -2 entries
# still held and this server's XSETID refuses: tried again at the next call.
REPAIR_STREAM_ID = Script("""
local function ms(id) return tonumber(string.match(id, '^(%d+)')) end
local function field(reply, name)
  for i = 1, #reply, 2 do if reply[i] == name then return reply[i + 1] end end
end
local now = redis.call('TIME')
local now_ms = now[1] .. string.format('%03d', math.floor(tonumber(now[2]) / 1000))
local limit = tonumber(now_ms) + tonumber(ARGV[1])
if ms(field(redis.call('XINFO', 'STREAM', KEYS[1]), 'last-generated-id')) <= limit then return 0 end
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if top and ms(top[1]) > limit then return -1 end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
local pending = 0
for _, group in ipairs(groups) do pending = pending + field(group, 'pending') end
if not top and pending == 0 then
  redis.call('DEL', KEYS[1])
  for _, group in ipairs(groups) do
    redis.call('XGROUP', 'CREATE', KEYS[1], field(group, 'name'), '0', 'MKSTREAM')
  end
  return 1
end
local to = now_ms .. '-0'
if top and ms(top[1]) >= tonumber(now_ms) then to = top[1] end
local set = redis.pcall('XSETID', KEYS[1], to)
if type(set) == 'table' and set.err then return -2 end
for _, group in ipairs(groups) do
  if ms(field(group, 'last-delivered-id')) > ms(to) then
    redis.call('XGROUP', 'SETID', KEYS[1], field(group, 'name'), to)
  end
end
return 1
""")
# Entry ids this far ahead of Redis's clock are an attack or a broken clock (an hour).
FUTURE_ID_MARGIN_MS = 3_600_000

# Dead letters keep the most recent entries only, each with at most the first
# DEAD_LETTER_DATA_BYTES of its payload (its full size in data_bytes) and a
# reason of at most DEAD_LETTER_REASON_CHARS, so no input can grow Redis through
# them: ~10,000 x ~1.6 KiB at most (docs/reliability.md). Operators read them
# with `batchd status` or XRANGE.
DEAD_LETTER_MAXLEN = 10_000
DEAD_LETTER_DATA_BYTES = 1024
DEAD_LETTER_REASON_CHARS = 512

# How long a request id stays claimed by its stream entry: a second submission of
# the id within this time never runs (the window SUBMIT's accepted marker had).
CLAIM_TTL_S = 24 * 3600


def finalize_call(keys: Keys, request_id: str, final_payload: bytes, result_ttl_s: int,
                  owner_token: str = "", ack: tuple[str, str, str] | None = None,
                  cue: bytes = b"", cue_read_window_s: int = 0) -> ScriptCall:
    """FINALIZE for one request's final event; ack = (job stream, group, entry id) when this
    result completes that job; cue: a smaller final event to publish instead (b"": the same),
    and cue_read_window_s how long the result is kept once a subscriber heard the cue (0, or
    not under the TTL: the TTL)."""
    window = cue_read_window_s if cue and 0 < cue_read_window_s < result_ttl_s else 0
    call_keys = [keys.result(request_id), keys.owner(request_id)]
    args = [keys.channel(request_id), final_payload, result_ttl_s, owner_token, cue, window]
    if ack is not None:
        stream, group, entry_id = ack
        call_keys.append(stream)
        args += [group, entry_id]
    return published(FINALIZE, keys), call_keys, args


def publish_step_call(keys: Keys, owner_token: str, events: Sequence[tuple[str, bytes]]) -> ScriptCall:
    """PUBLISH_STEP for the (request id, token event payload) pairs of one lease token."""
    args: list = [owner_token]
    for request_id, payload in events:
        args += [keys.channel(request_id), payload]
    return published(PUBLISH_STEP, keys), [keys.owner(request_id) for request_id, _payload in events], args


def dispatch_call(keys: Keys, worker_id: str, job_payload: bytes, group: str, lease_ttl_s: int,
                  requests: Sequence[tuple[Request, str, str]]) -> ScriptCall:
    """DISPATCH of one job to worker_id; requests are its (request, request stream, entry id)
    triples, all of one shard (the job goes on the worker's stream of that shard)."""
    shard = keys.shard_of(requests[0][0].id)
    call_keys = [keys.jobs(worker_id, shard), keys.stats_in(shard)]
    args: list = [job_payload, group, lease_ttl_s]
    for request, stream, entry_id in requests:
        call_keys += [keys.owner(request.id), keys.cancelled(request.id), keys.accepted(request.id),
                      keys.result(request.id), stream]
        args += [owner_token(worker_id, request.attempt), entry_id, requeued_token(request.attempt),
                 request.cancel_hash or ""]
    return DISPATCH, call_keys, args


def claim_call(keys: Keys, lease_ttl_s: int, entries: Sequence[tuple[str, str]]) -> ScriptCall:
    """CLAIM of the (request id, entry id) pairs one read returned, in stream order."""
    call_keys: list = []
    for request_id, _entry in entries:
        call_keys += [keys.accepted(request_id), keys.owner(request_id), keys.result(request_id)]
    return CLAIM, call_keys, [CLAIM_TTL_S, lease_ttl_s, *[entry for _id, entry in entries]]


def answer_call(keys: Keys, request_id: str, entry_id: str, attempt: int, final_payload: bytes,
                result_ttl_s: int) -> ScriptCall:
    """ANSWER: a held request's final event, fenced by its claim and lease."""
    return (published(ANSWER, keys), [keys.result(request_id), keys.owner(request_id), keys.accepted(request_id)],
            [keys.channel(request_id), final_payload, result_ttl_s, entry_id, requeued_token(attempt)])


def reject_call(keys: Keys, stream: str, group: str, entry_id: str, request_id: str | None, error_type: str,
                message: str, data: bytes | None, final_payload: bytes | None, result_ttl_s: int,
                named_id: str = "") -> ScriptCall:
    """REJECT of an unreadable entry of a request stream; request_id and final_payload only when
    the entry names a valid id of that stream's tenant (named_id: the id it names otherwise,
    kept in the dead letter only). A valid id is one of the stream's shard (see entry_problem)."""
    shard = keys.shard_of_key(stream) or 0
    call_keys = [stream, keys.dead_letters_in(shard), keys.stats_in(shard)]
    args: list = [group, entry_id, DEAD_LETTER_MAXLEN, DEAD_LETTER_DATA_BYTES, request_id or named_id, error_type,
                  message[:DEAD_LETTER_REASON_CHARS], data or b""]
    if request_id and final_payload is not None:
        call_keys += [keys.accepted(request_id), keys.result(request_id)]
        args += [keys.channel(request_id), final_payload, result_ttl_s, CLAIM_TTL_S]
    return published(REJECT, keys), call_keys, args


def overflow_call(keys: Keys, stream: str, group: str, entry_id: str, request_id: str | None,
                  final_payload: bytes | None, result_ttl_s: int) -> ScriptCall:
    """OVERFLOW of one entry beyond its tenant's max_queue; request_id and final_payload only
    when the entry names a valid id of that tenant (else it is dropped unanswered)."""
    answer = request_id is not None and final_payload is not None
    rid = request_id if answer else f"entry-{entry_id}"
    shard = keys.shard_of_key(stream) or 0  # an unanswered entry's keys are in its stream's shard
    return (published(OVERFLOW, keys), [stream, keys.accepted(rid, shard), keys.result(rid, shard)],
            [group, entry_id, keys.channel(rid), final_payload if answer else b"", result_ttl_s, CLAIM_TTL_S])


# Each script that publishes an event, as written (PUBLISH) and as a fleet on shard channels
# runs it (SPUBLISH: the channel carries the request's hash tag, so it is in the slot of the
# script's keys, as a cluster requires).
_SHARD_CHANNEL_TWINS = {script: Script(script.source.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',"))
                        for script in (FINALIZE, PUBLISH_STEP, HAND_BACK, ANSWER, REJECT, OVERFLOW)}


def published(script: Script, keys: Keys) -> Script:
    """The script that publishes the way keys' fleet does (Keys.shard_channels)."""
    return _SHARD_CHANNEL_TWINS[script] if keys.shard_channels else script


def owner_token(worker_id: str, attempt: int) -> str:
    """The lease value that lets one worker attempt publish for a request."""
    return f"{worker_id}/{attempt}"


def requeued_token(attempt: int) -> str:
    """The lease value of a request waiting to be dispatched again: fences every worker."""
    return f"queued/{attempt}"
