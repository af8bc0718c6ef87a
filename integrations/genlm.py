"""genlm-backend's `AsyncLM` answered by a batchd fleet, for genlm-control and LLaMPPL.

    from batchd.integrations.genlm import BatchdLM, ScoredPromptedLLM
    
    llm = PromptedLLM(BatchdLM("redis://localhost:6379"))        # genlm-control, unchanged
    llm = ScoredPromptedLLM(BatchdLM("redis://localhost:6379"))  # the same, with one `score`
                                                                 # request per sequence probability

The `next_token_logprobs` calls of one event-loop iteration (an SMC step's
particles) go out as one batchd request with a row per prefix; `cache_kv` pins a
prompt, which those requests then name by its handle instead of sending it. The
worker runs every row in its engine steps, reading the prompt's blocks from its
cache. Vectors are read straight from the result's bytes into tensors (no Python
floats). docs/integrations.md has the measurements.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import numpy
import torch
from genlm.backend.llm.base import UNKNOWN_ADAPTER, AsyncLM

from batchd.client import scoring
from batchd.client.aio import AsyncClient
from batchd.client.errors import BatchdError, PinLimitReached, UnknownPrefix
from batchd.client.protocol import MAX_ROWS

from .bridge import ClientThread
from .hf_tokenizer import hf_tokenizer

log = logging.getLogger("batchd.integrations")

# cache_kv's pins last this long unless the backend is closed or clear_kv_cache is called first.
PIN_TTL_S = 600


class BatchdLM(AsyncLM):
    """An AsyncLM whose log-probabilities come from batchd workers.

    url: the fleet's Redis (None: $BATCHD_REDIS_URL or localhost); model: the served
    model to ask (None: the fleet's only one); tokenizer: a Hugging Face tokenizer,
    which must be the one the workers serve (else TokenizerMismatch); None: the
    workers' own, read from Redis. timeout: seconds a call may wait. logprobs_dtype
    "float16" halves each vector on the wire and in Redis, at float16 precision (it can
    change which token a sampler draws: docs/integrations.md). top_k: the workers send each
    vector's k most likely tokens and the caller's vector gets the rest of the mass spread
    evenly over the other tokens (k pairs on the wire and in Redis instead of the whole
    vocabulary; exact for the top k, an approximation for the others). Other keyword
    arguments go to AsyncClient (prefix, producer, ...).
    """

    def __init__(self, url: str | None = None, *, tokenizer: Any = None, model: str | None = None,
                 timeout: float | None = None, logprobs_dtype: str = "float32", top_k: int | None = None,
                 **client_options: Any):
        if top_k is not None and (top_k < 1 or logprobs_dtype != "float32"):
            raise ValueError("top_k is a positive number of tokens, and takes no logprobs_dtype (its values are float32)")
        self._bridge = ClientThread(url, **client_options)
        self._coalescers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._pins: dict[tuple[int, ...], _PinnedPrompt] = {}  # cache_kv's, by their tokens
        self.model_name = model
        self.timeout = timeout
        self.logprobs_dtype = logprobs_dtype
        self.top_k = top_k
        client = self._bridge.client
        try:
            if tokenizer is None:
                tokenizer = hf_tokenizer(self._bridge.call(lambda: client.served_tokenizer(model)))
            else:
                self._bridge.call(lambda: client.check_tokenizer(tokenizer, model))
        except BaseException:
            self._bridge.close()
            raise
        super().__init__(tokenizer)

    async def next_token_logprobs(self, token_ids: Sequence[int], lora_name: str | None = None) -> torch.Tensor:
        """Calls made in one iteration of the caller's event loop (an SMC step's particles,
        gathered) go out as one request (_Coalescer)."""
        _no_adapters(lora_name)
        loop = asyncio.get_running_loop()
        coalescer = self._coalescers.get(loop)
        if coalescer is None:
            coalescer = self._coalescers[loop] = _Coalescer(self._ask_all)
        return await coalescer.ask(list(token_ids))

    def next_token_logprobs_sync(self, token_ids: Sequence[int], lora_name: str | None = None) -> torch.Tensor:
        _no_adapters(lora_name)
        rows = self._bridge.call(lambda: self._ask_rows(self._bridge.client, [list(token_ids)]))
        return torch.from_numpy(rows[0])

    async def batch_next_token_logprobs(self, token_ids_list: Sequence[Sequence[int]],
                                        lora_name: str | None = None) -> torch.Tensor:
        _no_adapters(lora_name)
        return torch.from_numpy(await self._ask_all([list(ids) for ids in token_ids_list]))

    def batch_next_token_logprobs_sync(self, token_ids_list: Sequence[Sequence[int]],
                                       lora_name: str | None = None) -> torch.Tensor:
        async def ask_all() -> torch.Tensor:
            return await self.batch_next_token_logprobs(token_ids_list, lora_name)

        return asyncio.run(ask_all())

    async def continuation_logprobs(self, prompt_ids: Sequence[int], continuation_ids: Sequence[int]) -> list[float]:
        """The log-probability of each continuation token after the prompt and the ones before it:
        one `score` request where next-token vectors would take one request per token."""
        async def ask(client: AsyncClient) -> list[float]:
            answer = await client.score(prompt_token_ids=list(prompt_ids), continuation_token_ids=list(continuation_ids),
                                        timeout=self.timeout, model=self.model_name)
            return answer.token_logprobs

        return await self._bridge.run(ask)

    # -- pinned prefixes -------------------------------------------------------------

    def cache_kv(self, prompt_tokens: Sequence[int], ttl_s: int = PIN_TTL_S) -> None:
        """Pin this prompt in the workers' KV caches (Client.pin); calls that start with it send
        only what follows it. A worker at its pin limit leaves it unpinned (logged): the calls
        then send it in full, as without a pin."""
        tokens = tuple(prompt_tokens)
        if tokens in self._pins:  # pinned already (an example run twice on one backend)
            return
        try:
            pin = self._bridge.call(lambda: self._bridge.client.pin(tokens, ttl_s, model=self.model_name,
                                                                    timeout=self.timeout))
        except PinLimitReached as exc:
            log.warning("prompt of %d tokens not pinned: %s", len(tokens), exc.message)
            return
        self._pins[tokens] = _PinnedPrompt(pin.handle, ttl_s, time.monotonic() + ttl_s / 2)

    def clear_kv_cache(self) -> None:
        """Unpin every prompt cache_kv pinned."""
        pins, self._pins = self._pins, {}
        for pin in pins.values():
            self._bridge.call(lambda: self._bridge.client.unpin(pin.handle, model=self.model_name,
                                                                timeout=self.timeout))

    # -- asking ----------------------------------------------------------------------

    async def _ask_all(self, token_ids_list: list[list[int]]) -> numpy.ndarray:
        return await self._bridge.run(lambda client: self._ask_rows(client, token_ids_list))

    async def _ask_rows(self, client: AsyncClient, token_ids_list: list[list[int]]) -> numpy.ndarray:
        """Every prefix's next-token vector, as few requests as MAX_ROWS allows: the longest
        pinned prompt they all start with named by its handle, what they share after it sent
        once, and each row's own tokens."""
        pinned, handle = self._pin_for(token_ids_list)
        rest = [ids[len(pinned):] for ids in token_ids_list]
        shared = _common_prefix(rest)
        if handle is None and not shared:  # no common start at all: one request each
            return numpy.concatenate([await self._ask_rows(client, [ids]) for ids in token_ids_list])
        rows = [ids[len(shared):] for ids in rest]
        try:
            if handle is not None:
                await self._renew_if_due(client, self._pins[pinned])
            answers = await asyncio.gather(*(
                client.next_token_logprobs_rows(rows[at:at + MAX_ROWS], shared, prefix_pin=handle,
                                                top_k=self.top_k, timeout=self.timeout, model=self.model_name,
                                                logprobs_dtype=self.logprobs_dtype)
                for at in range(0, len(rows), MAX_ROWS)))
        except UnknownPrefix:  # the pin expired or was unpinned: send the prompt itself from now on
            if handle is None:
                raise
            self._pins.pop(pinned, None)
            return await self._ask_rows(client, token_ids_list)
        vectors = numpy.empty((len(rows), len(self.byte_vocab)), dtype=numpy.float32)
        for at, answer in zip(range(0, len(rows), MAX_ROWS), answers):
            if self.top_k is None:
                scoring.logprobs_array(answer.result, out=vectors[at:at + answer.rows])
            else:
                _spread_rest(answer, vectors[at:at + answer.rows])
        return vectors

    async def _renew_if_due(self, client: AsyncClient, pin: _PinnedPrompt) -> None:
        """A pin in use is renewed once half its TTL is past, so it lasts while calls use it."""
        now = time.monotonic()
        if now < pin.renew_at:
            return
        pin.renew_at = now + pin.ttl_s / 2  # before the await: concurrent calls renew once
        await client.renew_pin(pin.handle, pin.ttl_s, model=self.model_name, timeout=self.timeout)

    def _pin_for(self, token_ids_list: list[list[int]]) -> tuple[tuple[int, ...], str | None]:
        """The longest pinned prompt every one of these prefixes starts with, and its handle."""
        best: tuple[tuple[int, ...], str | None] = ((), None)
        for tokens, pin in self._pins.items():
            if len(tokens) > len(best[0]) and all(tuple(ids[:len(tokens)]) == tokens for ids in token_ids_list):
                best = (tokens, pin.handle)
        return best

    def clear_cache(self) -> None:
        """Nothing to clear here: the worker's paged KV cache keeps or evicts prefixes on its own."""

    def close(self) -> None:
        """Unpin what cache_kv pinned and close the connection to batchd."""
        try:
            self.clear_kv_cache()
        except BatchdError as exc:  # the pins expire on their own
            log.warning("could not unpin on close: %s", exc)
        self._bridge.close()


