"""LLaMPPL and genlm-control on batchd (batchd.integrations), against their own in-process backend.

One redis-server, scheduler and SmolLM2 worker serve the whole module; the
in-process reference is genlm-backend's AsyncTransformer over the same weights
(float32, CPU). genlm and LLaMPPL are imported inside the fixtures, so
collecting this module costs nothing.
"""

from __future__ import annotations

import asyncio
import copy
import re
import string

import numpy
import pytest

from batchd.client.keys import Keys

pytestmark = pytest.mark.model

# Full-vocabulary log-probabilities through the engine's paged, batched steps against
# AsyncTransformer's one-sequence forward pass, both float32 on the CPU.
TOLERANCE = 1e-4
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def starting_fleet(module_daemons):
    """The daemons, started: the worker loads its model while the test process loads its own."""
    module_daemons.scheduler()
    module_daemons.start("worker", "--engine", "hf", "--model", "smollm2-135m", "--slots", "16", "--device", "cpu",
                         "--dtype", "float32", "--result-ttl", "600", "--scoring-result-ttl", "20",
                         "--max-pinned-blocks", "8", "--heartbeat-interval", "0.5")
    return module_daemons


@pytest.fixture(scope="module")
def loaded(starting_fleet):
    from batchd.workers.hf.models import load_model

    return load_model("smollm2-135m", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def fleet(starting_fleet, loaded):
    starting_fleet.wait_for_workers(1, timeout=300)
    return starting_fleet


@pytest.fixture(scope="module")
def in_process(loaded):
    from genlm.backend.llm import AsyncTransformer

    return AsyncTransformer(loaded.model, loaded.tokenizer)


@pytest.fixture(scope="module")
def batchd_lm(fleet, loaded):
    from batchd.integrations.genlm import BatchdLM

    lm = BatchdLM(fleet.url, tokenizer=loaded.tokenizer, timeout=120)
    yield lm
    lm.close()


def test_next_token_logprobs_equal_the_in_process_backend(batchd_lm, in_process, loaded):
    prompt = loaded.tokenizer.encode(PROMPT)
    prefixes = [prompt, prompt + [7042], prompt + [7042, 30]]

    async def both():
        ours = await batchd_lm.batch_next_token_logprobs(prefixes)
        one = await batchd_lm.next_token_logprobs(prefixes[0])
        theirs = await in_process.batch_next_token_logprobs(prefixes)
        return ours, one, theirs

    ours, one, theirs = asyncio.run(both())
    assert ours.shape == theirs.shape == (3, len(loaded.tokenizer))
    assert (ours - theirs).abs().max().item() < TOLERANCE
    assert (one - theirs[0]).abs().max().item() < TOLERANCE
    assert (batchd_lm.next_token_logprobs_sync(prefixes[1]) - theirs[1]).abs().max().item() < TOLERANCE
    assert int(ours[0].argmax()) == int(theirs[0].argmax())


def test_a_top_k_backend_keeps_the_top_k_exact_and_spreads_the_rest(fleet, in_process, loaded):
    """BatchdLM(top_k=): k pairs a row on the wire; the vector the sampler sees still sums to 1."""
    import torch

    from batchd.integrations.genlm import BatchdLM

    prompt = loaded.tokenizer.encode(PROMPT)
    prefixes = [prompt, prompt + [7042]]
    lm = BatchdLM(fleet.url, timeout=120, top_k=50)

    async def both():
        return await lm.batch_next_token_logprobs(prefixes), await in_process.batch_next_token_logprobs(prefixes)

    try:
        ours, theirs = asyncio.run(both())
    finally:
        lm.close()
    for row in range(len(prefixes)):
        top = torch.topk(theirs[row], 50)
        assert (ours[row][top.indices] - top.values).abs().max().item() < TOLERANCE
        others = numpy.ones(len(loaded.tokenizer), dtype=bool)
        others[top.indices.numpy()] = False
        rest = 1 - top.values.exp().sum().item()
        assert torch.allclose(ours[row][others], torch.tensor(numpy.log(rest / others.sum()), dtype=torch.float32),
                              atol=1e-3)
        assert abs(torch.logsumexp(ours[row].double(), 0).item()) < 1e-3
    with pytest.raises(ValueError, match="top_k"):
        BatchdLM(fleet.url, top_k=5, logprobs_dtype="float16")


def test_scored_prompted_llm_gives_promptedllm_sequence_probabilities(batchd_lm, in_process):
    from genlm.control import PromptedLLM

    from batchd.integrations.genlm import ScoredPromptedLLM

    reference = PromptedLLM(in_process, eos_byte_strings=[b"."])
    reference.set_prompt_from_str(PROMPT)
    scored = ScoredPromptedLLM(batchd_lm, eos_byte_strings=[b"."])
    scored.prompt_ids = reference.prompt_ids
    context = reference.tokenize(" Paris, the city of light")

    async def both():
        return (await scored.log_probability(context), await reference.log_probability(context),
                await scored.spawn().complete(context), await reference.complete(context))

    ours, theirs, ours_complete, theirs_complete = asyncio.run(both())
    assert ours == pytest.approx(theirs, abs=1e-3)
    assert ours_complete == pytest.approx(theirs_complete, abs=1e-3)
    assert type(scored.spawn()) is ScoredPromptedLLM


def test_genlm_control_readme_regex_example_completes(batchd_lm):
    """genlm-control's README example (a regular expression constraint), run on batchd."""
    from genlm.control import AWRS, BoolFSA, PromptedLLM

    llm = PromptedLLM(batchd_lm)
    llm.set_prompt_from_str("Here is my honest opinion:")
    fsa = BoolFSA.from_regex(r" SMC is (🔥🔥|😍😍|🤌🤌) with LMs")
    token_sampler = AWRS(llm, fsa.coerce(llm, f=b"".join))
    sequences = asyncio.run(token_sampler.smc(n_particles=4, ess_threshold=0.5, max_tokens=30))
    texts = list(sequences.decoded_posterior)
    assert texts, "no particle satisfied the regular expression"
    assert all(re.fullmatch(r" SMC is (🔥🔥|😍😍|🤌🤌) with LMs", text) for text in texts), texts


BOOK_SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "minLength": 1, "description": "The title of the book"},
    "pages": {"type": "integer", "minimum": 1, "maximum": 2000, "description": "The number of pages in the book"},
    "genre": {"type": "string", "enum": ["fiction", "non-fiction", "mystery"], "description": "The genre of the book"}}}


