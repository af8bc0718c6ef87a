"""The contract between the worker shell and any engine: admit, cancel, step.

An engine owns its slots, its KV cache and its clock; it knows nothing of
Redis. The worker shell feeds it requests, calls step() in a loop and moves
the StepOutputs onto the wire. Engines: `echo` (workers/echo.py, no torch) and
`hf` (workers/hf/, the continuous-batching engine for real models).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from batchd.client.errors import BatchdError
from batchd.client.protocol import FinishReason, Request, SamplingParams

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
    # A scoring request's answer (workers.scoring.ScoreOutput), with its finish.
    score: Any = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine(Protocol):
    """What the worker shell needs of an engine."""

    name: str  # "echo", "hf", ...
    model_name: str
    total_slots: int

    def tokenize(self, request: Request) -> list[int]:
        """Prompt token ids for a wire request (chat template for messages).

        Raises InvalidRequest / RequestTooLarge with a message a user can act on.
        """

    def add(self, request: EngineRequest) -> None:
        """Queue a request; it takes a free slot at the next step.

        Raises RequestTooLarge at once if it can never fit.
        """

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
    def free_slots(self) -> int:
        """Slots not taken by running or waiting requests."""

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the KV cache in use, 0..1."""

    # Optional: `scorer() -> workers.scoring.Scorer | None`, the model that answers
    # scoring requests (task next_token_logprobs / score) outside the slots. An
    # engine without it, or returning None, refuses them with InvalidRequest.
    # Optional: `device_wait_s`, the seconds its steps have spent blocked on an
    # accelerator so far (the worker exports it; absent counts as 0).
