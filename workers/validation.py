"""The rules a request must meet to run on an engine, each written once.

Every path that admits work checks through these: the hf tokenizer path, the
scorer, the echo engine and the hf engine. (The wire's own rules, types, sizes
and the request id pattern, live in batchd.client.protocol.)
"""

from __future__ import annotations

from typing import Iterable

from batchd.client.errors import InvalidRequest, RequestTooLarge
from batchd.client.protocol import SamplingParams


def check_vocabulary(token_ids: Iterable[int], vocab_size: int, request_id: str, what: str = "prompt",
                     vocabulary: str = "the model's vocabulary") -> None:
    """Every token id names a token of the vocabulary (0 <= id < vocab_size)."""
    bad = next((token for token in token_ids if not 0 <= token < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"{what} token id {bad} is outside {vocabulary} (size {vocab_size})", request_id)


def check_context(request_id: str, limit: int, prompt_tokens: int, max_new_tokens: int | None = None,
                  continuation_tokens: int = 0) -> None:
    """What a request holds at its longest fits `limit` tokens: its prompt and every token it
    may generate, or for a scoring request (max_new_tokens None) prompt and continuation."""
    needed = prompt_tokens + (max_new_tokens or 0) + continuation_tokens
    if needed <= limit:
        return
    if max_new_tokens is None:
        held, advice = f"prompt and continuation hold {needed} tokens", "Shorten them"
    elif max_new_tokens:
        held = f"prompt ({prompt_tokens} tokens) plus max_new_tokens ({max_new_tokens}) is {needed} tokens"
        advice = "Shorten the prompt or lower max_new_tokens"
    else:
        held, advice = f"prompt holds {needed} tokens", "Shorten it"
    raise RequestTooLarge(f"{held}; this worker takes at most {limit} tokens per request. {advice}", request_id)


def check_contrast(params: SamplingParams, request_id: str, has_pair: bool, serves: str) -> None:
    """contrast_alpha needs a model pair; `serves` says what this worker has instead."""
    if params.contrast_alpha is not None and not has_pair:
        raise InvalidRequest("contrast_alpha needs a worker that serves a model pair "
                             f"(batchd worker --model AFTER --contrast-model BEFORE); {serves}", request_id)