def test_genlm_control_readme_json_schema_example_completes(batchd_lm, loaded):
    """genlm-control's README JSON-schema example, run on batchd (written for
    Llama-3.2-1B-Instruct: here SmolLM2, with its own end-of-turn strings). In process it takes
    ~3 minutes on this CPU (docs/integrations.md), so only batchd's run is checked."""
    import json

    import jsonschema
    from genlm.control import AWRS, JsonSchema, PromptedLLM

    person = {"type": "object", "properties": {
        "name": {"type": "string", "enum": ["Alice", "Bob", "Charlie"], "description": "The name of the person"},
        "age": {"type": "integer", "minimum": 20, "maximum": 80, "description": "The age of the person"}}}
    llm = PromptedLLM(batchd_lm, eos_byte_strings=[b"<|im_end|>", b"<|endoftext|>"], temperature=0.8)
    llm.prompt_ids = loaded.tokenizer.apply_chat_template(conversation=[
        {"role": "system", "content": "You need to generate a JSON object that matches the schema below. "
                                      "Only generate the JSON object on a single line with no other text."},
        {"role": "user", "content": json.dumps(person)},
        {"role": "assistant", "content": '{"name": "Alice", "age": 30}'},
        {"role": "user", "content": json.dumps(BOOK_SCHEMA)}], tokenize=True, add_generation_prompt=True,
        return_dict=False)
    sampler = AWRS(llm, JsonSchema(BOOK_SCHEMA).coerce(llm, f=b"".join))
    sequences = asyncio.run(sampler.smc(n_particles=2, ess_threshold=0.5, max_tokens=30))
    texts = list(sequences.decoded_posterior)
    assert texts, "no particle finished a JSON object within 30 tokens"
    for text in texts:
        jsonschema.validate(json.loads(text), BOOK_SCHEMA)


def make_masks(LLM) -> dict[int, set[int]]:
    """LLaMPPL's examples/hard_constraints.py: tokens that keep every word at most five letters."""
    return {
        i: set(
            j for (j, v) in enumerate(LLM.str_vocab)
            if j != LLM.tokenizer.eos_token_id and "\n" not in v
            and any(c.isalpha() or c in string.punctuation for c in v)
            and len(v.strip()) <= 5 and (not v[0].isalpha() or i + len(v) <= 5)
        )
        for i in range(6)
    }


