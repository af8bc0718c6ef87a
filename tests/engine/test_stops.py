"""Stop token ids, EOS, ignore_eos and stop strings end a request where a user expects."""

from __future__ import annotations

import random

import pytest
from batchd.workers.hf import build_engine
from engine_helpers import EOS, drive, hf_greedy, random_prompt, request
from transformers import AutoTokenizer


@pytest.fixture(scope="module")
def prompt():
    return random_prompt(random.Random(21), 12)


@pytest.fixture(scope="module")
def greedy(reference_models, prompt):
    tokens = hf_greedy(reference_models["llama"], prompt, 40)
    assert EOS not in tokens, "pick another prompt: this test wants 40 tokens without EOS"
    return tokens


def _engine(tiny_models):
    return build_engine(str(tiny_models["llama"]), slots=4, max_context=128)


def test_stop_token_id_ends_with_that_token(tiny_models, prompt, greedy):
    stop_id = greedy[7]
    first = greedy.index(stop_id)
    run = drive(_engine(tiny_models), {0: [request("s", prompt, max_new_tokens=40, stop_token_ids=[stop_id])]})
    assert run.tokens["s"] == greedy[:first + 1]
    assert run.finish["s"] == "stop"
    assert run.outputs["s"][-1].completion_tokens == first + 1


def test_eos_stops_unless_ignored(tiny_models, prompt, greedy, monkeypatch):
    # Make the 6th greedy token the model's EOS, as a trained model would emit it.
    import batchd.workers.hf.engine as engine_module

    monkeypatch.setattr(engine_module, "_eos_ids", lambda model, tokenizer: frozenset({greedy[5]}))
    first = greedy.index(greedy[5])
    run = drive(_engine(tiny_models), {0: [request("eos", prompt, max_new_tokens=40),
                                           request("ignore", prompt, max_new_tokens=40, ignore_eos=True)]})
    assert run.tokens["eos"] == greedy[:first + 1] and run.finish["eos"] == "stop"
    assert run.tokens["ignore"] == greedy and run.finish["ignore"] == "length"


def test_stop_string_trims_text_and_is_never_streamed(tiny_models, prompt, greedy):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    full = tokenizer.decode(greedy, skip_special_tokens=True)
    stop = next(full[i:i + 3] for i in range(len(full) // 2, len(full)) if full[i:i + 3].strip() and "\ufffd" not in full[i:i + 3])
    cut = full.index(stop)
    run = drive(_engine(tiny_models), {0: [request("s", prompt, max_new_tokens=40, stop=[stop, "never-seen"])]})
    assert run.finish["s"] == "stop"
    assert run.text["s"] == full[:cut]
    tokens = run.tokens["s"]
    assert tokens == greedy[:len(tokens)]
    # The last token is the one that completed the stop string.
    assert stop in tokenizer.decode(tokens) and stop not in tokenizer.decode(tokens[:-1])


def test_max_new_tokens_and_streamed_text(tiny_models, prompt, greedy):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    run = drive(_engine(tiny_models), {0: [request("n", prompt, max_new_tokens=9)]})
    assert run.tokens["n"] == greedy[:9] and run.finish["n"] == "length"
    assert run.text["n"] == tokenizer.decode(greedy[:9], skip_special_tokens=True)
    assert [len(o.new_token_ids) for o in run.outputs["n"]] == [1] * 9
