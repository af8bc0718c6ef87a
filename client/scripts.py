"""The producer's Redis function, and the one way batchd runs any Lua script.

A script is called by its SHA1 (EVALSHA), computed here, so no call waits for a
SCRIPT LOAD first. A server that does not know the script (it restarted, or its
scripts were flushed) answers NOSCRIPT; the call is then loaded and run again.
The daemons' scripts go this way (batchd.daemon.scripts); the producer's SUBMIT
is a Redis 7 function instead (Function below), so producers need no right to
load or run scripts. Scripts touch only the keys passed in KEYS, so they also
run on Redis Cluster once keys share a hash tag.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

from redis.exceptions import NoPermissionError, NoScriptError, ResponseError

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


# One script call: the script (or function), its KEYS and its ARGV.
ScriptCall = tuple[Any, Sequence, Sequence]


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
        if needs_loading(outcomes[index]):
            outcomes[index] = script.run(client, keys, args)
    return outcomes, replies[len(calls):]


def raise_any_error(outcomes: Sequence) -> None:
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome


class Function:
    """One function of a Redis 7 function library, called with FCALL.

    Functions are loaded into the server once (FUNCTION LOAD, by a scheduler at
    start, or by anyone allowed to) and kept in its RDB/AOF, so a caller needs
    only FCALL: producers are not allowed to load or run scripts of their own
    (docs/security.md). A server that lost its functions (a restart without
    persistence) answers "Function not found"; run() then loads the library if
    this user may, and calls again.
    """

    def __init__(self, library: str, name: str):
        self.library = library
        self.name = name

    def queue(self, pipe: Any, keys: Sequence, args: Sequence) -> None:
        pipe.fcall(self.name, len(keys), *keys, *args)

    def run(self, client: Any, keys: Sequence, args: Sequence) -> Any:
        try:
            return client.fcall(self.name, len(keys), *keys, *args)
        except ResponseError as exc:
            if not is_missing_function(exc):
                raise
            try:
                load_library(client, self.library)
            except NoPermissionError:
                raise exc from None  # a producer: wait for a scheduler to load it (retried)
            return client.fcall(self.name, len(keys), *keys, *args)

    async def run_async(self, client: Any, keys: Sequence, args: Sequence) -> Any:
        try:
            return await client.fcall(self.name, len(keys), *keys, *args)
        except ResponseError as exc:
            if not is_missing_function(exc):
                raise
            try:
                await client.function_load(self.library, replace=True)
            except NoPermissionError:
                raise exc from None
            return await client.fcall(self.name, len(keys), *keys, *args)


def is_missing_function(reply: Any) -> bool:
    return isinstance(reply, ResponseError) and "function not found" in str(reply).lower()


def needs_loading(reply: Any) -> bool:
    """The server does not know this script or function yet (it restarted, or was flushed)."""
    return isinstance(reply, NoScriptError) or is_missing_function(reply)


def load_library(client: Any, library: str) -> None:
    """Load (or replace with this version) a function library; needs FUNCTION LOAD permission."""
    client.function_load(library, replace=True)


# The producer's functions. The library's name carries the protocol version, so a
# newer batchd loads its own beside an older one's instead of replacing it mid-rollout.
# Enqueue unless the backlog is at max_queue (explicit overload instead of silent
# growth); a refusal is counted in Redis, where a scheduler takes the count for
# Prometheus (batchd:requests_overloaded_total). A config key of the wrong type
# reads as "no max_queue" rather than failing every submit: schedulers rewrite it
# within a second. Second submissions of an id are enqueued and dropped by the
# schedulers' CLAIM (daemon/scripts.py), which producers cannot write.
# KEYS: the tenant's request stream, config hash, the tenant's overload counter
# (max_queue bounds each tenant's stream on its own: Keys.requests_of, Keys.overloaded_of)
# ARGV: request id, payload
# Returns 1 enqueued, -1 overloaded.
LIBRARY = """#!lua name=batchd_v1
local function submit(keys, args)
  local max_queue = 0
  local setting = redis.pcall('HGET', keys[2], 'max_queue')
  if type(setting) == 'string' then max_queue = tonumber(setting) or 0 end
  if max_queue > 0 then
    local backlog = redis.pcall('XLEN', keys[1])
    if type(backlog) == 'number' and backlog >= max_queue then
      redis.call('INCR', keys[3])
      return -1
    end
  end
  redis.call('XADD', keys[1], '*', 'id', args[1], 'data', args[2])
  return 1
end
redis.register_function('batchd_v1_submit', submit)
"""
SUBMIT = Function(LIBRARY, "batchd_v1_submit")


def submit_call(keys: Keys, tenant: str, request_id: str, payload: bytes) -> ScriptCall:
    """SUBMIT of one request to a tenant's stream ("": the shared one) in the id's shard."""
    shard = keys.shard_of(request_id)
    return (SUBMIT, [keys.requests_of(tenant, shard), keys.config_in(shard), keys.overloaded_of(tenant, shard)],
            [request_id, payload])
