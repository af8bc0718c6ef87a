"""Helpers to drive an engine and compare it with Hugging Face generate."""

from __future__ import annotations

import random

import torch
from batchd.client.protocol import SamplingParams
from batchd.workers.engine import EngineRequest

VOCAB = 320
EOS = 2


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Hugging Face generate, one request alone: the correctness bar."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(length)]


class Run:
    """What an engine streamed, per request."""

    def __init__(self):
        self.tokens: dict[str, list[int]] = {}
        self.text: dict[str, str] = {}
        self.finish: dict[str, str] = {}
        self.outputs: dict[str, list] = {}

    def record(self, outputs) -> None:
        for out in outputs:
            assert out.request_id not in self.finish, f"{out.request_id} produced output after it finished"
            self.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            self.text[out.request_id] = self.text.get(out.request_id, "") + out.text
            self.outputs.setdefault(out.request_id, []).append(out)
            if out.finished:
                self.finish[out.request_id] = out.finish_reason


def drive(engine, arrivals: dict[int, list[EngineRequest]] | None = None, max_steps: int = 100_000,
          on_step=None) -> Run:
    """Step the engine until idle, adding each request at its arrival step."""
    arrivals = dict(arrivals or {})
    run = Run()
    step = 0
    while engine.has_work() or arrivals:
        for request in arrivals.pop(step, []):
            engine.add(request)
        run.record(engine.step())
        if on_step is not None:
            on_step(engine, step)
        step += 1
        assert step < max_steps, "engine did not finish"
    return run


def request(request_id: str, prompt: list[int], **params) -> EngineRequest:
    return EngineRequest(request_id, prompt, SamplingParams(**params))