def __getattr__(name: str) -> Any:
    # ScoredPromptedLLM needs genlm-control; LLaMPPL users have only genlm-backend.
    if name == "ScoredPromptedLLM":
        from .prompted import ScoredPromptedLLM

        return ScoredPromptedLLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class _PinnedPrompt:
    handle: str
    ttl_s: int
    renew_at: float  # monotonic


class _Coalescer:
    """next_token_logprobs calls made in one iteration of an event loop, asked as one batch.

    The SMC libraries call once per particle from tasks that one gather starts together, so
    each task reaches its call before the flush that call_soon queues behind them (AsyncClient
    coalesces submits the same way)."""

    def __init__(self, ask_all: Callable[[list[list[int]]], Awaitable[numpy.ndarray]]):
        self._ask_all = ask_all
        self._pending: list[tuple[list[int], asyncio.Future]] = []

    async def ask(self, token_ids: list[int]) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((token_ids, future))
        if len(self._pending) == 1:
            loop.call_soon(lambda: asyncio.ensure_future(self._flush()))
        return await future

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        try:
            vectors = await self._ask_all([ids for ids, _ in batch])
        except BaseException as exc:  # every caller of the batch gets the failure
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for row, (_, future) in enumerate(batch):
            if not future.done():
                future.set_result(torch.from_numpy(vectors[row]))


