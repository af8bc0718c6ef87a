"""What Client and AsyncClient share for scoring calls: building the request, reading the answer.

Scoring requests decode nothing: a worker runs prompt (and continuation)
through its model once and returns log-probabilities (docs/scoring.md).
"""

from __future__ import annotations

import struct
import sys
from array import array
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Sequence

from .core import build_request
from .protocol import Request, Result

if TYPE_CHECKING:  # numpy is the caller's, on request: a producer needs none
    import numpy

@dataclass(frozen=True)
class NextTokenLogprobs:
    """The distribution of the token after a prompt.

    logprobs is the full vector (index = token id) when no top_k was asked
    for; otherwise top_token_ids / top_logprobs hold the k most likely, most
    likely first. The full vector arrives as bytes (result.logprobs) and is
    turned into a list only when logprobs is read: a caller that wants an
    array takes array() instead, which reads the bytes in place of 49,152
    Python floats.
    """

    top_token_ids: list[int] | None
    top_logprobs: list[float] | None
    result: Result

    @cached_property
    def logprobs(self) -> list[float] | None:
        raw = self.result.logprobs
        if raw is None:
            return None
        if self.result.logprobs_dtype == "float16":  # array has no half floats; struct does
            return list(struct.unpack(f"<{len(raw) // 2}e", raw))
        floats = array("f")
        floats.frombytes(raw)
        if sys.byteorder != "little":  # the wire is little-endian float32
            floats.byteswap()
        return floats.tolist()

    def array(self) -> numpy.ndarray | None:
        """The full vector as a writable float32 numpy array (numpy is imported here, on first use)."""
        return None if self.result.logprobs is None else logprobs_array(self.result)


@dataclass(frozen=True)
class NextTokenLogprobsRows:
    """The distributions after each row of a many-prefix request (rows=), in the order the rows
    were given: one full vector per row (array()), or with top_k each row's k most likely
    tokens, most likely first (top_token_ids / top_logprobs, one list per row)."""

    rows: int
    result: Result

    def array(self) -> numpy.ndarray:
        """A writable float32 array of shape (rows, vocabulary). Raises ValueError for a top_k request."""
        if self.result.logprobs is None:
            raise ValueError("this answer holds each row's top_k tokens (top_token_ids / top_logprobs), "
                             "not full vectors: ask without top_k for those")
        return logprobs_array(self.result).reshape(self.rows, -1)

    @cached_property
    def top_token_ids(self) -> list[list[int]] | None:
        return _per_row(self.result.top_token_ids, self.rows)

    @cached_property
    def top_logprobs(self) -> list[list[float]] | None:
        return _per_row(self.result.top_logprobs, self.rows)


def _per_row(flat: list | None, rows: int) -> list[list] | None:
    """The wire's rows x k entries, one row after another, as one list per row."""
    if flat is None:
        return None
    k = len(flat) // rows
    return [flat[row * k:(row + 1) * k] for row in range(rows)]


@dataclass(frozen=True)
class Pin:
    """A prefix the workers keep resident (Client.pin): name it as prefix_pin= instead of
    sending its tokens. It lasts ttl_s from its pin or last renewal (renew_pin), or until unpin."""

    handle: str
    token_count: int
    ttl_s: int
    result: Result


@dataclass(frozen=True)
class Score:
    """Log-probabilities of a continuation after a prompt: one per token, and their sum."""

    total_logprob: float
    token_logprobs: list[float]
    result: Result


def next_token_request(request_id: str, prompt_token_ids: Sequence[int], top_k: int | None, *, producer: str,
                       timeout: float | None, model: str | None = None, logprobs_dtype: str = "float32",
                       prefix_pin: str | None = None, rows: Sequence[Sequence[int]] | None = None,
                       **secrets: str | None) -> tuple[Request, bytes]:
    """prefix_pin: the prompt starts with that pin's tokens, prompt_token_ids (may be empty) follow.
    rows: one question per row, after the prompt. secrets: the request's cancel_hash and event_key
    (ClientCore._secrets)."""
    prompt = list(prompt_token_ids) or (None if prefix_pin is not None or rows is not None else [])
    return build_request(request_id, None, None, prompt, producer=producer, timeout=timeout,
                         task="next_token_logprobs", top_logprobs=top_k, model=model,
                         logprobs_dtype=logprobs_dtype, prefix_pin=prefix_pin, rows=rows, **_NO_DECODING,
                         **secrets)


def pin_request(request_id: str, token_ids: Sequence[int] | None, *, producer: str, timeout: float | None,
                model: str | None, ttl_s: int, handle: str | None = None,
                **secrets: str | None) -> tuple[Request, bytes]:
    """Pin token_ids, or renew handle's pin."""
    return build_request(request_id, None, None, token_ids, producer=producer, timeout=timeout, task="pin",
                         model=model, prefix_pin=handle, pin_ttl_s=ttl_s, **_NO_DECODING, **secrets)


def unpin_request(request_id: str, handle: str, *, producer: str, timeout: float | None,
                  model: str | None, **secrets: str | None) -> tuple[Request, bytes]:
    return build_request(request_id, None, None, None, producer=producer, timeout=timeout, task="unpin",
                         model=model, prefix_pin=handle, **_NO_DECODING, **secrets)


def pin(result: Result, ttl_s: int) -> Pin:
    return Pin(result.pin_handle, result.usage.prompt_tokens, ttl_s, result)


def score_request(request_id: str, prompt: str | None, continuation: str | None,
                  prompt_token_ids: Sequence[int] | None, continuation_token_ids: Sequence[int] | None, *,
                  producer: str, timeout: float | None, model: str | None = None,
                  messages: Sequence[dict] | None = None, **secrets: str | None) -> tuple[Request, bytes]:
    return build_request(request_id, prompt, messages, prompt_token_ids, producer=producer, timeout=timeout,
                         task="score", continuation=continuation, continuation_token_ids=continuation_token_ids,
                         model=model, **_NO_DECODING, **secrets)


# A scoring request's sampling params stay at their defaults (the protocol checks it).
_NO_DECODING = dict(max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=None,
                    stop_token_ids=None, ignore_eos=False, priority=0, deadline=None)


def next_token_logprobs(result: Result) -> NextTokenLogprobs:
    return NextTokenLogprobs(result.top_token_ids, result.top_logprobs, result)


# numpy's names of the wire encodings of a full vector (little-endian).
_NUMPY_DTYPES = {"float32": "<f4", "float16": "<f2"}


def logprobs_array(result: Result, out: numpy.ndarray | None = None) -> numpy.ndarray:
    """A result's full vector read straight from its bytes into a float32 array: into out (a row
    of a caller's batch, one copy) or a new writable array (one copy too)."""
    import numpy

    wire = numpy.frombuffer(result.logprobs, dtype=_NUMPY_DTYPES[result.logprobs_dtype])  # a read-only view
    if out is None:
        return wire.astype(numpy.float32)  # astype copies: the array is writable
    out[...] = wire.reshape(out.shape)
    return out


def score(result: Result) -> Score:
    return Score(result.total_logprob, result.token_logprobs, result)