def hard_constraints(LLM, prompt: str, max_tokens: int, n_particles: int, seed: int):
    """LLaMPPL's hard-constraints example (its ConstraintModel, run with smc_standard)."""
    from llamppl import LMContext, Model, smc_standard

    class ConstraintModel(Model):
        def __init__(self):
            super().__init__()
            self.context = LMContext(LLM, prompt)
            self.max_tokens = max_tokens
            self.masks = make_masks(LLM)
            self.eos_token_id = LLM.tokenizer.eos_token_id

        async def start(self):
            await self.observe(self.context.mask_dist(self.active_constraint_mask()), True)

        async def step(self):
            token = await self.sample(self.context.next_token())
            self.max_tokens -= 1
            if token == self.eos_token_id or self.max_tokens == 0:
                self.finish()
                return
            await self.observe(self.context.mask_dist(self.active_constraint_mask()), True)

        def active_constraint_mask(self):
            words = str(self.context).split()
            return self.masks[min(5, len(words[-1]) if words else 0)]

        def immutable_properties(self):
            return ["masks"]

    LLM.cache_kv(LLM.tokenizer.encode(prompt))
    numpy.random.seed(seed)
    particles = asyncio.run(smc_standard(ConstraintModel(), n_particles, 0.5))
    return [(str(p.context), p.weight) for p in particles]


def test_llamppl_hard_constraints_example_equals_in_process(fleet, batchd_lm, in_process):
    from llamppl import CachedCausalLM

    from batchd.integrations.llamppl import BatchdCausalLM

    prompt = "My favorite writer is probably"
    ours = hard_constraints(BatchdCausalLM(lm=batchd_lm), prompt, max_tokens=6, n_particles=4, seed=0)
    theirs = hard_constraints(CachedCausalLM(in_process), prompt, max_tokens=6, n_particles=4, seed=0)
    assert [text for text, _ in ours] == [text for text, _ in theirs]
    assert [w for _, w in ours] == pytest.approx([w for _, w in theirs], abs=1e-3)
    for text, _weight in ours:
        assert all(len(word) <= 5 for word in text[len(prompt):].split() if word.isalpha()), text


def test_the_worker_advertises_and_serves_its_tokenizer(fleet, loaded):
    from batchd import Client
    from batchd.client.tokenizers import describe
    from batchd.integrations.hf_tokenizer import hf_tokenizer
    import redis

    from batchd.status import read_status, render

    expected = describe(loaded.tokenizer)
    assert expected.vocab_size == 49152 and (expected.bos_token_id, expected.eos_token_id) == (1, 2)
    with Client(fleet.url) as client:
        assert client.tokenizer_info() == expected
        served = hf_tokenizer(client.served_tokenizer())
        client.check_tokenizer(loaded.tokenizer, "smollm2-135m")
    assert describe(served) == expected
    assert served.encode(PROMPT) == loaded.tokenizer.encode(PROMPT)
    assert served.chat_template == loaded.tokenizer.chat_template
    server = redis.Redis.from_url(fleet.url)
    try:
        assert 0 < server.pttl("batchd:tokenizer:smollm2-135m") <= 3600 * 1000
        snapshot = read_status(server, Keys())
    finally:
        server.close()
    assert snapshot["workers"][0]["tokenizer"]["hash"] == expected.hash
    assert f"49152 {expected.hash[:12]}" in render(snapshot)


def test_a_tokenizer_other_than_the_served_one_is_refused(fleet, loaded):
    from batchd import Client, TokenizerMismatch
    from batchd.integrations.genlm import BatchdLM

    other = copy.deepcopy(loaded.tokenizer)
    other.add_tokens(["<batchd-extra>"])
    with Client(fleet.url) as client:
        with pytest.raises(TokenizerMismatch, match="vocab_size 49153 vs 49152"):
            client.check_tokenizer(other)
    with pytest.raises(TokenizerMismatch, match="served_tokenizer"):
        BatchdLM(fleet.url, tokenizer=other)
    lm = BatchdLM(fleet.url)  # no tokenizer: the served one
    try:
        assert lm.tokenizer.get_vocab() == loaded.tokenizer.get_vocab()
    finally:
        lm.close()


