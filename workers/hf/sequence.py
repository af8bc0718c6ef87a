"""One request's state inside the hf engine: its tokens, its slot, its text."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from batchd.client.protocol import FinishReason

from ..detokenizer import Detokenizer
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
    # Tokens whose keys and values are in the slot's cache.
    num_cached: int = 0
    generated: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + len(self.generated)

    @property
    def prefilling(self) -> bool:
        return self.num_cached < self.prompt_len

    def next_chunk(self, budget: int) -> list[int]:
        """The tokens to feed next: up to budget prompt tokens, or the last sampled one."""
        if self.prefilling:
            prompt = self.request.prompt_token_ids
            return prompt[self.num_cached:self.num_cached + budget]
        return self.generated[-1:]
