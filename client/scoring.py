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
class Score:
    """Log-probabilities of a continuation after a prompt: one per token, and their sum."""

    total_logprob: float
    token_logprobs: list[float]
    result: Result


def next_token_request(request_id: str, prompt_token_ids: Sequence[int], top_k: int | None, *, producer: str,
                       timeout: float | None, model: str | None = None,
                       logprobs_dtype: str = "float32", **secrets: str | None) -> tuple[Request, bytes]:
    """secrets: the request's cancel_hash and event_key (ClientCore._secrets)."""
    return build_request(request_id, None, None, prompt_token_ids, producer=producer, timeout=timeout,
                         task="next_token_logprobs", top_logprobs=top_k, model=model,
                         logprobs_dtype=logprobs_dtype, **_NO_DECODING, **secrets)


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
    out[...] = wire
    return out


def score(result: Result) -> Score:
    return Score(result.total_logprob, result.token_logprobs, result)
