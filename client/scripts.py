"""The producer's Lua script, and the one way batchd runs any Lua script.

A script is called by its SHA1 (EVALSHA), computed here, so no call waits for a
SCRIPT LOAD first. A server that does not know the script (it restarted, or its
scripts were flushed) answers NOSCRIPT; the call is then loaded and run again.
Every script batchd has goes this way: SUBMIT below, the daemons' in
batchd.daemon.scripts. Scripts touch only the keys passed in KEYS, so they also
run on Redis Cluster once keys share a hash tag.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

from redis.exceptions import NoScriptError

from .keys import Keys


class Script:
    """A Lua script and its SHA1."""

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def queue(self, pipe: Any, keys: Sequence, args: Sequence) -> None:
        """Add one call to a pipeline (run_in_pipeline reruns it if the server answers NOSCRIPT)."""
        pipe.evalsha(self.sha, len(keys), *keys, *args)

    def run(self, client: Any, keys: Sequence, args: Sequence) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            client.script_load(self.source)
            return client.evalsha(self.sha, len(keys), *keys, *args)

    async def run_async(self, client: Any, keys: Sequence, args: Sequence) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


# One script call: the script, its KEYS and its ARGV.
ScriptCall = tuple[Script, Sequence, Sequence]


def run_in_pipeline(client: Any, calls: Sequence[ScriptCall],
                    then: Callable[[Any], None] | None = None) -> tuple[list, list]:
    """Script calls, then the commands `then` adds, in one round trip. Returns the
    scripts' outcomes (each call the server answered NOSCRIPT run again on its own)
    and the other commands' replies; errors come back as values, for the caller to judge."""
    with client.pipeline(transaction=False) as pipe:
        for script, keys, args in calls:
            script.queue(pipe, keys, args)
        if then is not None:
            then(pipe)
        replies = pipe.execute(raise_on_error=False)
    outcomes = replies[:len(calls)]
    for index, (script, keys, args) in enumerate(calls):
        if isinstance(outcomes[index], NoScriptError):
            outcomes[index] = script.run(client, keys, args)
    return outcomes, replies[len(calls):]


def raise_any_error(outcomes: Sequence) -> None:
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome


# Enqueue unless the id was already accepted (idempotent retries) or the
# backlog is at max_queue (explicit overload instead of silent growth).
# KEYS: requests stream, accepted marker, config hash
# ARGV: request id, payload, accepted ttl seconds
# Returns 1 enqueued, 0 duplicate, -1 overloaded.
SUBMIT = Script("""
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local max_queue = tonumber(redis.call('HGET', KEYS[3], 'max_queue') or '0')
if max_queue and max_queue > 0 and redis.call('XLEN', KEYS[1]) >= max_queue then return -1 end
redis.call('SET', KEYS[2], '1', 'EX', tonumber(ARGV[3]))
redis.call('XADD', KEYS[1], '*', 'id', ARGV[1], 'data', ARGV[2])
return 1
""")

# Seconds an id stays "accepted", so a retried submit is recognised as a duplicate.
ACCEPTED_TTL_S = 24 * 3600


def submit_call(keys: Keys, request_id: str, payload: bytes) -> ScriptCall:
    return SUBMIT, [keys.requests, keys.accepted(request_id), keys.config], [request_id, payload, ACCEPTED_TTL_S]
