"""The echo engine: streams a request's prompt back, one token per step.

No torch and no model: it exercises the whole broker path (client, scheduler,
worker shell) at the speed of Redis, for tests and the broker benchmarks.
Tokens are UTF-8 bytes, so any prompt round-trips exactly.
"""

from __future__ import annotations

import codecs
import time
from collections import deque
from dataclasses import dataclass, field

from batchd.client.errors import InvalidRequest
from batchd.client.protocol import Request

from .engine import Clock, EngineBase, EngineRequest, StepOutput
from .validation import check_context, check_contrast, check_vocabulary

MAX_CONTEXT = 1 << 20
# Its tokens are UTF-8 bytes.
VOCAB_SIZE = 256


@dataclass
class _Slot:
    request: EngineRequest
    produced: int = 0
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))


class EchoEngine(EngineBase):
    name = "echo"
    model_name = "echo"

    def __init__(self, slots: int = 1024, token_delay_s: float = 0.0, clock: Clock = time.time):
        self.total_slots = slots
        self.token_delay_s = token_delay_s
        self.clock = clock
        self._waiting: deque[EngineRequest] = deque()
        self._running: dict[str, _Slot] = {}
        self._cancelled: dict[str, str] = {}

    def tokenize(self, request: Request) -> list[int]:
        if request.prompt_token_ids is not None:
            check_vocabulary(request.prompt_token_ids, VOCAB_SIZE, request.id,
                             vocabulary="the echo engine's vocabulary of bytes")
            return list(request.prompt_token_ids)
        text = request.prompt if request.prompt is not None else "\n".join(m.content for m in request.messages)
        return list(text.encode("utf-8"))

    def add(self, request: EngineRequest) -> None:
        check_contrast(request.params, request.request_id, has_pair=False, serves="the echo engine has no model")
        if request.params.logprobs is not None:
            raise InvalidRequest("the echo engine has no model: it has no log-probabilities to return "
                                 "(logprobs)", request.request_id)
        # It echoes the prompt back, so the prompt alone is what it holds at its longest.
        check_context(request.request_id, MAX_CONTEXT, len(request.prompt_token_ids), max_new_tokens=0)
        self._waiting.append(request)

    def cancel(self, request_id: str, reason: str = "cancelled") -> None:
        self._cancelled[request_id] = reason

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_cache_usage(self) -> float:
        return len(self._running) / self.total_slots

    def step(self) -> list[StepOutput]:
        outputs = self._finish_cancelled()
        while self._waiting and len(self._running) < self.total_slots:
            request = self._waiting.popleft()
            self._running[request.request_id] = _Slot(request)
        if self.token_delay_s and self._running:
            time.sleep(self.token_delay_s)
        now = self.clock()
        for request_id in list(self._running):
            outputs.append(self._advance(self._running[request_id], now))
        return outputs

    def _advance(self, slot: _Slot, now: float) -> StepOutput:
        request = slot.request
        prompt = request.prompt_token_ids
        if request.deadline is not None and now >= request.deadline:
            return self._evict(slot, [], "deadline")
        token = prompt[slot.produced]
        slot.produced += 1
        if slot.produced >= len(prompt):
            reason = "stop"
        elif slot.produced >= request.params.max_new_tokens:
            reason = "length"
        else:
            reason = None
        return self._evict(slot, [token], reason) if reason else self._output(slot, [token], None)

    def _output(self, slot: _Slot, tokens: list[int], reason) -> StepOutput:
        text = slot.decoder.decode(bytes(tokens), final=reason is not None)
        return StepOutput(slot.request.request_id, tokens, text, reason,
                          prompt_tokens=len(slot.request.prompt_token_ids), completion_tokens=slot.produced)

    def _evict(self, slot: _Slot, tokens: list[int], reason: str) -> StepOutput:
        del self._running[slot.request.request_id]
        return self._output(slot, tokens, reason)

    def _finish_cancelled(self) -> list[StepOutput]:
        outputs = []
        for request_id, reason in self._cancelled.items():
            slot = self._running.get(request_id)
            if slot is not None:
                outputs.append(self._evict(slot, [], reason))
                continue
            for request in self._waiting:
                if request.request_id == request_id:
                    self._waiting.remove(request)
                    outputs.append(StepOutput(request_id, [], "", reason,
                                              prompt_tokens=len(request.prompt_token_ids)))
                    break
        self._cancelled.clear()
        return outputs