def test_scoring_results_have_their_own_short_ttl_and_publish_no_vector(fleet, loaded):
    import msgspec
    import redis

    from batchd import Client
    from batchd.client.protocol import FinalEvent, decode_event

    server = redis.Redis.from_url(fleet.url)
    listener = server.pubsub()
    listener.psubscribe("batchd:res:*")
    prompt = loaded.tokenizer.encode(PROMPT)
    try:
        with Client(fleet.url) as client:
            vector = client.next_token_logprobs(prompt, timeout=60).result
            # Its cue was heard (by the client and this listener): kept 2 s for the read, not the TTL.
            stored = decode_event(server.get(f"batchd:result:{vector.request_id}"))
            assert 0 < server.pttl(f"batchd:result:{vector.request_id}") <= 2_000
            half = client.next_token_logprobs(prompt, timeout=60, logprobs_dtype="float16")
            generated = client.generate(PROMPT, max_new_tokens=1, timeout=60)
        assert 590_000 < server.pttl(f"batchd:result:{generated.request_id}") <= 600_000
        assert len(stored.result.logprobs) == 4 * 49152
        finals = {}
        for message in iter(lambda: listener.get_message(timeout=0.5), None):
            if message["type"] != "pmessage":
                continue
            event = msgspec.msgpack.decode(message["data"])
            if event.get("type") == "final":
                finals[event["result"]["request_id"]] = (len(message["data"]), decode_event(message["data"]))
    finally:
        listener.close()
        server.close()
    size, published = finals[vector.request_id]
    assert isinstance(published, FinalEvent) and published.result.logprobs is None and size < 1024
    # float16 on request: half the bytes, float16's precision (3 significant digits).
    assert len(half.result.logprobs) == 2 * 49152 and half.result.logprobs_dtype == "float16"
    exact = numpy.frombuffer(vector.logprobs, dtype="<f4")
    assert numpy.allclose(half.array(), exact, rtol=1e-3, atol=1e-3)


def test_a_vector_nobody_was_listening_for_keeps_the_scoring_ttl(fleet, loaded):
    """A producer that submits and reads later (another language, no subscription): its cue
    reaches nobody, so its result stays for --scoring-result-ttl (this fleet's: 20 s), not the
    read window (2 s)."""
    import time

    import redis

    from batchd.client.protocol import PROTOCOL_VERSION, Request, encode

    server = redis.Redis.from_url(fleet.url)
    request_id = f"unheard-{time.monotonic_ns()}"
    request = Request(v=PROTOCOL_VERSION, id=request_id, task="next_token_logprobs",
                      prompt_token_ids=loaded.tokenizer.encode(PROMPT), submitted_at=time.time())
    try:
        server.xadd("batchd:requests", {"id": request_id, "data": encode(request)})
        give_up = time.monotonic() + 60
        while not server.exists(f"batchd:result:{request_id}"):
            assert time.monotonic() < give_up, "no result"
            time.sleep(0.05)
        assert 10_000 < server.pttl(f"batchd:result:{request_id}") <= 20_000
    finally:
        server.close()


def test_one_request_of_many_rows_answers_as_the_whole_prefixes_do(fleet, loaded):
    """rows: one prompt sent once and each particle's own tokens, against one request per whole prefix."""
    from batchd import Client

    prompt = loaded.tokenizer.encode(PROMPT)
    rows = [[], [7042], [7042, 30], [504, 3575, 282]]
    with Client(fleet.url) as client:
        together = client.next_token_logprobs_rows(rows, prompt, timeout=120).array()
        alone = numpy.stack([client.next_token_logprobs(prompt + row, timeout=120).array() for row in rows])
    assert together.shape == (4, 49152)
    assert numpy.abs(together - alone).max() < TOLERANCE
    assert (together.argmax(axis=1) == alone.argmax(axis=1)).all()  # greedy picks the same tokens

    # top_k: each row's k most likely tokens, as a top_k call of its whole prefix answers.
    with Client(fleet.url) as client:
        top = client.next_token_logprobs_rows(rows, prompt, top_k=5, timeout=120)
        each = [client.next_token_logprobs(prompt + row, top_k=5, timeout=120) for row in rows]
    assert top.top_token_ids == [answer.top_token_ids for answer in each]
    assert numpy.abs(numpy.array(top.top_logprobs) - numpy.array([a.top_logprobs for a in each])).max() < TOLERANCE
    with pytest.raises(ValueError, match="top_k"):
        top.array()


def heartbeat(fleet):
    import redis

    from batchd.client.protocol import decode_heartbeat

    server = redis.Redis.from_url(fleet.url)
    try:
        (worker_id,) = server.zrange("batchd:workers", 0, -1)
        return decode_heartbeat(server.get(b"batchd:worker:" + worker_id))
    finally:
        server.close()


def wait_for_pinned_blocks(fleet, count: int) -> None:
    import time

    give_up = time.monotonic() + 30
    while heartbeat(fleet).pinned_blocks != count:
        assert time.monotonic() < give_up, f"the worker holds {heartbeat(fleet).pinned_blocks} pinned blocks, not {count}"
        time.sleep(0.2)


