"""The contract between the worker shell and any engine: admit, cancel, step.

An engine owns its slots, its KV cache and its clock; it knows nothing of
Redis. The worker shell feeds it requests, calls step() in a loop and moves
the StepOutputs onto the wire. `Engine` lists every member the shell uses;
`EngineBase` gives the optional ones their defaults, so an engine states only
what it does. Engines: `echo` (workers/echo.py, no torch) and `hf` (workers/hf/,
the continuous-batching engine for real models).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

from batchd.client.errors import BatchdError, InvalidRequest
from batchd.client.protocol import FinishReason, Request, SamplingParams, TokenLogprob

if TYPE_CHECKING:  # the tensor type only; this module runs without torch
    import torch

Clock = Callable[[], float]


@dataclass
class EngineRequest:
    """One request as an engine sees it: token ids and how to decode them."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    # Absolute unix time; past it the engine finishes the request with "deadline".
    deadline: float | None = None
    arrival_time: float = field(default_factory=time.time)


@dataclass
class ScoreItem:
    """One scoring question about the tokens after a prompt (docs/scoring.md).

    With continuation_token_ids: the log-probability of each of them in turn.
    Without: the distribution of the single next token.
    """

    prompt_token_ids: list[int]
    continuation_token_ids: list[int] | None = None
    # Next-token only: keep the k most likely tokens; None keeps the full vector.
    top_k: int | None = None
    # Next-token only: one question per row, each the prompt followed by the row's tokens;
    # the answer is one vector per row (a 2-D next_token_logprobs), or with top_k each
    # row's k pairs one row after another (hf.scoring.rows_answer).
    rows: list[list[int]] | None = None

    def questions(self) -> list[ScoreItem]:
        """The item as questions of one sequence each: itself, or one per row."""
        if self.rows is None:
            return [self]
        return [ScoreItem(self.prompt_token_ids + row, None, self.top_k) for row in self.rows]


@dataclass
class ScoreOutput:
    # Next token: the full float32 vector (one row per question of an item with rows), or
    # None when top_k was asked for.
    next_token_logprobs: torch.Tensor | None = None
    top_token_ids: list[int] | None = None
    top_logprobs: list[float] | None = None
    # Continuation: one log-probability per token, and their sum.
    token_logprobs: list[float] | None = None
    total_logprob: float | None = None


@dataclass
class StepOutput:
    """What one step produced for one request: new tokens and maybe its end."""

    request_id: str
    new_token_ids: list[int]
    # Text of new_token_ids, held back while it could still become a stop string.
    text: str = ""
    finish_reason: FinishReason | None = None
    error: BatchdError | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # A scoring request's answer, with its finish.
    score: ScoreOutput | None = None
    # With SamplingParams.logprobs: one entry per token of new_token_ids.
    logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Scorer(Protocol):
    """A model that answers scoring requests (next_token_logprobs / score) outside an engine's steps."""

    def prepare(self, request: Request) -> ScoreItem:
        """The item for a wire request; raises InvalidRequest / RequestTooLarge."""

    def score(self, items: list[ScoreItem]) -> list[ScoreOutput]:
        """Answer every item, in as few forward passes as fit."""


class Engine(Protocol):
    """Everything the worker shell uses of an engine."""

    name: str  # "echo", "hf", ...
    model_name: str
    # The model contrast_alpha requests decode against; "" when there is none.
    contrast_model_name: str
    total_slots: int
    # True: scoring requests go to add_score and finish in step(); False: the worker
    # answers them between steps with scorer().
    scores_in_steps: bool
    # Seconds the steps so far spent blocked on an accelerator (the worker exports it).
    device_wait_s: float

    def tokenize(self, request: Request) -> list[int]:
        """Prompt token ids for a wire request (chat template for messages).

        Raises InvalidRequest / RequestTooLarge with a message a user can act on.
        """

    def scorer(self) -> Scorer | None:
        """The model that answers scoring requests; None refuses them (no model)."""

    def served_tokenizer(self) -> Any | None:
        """The Hugging Face tokenizer callers must use for token ids, which the worker advertises
        and stores in Redis (client/tokenizers.py); None: the engine has none."""

    def add(self, request: EngineRequest) -> None:
        """Queue a request; it takes a free slot at the next step.

        Raises RequestTooLarge at once if it can never fit.
        """

    def add_score(self, request: EngineRequest, item: ScoreItem) -> None:
        """Queue a scoring request (already checked by scorer().prepare); with scores_in_steps."""

    def cancel(self, request_id: str, reason: FinishReason = "cancelled") -> None:
        """Finish a waiting or running request at the next step and free its slot."""

    def step(self) -> list[StepOutput]:
        """Admit, run one decode step for every live slot, sample, evict finished.

        The outputs may be those of the step before: an engine may keep one step in
        flight and return its tokens at the next call (the hf engine does on CUDA).
        """

    def has_work(self) -> bool:
        """True while any request is waiting or running, or a step's outputs are still to come."""

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the KV cache in use, 0..1."""

    def pin(self, handle: str, token_ids: list[int]) -> None:
        """Keep this prefix's KV blocks resident until unpin(handle) (computing them first if
        need be); raises PinLimitReached beyond the engine's cap on pinned blocks."""

    def unpin(self, handle: str) -> None:
        """Let a pinned prefix's blocks be evicted again (an unknown handle: nothing)."""

    @property
    def pinned_blocks(self) -> int:
        """KV blocks held by pins."""

    def stats(self) -> dict[str, int]:
        """Running totals since the engine started (docs/metrics.md): num_preemptions,
        prefix_cache_queries and prefix_cache_hits (prompt tokens looked up in and found
        in the prefix cache), prompt_tokens_computed. A key left out is not counted."""


class EngineBase:
    """Defaults of the Engine members an engine may leave out."""

    name: str
    contrast_model_name = ""
    scores_in_steps = False
    device_wait_s = 0.0

    def scorer(self) -> Scorer | None:
        return None

    def served_tokenizer(self) -> Any | None:
        return None

    def add_score(self, request: EngineRequest, item: ScoreItem) -> None:
        raise InvalidRequest(f"the {self.name} engine does not score inside its steps", request.request_id)

    # An engine without a paged KV cache has nothing to keep resident: a pin still saves its
    # callers resending the prefix (the worker resolves the handle), and holds no blocks.
    def pin(self, handle: str, token_ids: list[int]) -> None:
        pass

    def unpin(self, handle: str) -> None:
        pass

    pinned_blocks = 0

    def stats(self) -> dict[str, int]:
        return {}