# The least mass left to the tokens outside a top-k answer: its values' sum can round to 1 or
# over, and a token a constraint allows must keep a finite log-probability.
LEAST_REST = 1e-12


def _spread_rest(answer: scoring.NextTokenLogprobsRows, out: numpy.ndarray) -> None:
    """Each row's vector from its top-k pairs: those k exact, the mass they leave spread evenly
    over the other tokens."""
    ids = numpy.asarray(answer.top_token_ids, dtype=numpy.int64)
    values = numpy.asarray(answer.top_logprobs, dtype=numpy.float64)
    rest = numpy.maximum(1.0 - numpy.exp(values).sum(axis=1), LEAST_REST)
    others = max(out.shape[1] - ids.shape[1], 1)
    out[:] = numpy.log(rest / others)[:, None]
    numpy.put_along_axis(out, ids, values.astype(numpy.float32), axis=1)


def _common_prefix(token_ids_list: list[list[int]]) -> list[int]:
    first = token_ids_list[0]
    length = min(len(ids) for ids in token_ids_list)
    for ids in token_ids_list[1:]:
        at = 0
        while at < length and ids[at] == first[at]:
            at += 1
        length = at
    return first[:length]


def _no_adapters(lora_name: str | None) -> None:
    if lora_name is not None:
        raise ValueError(UNKNOWN_ADAPTER.format(lora_name) + " (batchd serves no LoRA adapters)")
