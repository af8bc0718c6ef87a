"""One request's state inside the hf engine: its tokens, its slot, its text."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from batchd.client.protocol import FinishReason

from .detokenizer import Detokenizer
from ..engine import EngineRequest


class Status(enum.Enum):
    WAITING = "waiting"  # queued, no slot yet
    RUNNING = "running"  # owns a slot: prefilling, then decoding
    FINISHED = "finished"


@dataclass
class Sequence:
    request: EngineRequest
    detokenizer: Detokenizer
    stop_token_ids: frozenset[int]
    status: Status = Status.WAITING
    slot: int = -1
    # Tokens whose keys and values are in the slot's cache (or queued to be, on the GPU).
    num_cached: int = 0
    generated: list[int] = field(default_factory=list)
    # Tokens sampled on the device but not read yet (0 or 1; 2 for a moment while the
    # engine queues the next step), and the row of the newest in its step's tokens.
    in_flight: int = 0
    in_flight_row: int = -1
    # A scoring request (next_token_logprobs / score): its ScoreItem. Its tokens are the
    # prompt and the continuation; it prefills them, never decodes, and finishes with
    # the log-probabilities gathered from the rows it asked for (`score_parts`).
    score: Any = None
    score_parts: list = field(default_factory=list)
    finish_reason: FinishReason | None = None
    # Read several times per request per step: kept, not recounted.
    prompt_len: int = field(init=False)

    def __post_init__(self) -> None:
        self.prompt_len = len(self.request.prompt_token_ids)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prefilling(self) -> bool:
        return self.num_cached < self.prompt_len

    @property
    def needs_decode(self) -> bool:
        """Past its prompt, and the last token it may generate is not already on its way."""
        return (self.score is None and not self.prefilling
                and len(self.generated) + self.in_flight < self.request.params.max_new_tokens)

    def scored_offsets(self, start: int, length: int) -> tuple[int, ...]:
        """Offsets of a scoring chunk [start, start + length) whose logits are wanted: the
        position before each continuation token, or the prompt's last for the next token."""
        first = len(self.score.prompt_token_ids) - 1
        last = self.prompt_len - 2 if self.score.continuation_token_ids else first
        return tuple(p - start for p in range(max(first, start), min(last, start + length - 1) + 1))

    def next_chunk(self, budget: int) -> list[int]:
        """The tokens to feed next: up to budget prompt tokens, or the last sampled one
        (a placeholder while that one is still on the device)."""
        if self.prefilling:
            prompt = self.request.prompt_token_ids
            return prompt[self.num_cached:self.num_cached + budget]
        return [0] if self.in_flight else self.generated[-1:]
