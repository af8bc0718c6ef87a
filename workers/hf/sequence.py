"""One request's state inside the hf engine: its tokens, its blocks, its text."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from batchd.client.protocol import FinishReason

from .detokenizer import Detokenizer
from ..engine import EngineRequest
from .blocks import ROOT, Copy


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and queued again: holds no blocks
    RUNNING = "running"  # holds blocks and a row of the runner's tables: prefilling, then decoding
    FINISHED = "finished"


# A model pair's requests keep their blocks apart: a shared block must hold both models' keys.
PAIRED_ROOT = ROOT + b"-pair"


@dataclass(eq=False)
class Sequence:
    request: EngineRequest
    detokenizer: Detokenizer
    stop_token_ids: frozenset[int]
    status: Status = Status.WAITING
    # The row of the runner's block table while running.
    slot: int = -1
    block_table: list[int] = field(default_factory=list)
    # Positions whose keys and values are written, queued to be, or shared from blocks
    # that are (or will be: `ready_blocks` counts those checked).
    num_cached: int = 0
    ready_blocks: int = 0
    # A shared prefix that ends inside a block: positions to copy into this request's own.
    pending_copy: Copy | None = None
    # The prompt, then every generated token: what a preempted request prefills again.
    token_ids: list[int] = field(default_factory=list)
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
    # Order of admission: the youngest running request is preempted first.
    admitted: int = 0
    num_preemptions: int = 0
    # Blocks keyed so far (the engine keys each block once its tokens are known).
    keyed_blocks: int = 0
    # Read several times per request per step: kept, not recounted.
    prompt_len: int = field(init=False)
    # Tokens a (re)admission prefills: the prompt, or after a preemption everything so far.
    prefill_len: int = field(init=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.request.prompt_token_ids)
        self.prompt_len = self.prefill_len = len(self.token_ids)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def root(self) -> bytes:
        return PAIRED_ROOT if self.request.params.contrast_alpha is not None else ROOT

    @property
    def reuse_limit(self) -> int:
        """Leading tokens this request may take from the cache: never the last it prefills,
        whose logits it needs, nor (scoring) any position whose logits it asks for."""
        if self.score is not None:
            return len(self.score.prompt_token_ids) - 1
        return self.prefill_len - 1

    @property
    def known(self) -> int:
        """Positions whose keys are written and whose tokens the host has read."""
        return min(len(self.token_ids), self.num_cached)

    @property
    def prefilling(self) -> bool:
        return self.num_cached < self.prefill_len

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
        """The tokens to feed next: up to budget tokens still to prefill, or the last sampled
        one (a placeholder while that one is still on the device)."""
        if self.prefilling:
            return self.token_ids[self.num_cached:min(self.prefill_len, self.num_cached + budget)]
        return [0] if self.in_flight else self.generated[-1:]
