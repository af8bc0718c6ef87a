"""Pinned prefixes as one worker sees them: handles resolved to tokens, and the pins its engine keeps.

A pin is made by the worker a `pin` request reaches: it mints the handle (128 random bits,
returned only to the pinner), pins the prefix's blocks in its engine and writes the prefix
to the fleet's registry, `Keys.pin(handle)`, which expires with the pin. Any other worker
serving the model meets the handle first in a request that names it (`prefix_pin`): it
reads the registry entry once and pins the prefix in its own engine too. Every worker reads
the registry's remaining TTL of the pins it keeps once per check interval (one pipeline),
so a renewal keeps them and an unpin or expiry lets their blocks go within that interval.
Only workers write the registry (docs/security.md), so no producer can poison a prefix.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass

import msgspec
import redis

from batchd.client.errors import PinLimitReached, UnknownPrefix
from batchd.client.keys import Keys
from batchd.client.protocol import PinnedPrefix, Request, Result, Usage, encode

from .engine import Engine

log = logging.getLogger("batchd.worker.pins")

_pinned_decoder = msgspec.msgpack.Decoder(PinnedPrefix)


@dataclass
class KnownPin:
    token_ids: list[int]
    # False: this engine refused its blocks (its cap); the handle still resolves.
    resident: bool = True


class Pins:
    """The pins one worker knows: resolves handles, answers pin and unpin requests, and lets
    go of pins the registry no longer holds."""

    def __init__(self, keys: Keys, engine: Engine, served_models: list[str], check_interval_s: float = 1.0,
                 clock=time.monotonic):
        self._keys = keys
        self._engine = engine
        self._served_models = served_models
        self._check_interval_s = check_interval_s
        self._clock = clock
        self._known: dict[str, KnownPin] = {}
        self._next_check = 0.0

    @property
    def count(self) -> int:
        return len(self._known)

    def resolve(self, client: redis.Redis, request: Request) -> Request:
        """The request with its pinned prefix spelled out: prompt_token_ids = the pin's tokens and
        its own. Raises UnknownPrefix for a handle the registry does not hold (for this model)."""
        handle = request.prefix_pin
        if handle is None:
            return request
        pin = self._known.get(handle) or self._learn(client, handle, request)
        return msgspec.structs.replace(request, prefix_pin=None,
                                       prompt_token_ids=pin.token_ids + list(request.prompt_token_ids or ()))

    def answer(self, client: redis.Redis, request: Request, worker_id: str) -> Result:
        """The result of a pin (new or renewed) or unpin request; raises its typed error."""
        if request.task == "unpin":
            client.delete(self._keys.pin(request.prefix_pin))
            self._forget(request.prefix_pin)
            return self._result(request, worker_id, None, 0)
        ttl_ms = request.pin_ttl_s * 1000
        if request.prefix_pin is not None:  # a renewal
            if not client.pexpire(self._keys.pin(request.prefix_pin), ttl_ms):
                raise _unknown(request)
            return self._result(request, worker_id, request.prefix_pin, 0)
        token_ids = self._engine.tokenize(request)  # the vocabulary and context checks
        handle = secrets.token_hex(16)
        self._engine.pin(handle, token_ids)  # PinLimitReached: refused before anyone can name it
        model = request.model or self._served_models[0]
        client.set(self._keys.pin(handle), encode(PinnedPrefix(model, token_ids)), px=ttl_ms)
        self._known[handle] = KnownPin(token_ids)
        log.info("pinned %d tokens for %ds as %s… (%d pins here)", len(token_ids), request.pin_ttl_s, handle[:8],
                 len(self._known))
        return self._result(request, worker_id, handle, len(token_ids))

    def check(self, client: redis.Redis) -> None:
        """Once per interval: let go of the pins whose registry entry is gone (unpinned, expired)."""
        now = self._clock()
        if not self._known or now < self._next_check:
            return
        self._next_check = now + self._check_interval_s
        handles = list(self._known)
        with client.pipeline(transaction=False) as pipe:
            for handle in handles:
                pipe.exists(self._keys.pin(handle))
            alive = pipe.execute()
        for handle, exists in zip(handles, alive):
            if not exists:
                self._forget(handle)

    def _learn(self, client: redis.Redis, handle: str, request: Request) -> KnownPin:
        raw = client.get(self._keys.pin(handle))
        if raw is None:
            raise _unknown(request)
        record = _pinned_decoder.decode(raw)
        if record.model not in self._served_models:
            raise UnknownPrefix(f"pin {handle} is a prefix for model {record.model!r}; this request is for "
                                f"{request.model or self._served_models[0]!r}", request.id)
        pin = KnownPin(list(record.prompt_token_ids))
        try:
            self._engine.pin(handle, pin.token_ids)
        except PinLimitReached as exc:
            pin.resident = False  # served from its tokens, cached like any other prefix
            log.warning("pin %s… stays unpinned here: %s", handle[:8], exc.message)
        self._known[handle] = pin
        return pin

    def _forget(self, handle: str) -> None:
        if self._known.pop(handle, None) is not None:
            self._engine.unpin(handle)
            log.info("unpinned %s… (%d pins here)", handle[:8], len(self._known))

    @staticmethod
    def _result(request: Request, worker_id: str, handle: str | None, tokens: int) -> Result:
        return Result(request_id=request.id, finish_reason="stop", usage=Usage(prompt_tokens=tokens),
                      worker=worker_id, attempt=request.attempt, pin_handle=handle)


def _unknown(request: Request) -> UnknownPrefix:
    return UnknownPrefix(f"prefix pin {request.prefix_pin} is not pinned (it expired, was unpinned, or is another "
                         "fleet's): send the whole prefix, or pin it again", request.id)
