"""One step in flight (the GPU default): tokens read on the device, speculative rows
dropped and slots reused under a running step change no output.

Every in-process engine test also runs in both modes (see conftest.py); these are
the cases the overlap adds.
"""

from __future__ import annotations

import random

import pytest
from batchd.workers.hf import build_engine
from engine_helpers import drive, hf_greedy, random_prompt, request


def test_a_request_stopped_while_its_next_step_runs_hands_its_slot_on_exactly(tiny_models, reference_models,
                                                                               engine_overlap):
    reference = reference_models["llama"]
    rng = random.Random(11)
    first, second = random_prompt(rng, 9), random_prompt(rng, 14)
    greedy = hf_greedy(reference, first, 12)
    stop = greedy[3]
    ends = greedy.index(stop)
    # One slot: the first request's stop token is read while its next token is being
    # computed into that slot's cache; the second request takes the slot after it.
    engine = build_engine(str(tiny_models["llama"]), slots=1, max_context=64)
    assert engine.overlap is engine_overlap
    run = drive(engine, {0: [request("first", first, max_new_tokens=12, stop_token_ids=[stop]),
                             request("second", second, max_new_tokens=10)]})
    assert run.tokens["first"] == greedy[:ends + 1] and run.finish["first"] == "stop"
    assert run.tokens["second"] == hf_greedy(reference, second, 10)
    assert not engine.has_work() and engine.kv_cache_usage == 0


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kind,attention", [("llama", "sdpa"), ("qwen3", "flex")])
def test_overlap_changes_no_token_text_or_finish_reason(tiny_models, kind, attention):
    """Greedy, seeded sampling, stop strings, stop ids and early EOS, arriving over time,
    through few slots: the same outputs in lockstep and with a step in flight."""
    rng = random.Random(5)
    arrivals: dict[int, list] = {}
    for index in range(12):
        params = {"max_new_tokens": rng.randint(1, 20)}
        if index % 3 == 1:
            params.update(temperature=0.9, top_p=0.9, top_k=40, seed=index)
        if index % 4 == 2:
            params["stop"] = ["e", "a"]
        if index % 5 == 3:
            params["stop_token_ids"] = [rng.randrange(3, 300) for _ in range(20)]
        step = 0 if index < 4 else rng.randint(1, 25)
        arrivals.setdefault(step, []).append(request(f"r{index}", random_prompt(rng, rng.randint(1, 40)), **params))

    def outputs(overlap: bool):
        engine = build_engine(str(tiny_models[kind]), slots=3, max_context=96, max_prefill_tokens=11,
                              attention=attention, overlap=overlap)
        assert engine.overlap is overlap
        run = drive(engine, {step: list(requests) for step, requests in arrivals.items()})
        return run.tokens, run.text, run.finish

    lockstep, overlapped = outputs(False), outputs(True)
    assert overlapped == lockstep
    assert set(lockstep[2].values()) >= {"stop", "length"}


def test_the_generic_path_steps_in_lockstep(tiny_models):
    engine = build_engine(str(tiny_models["gpt2"]), slots=2, max_context=64, overlap=True)
    assert engine.overlap is False