def test_a_pinned_prefix_is_named_by_its_handle_until_unpinned(fleet, loaded):
    from batchd import Client, PinLimitReached, UnknownPrefix

    prompt = loaded.tokenizer.encode("A pinned prompt: " + " ".join(["the quick brown fox"] * 11))
    assert 48 <= len(prompt) < 64  # 3 full blocks of 16 tokens on the CPU
    with Client(fleet.url) as client:
        pin = client.pin(prompt, ttl_s=60, timeout=120)
        assert len(pin.handle) == 32 and pin.token_count == len(prompt)
        wait_for_pinned_blocks(fleet, len(prompt) // 16)
        named = client.next_token_logprobs([7042], prefix_pin=pin.handle, timeout=120).array()
        whole = client.next_token_logprobs(prompt + [7042], timeout=120).array()
        rows = client.next_token_logprobs_rows([[], [7042]], prefix_pin=pin.handle, timeout=120).array()
        assert numpy.abs(named - whole).max() < TOLERANCE and named.argmax() == whole.argmax()
        assert numpy.abs(rows[1] - whole).max() < TOLERANCE
        with pytest.raises(PinLimitReached, match="max-pinned-blocks"):
            client.pin(list(range(100, 200)), timeout=120)  # 6 more blocks; the worker keeps 8 at most
        assert client.renew_pin(pin.handle, ttl_s=60, timeout=120).handle == pin.handle
        client.unpin(pin.handle, timeout=120)
        wait_for_pinned_blocks(fleet, 0)
        with pytest.raises(UnknownPrefix, match="send the whole prefix"):
            client.next_token_logprobs([7042], prefix_pin=pin.handle, timeout=120)
        with pytest.raises(UnknownPrefix):
            client.next_token_logprobs([7042], prefix_pin="0" * 32, timeout=120)


def test_batchd_lm_sends_an_smc_step_as_one_request_and_recovers_from_a_lost_pin(fleet, loaded, batchd_lm,
                                                                                  in_process):
    import redis

    prompt = loaded.tokenizer.encode("A pinned prompt: " + " ".join(["the lazy dog"] * 12))
    particles = [prompt + [7042], prompt + [7042, 30], prompt + [504]]
    batchd_lm.clear_kv_cache()  # the pins earlier tests made
    batchd_lm.cache_kv(prompt)
    (handle,) = [pin.handle for pin in batchd_lm._pins.values()]
    server = redis.Redis.from_url(fleet.url)

    def submits() -> int:  # producers submit by FCALL; the daemons run their scripts by EVALSHA
        return server.info("commandstats").get("cmdstat_fcall", {}).get("calls", 0)

    async def step():
        return await asyncio.gather(*(batchd_lm.next_token_logprobs(ids) for ids in particles))

    try:
        before = submits()
        ours = asyncio.run(step())
        pinned = submits()
        server.delete(f"batchd:pin:{handle}")  # as if it expired
        wait_for_pinned_blocks(fleet, 0)  # the worker noticed
        again = asyncio.run(step())
        after = submits()
    finally:
        server.close()
    theirs = asyncio.run(in_process.batch_next_token_logprobs(particles))
    for row, vector in enumerate(ours):
        assert (vector - theirs[row]).abs().max().item() < TOLERANCE
        assert (again[row] - theirs[row]).abs().max().item() < TOLERANCE
    assert not batchd_lm._pins  # the lost pin was forgotten: the prompt goes in full now
    assert pinned - before == 1  # the three particles' calls: one request
    assert after - pinned == 2  # after the loss: one refused request, then one with the prompt in full


def test_batchd_lm_renews_a_pin_while_calls_use_it(fleet, loaded, batchd_lm):
    import time

    import redis

    batchd_lm.clear_kv_cache()
    prompt = loaded.tokenizer.encode("A short-lived pin: " + " ".join(["a renewed prompt"] * 6))
    batchd_lm.cache_kv(prompt, ttl_s=6)
    (pin,) = batchd_lm._pins.values()
    batchd_lm.next_token_logprobs_sync(prompt + [30])  # within the first half of the TTL: no renewal
    time.sleep(max(0.0, pin.renew_at - time.monotonic()) + 0.1)
    batchd_lm.next_token_logprobs_sync(prompt + [31])  # past half: renewed for 6 s from now
    server = redis.Redis.from_url(fleet.url)
    try:
        assert server.pttl(f"batchd:pin:{pin.handle}") > 3000  # not renewed: under 2,900 ms left
    finally:
        server.close()
    assert list(batchd_lm._pins.values()) == [pin]
    batchd_lm.clear_kv_cache()
