"""What Client and AsyncClient share for scoring calls: building the request, reading the answer.

Scoring requests decode nothing: a worker runs prompt (and continuation)
through its model once and returns log-probabilities (docs/scoring.md).
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass
from typing import Sequence

from .core import build_request
from .protocol import Request, Result


@dataclass(frozen=True)
class NextTokenLogprobs:
    """The distribution of the token after a prompt.

    logprobs is the full vector (index = token id) when no top_k was asked
    for; otherwise top_token_ids / top_logprobs hold the k most likely, most
    likely first.
    """

    logprobs: list[float] | None
    top_token_ids: list[int] | None
    top_logprobs: list[float] | None
    result: Result


@dataclass(frozen=True)
class Score:
    """Log-probabilities of a continuation after a prompt: one per token, and their sum."""

    total_logprob: float
    token_logprobs: list[float]
    result: Result


def next_token_request(request_id: str, prompt_token_ids: Sequence[int], top_k: int | None, *, producer: str,
                       timeout: float | None, model: str | None = None) -> tuple[Request, bytes]:
    return build_request(request_id, None, None, prompt_token_ids, producer=producer, timeout=timeout,
                         task="next_token_logprobs", top_logprobs=top_k, model=model, **_NO_DECODING)


def score_request(request_id: str, prompt: str | None, continuation: str | None,
                  prompt_token_ids: Sequence[int] | None, continuation_token_ids: Sequence[int] | None, *,
                  producer: str, timeout: float | None, model: str | None = None,
                  messages: Sequence[dict] | None = None) -> tuple[Request, bytes]:
    return build_request(request_id, prompt, messages, prompt_token_ids, producer=producer, timeout=timeout,
                         task="score", continuation=continuation, continuation_token_ids=continuation_token_ids,
                         model=model, **_NO_DECODING)


# A scoring request's sampling params stay at their defaults (the protocol checks it).
_NO_DECODING = dict(max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=None,
                    stop_token_ids=None, ignore_eos=False, priority=0, deadline=None)


def next_token_logprobs(result: Result) -> NextTokenLogprobs:
    vector = None
    if result.logprobs is not None:
        floats = array("f")
        floats.frombytes(result.logprobs)
        if sys.byteorder != "little":  # the wire is little-endian float32
            floats.byteswap()
        vector = floats.tolist()
    return NextTokenLogprobs(vector, result.top_token_ids, result.top_logprobs, result)


def score(result: Result) -> Score:
    return Score(result.total_logprob, result.token_logprobs, result)
