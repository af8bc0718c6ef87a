"""Contrastive two-model decoding: logits_after + alpha * (logits_after - logits_before).

The pair is a tiny model ("after") and a perturbed copy of it ("before", as
if before fine-tuning); the reference runs both through Hugging Face, one full
forward pass each per token.
"""

from __future__ import annotations

import random

import pytest
import torch
from batchd.client.errors import InvalidRequest
from batchd.workers.hf import build_engine
from engine_helpers import VOCAB, drive, hf_greedy, random_prompt, request


def contrastive_reference(after, before, prompt: list[int], alpha: float, max_new_tokens: int) -> list[int]:
    """Greedy decoding from logits_after + alpha * (logits_after - logits_before), no cache, EOS ignored."""
    tokens, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids = torch.tensor([tokens])
            a, b = after(ids).logits[0, -1].float(), before(ids).logits[0, -1].float()
            token = int((a + alpha * (a - b)).argmax())
            out.append(token)
            tokens.append(token)
    return out


def _perturbed(path, out_dir, seed: int = 1):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(path).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def pairs(tiny_models, tmp_path_factory):
    """kind -> (after folder, before folder)."""
    return {kind: (tiny_models[kind], _perturbed(tiny_models[kind], tmp_path_factory.mktemp(f"{kind}-before")))
            for kind in ("llama", "qwen3", "gpt2")}


@pytest.fixture(scope="module")
def pair_models(pairs):
    from transformers import AutoModelForCausalLM

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    return {kind: (load(after), load(before)) for kind, (after, before) in pairs.items()}


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kind,attention", [("llama", "sdpa"), ("qwen3", "sdpa"), ("llama", "flex"), ("gpt2", None)])
def test_contrast_requests_match_two_forward_passes_per_token(pairs, pair_models, kind, attention):
    after_path, before_path = pairs[kind]
    after, before = pair_models[kind]
    # Three slots for nine requests: slots are reused, prompts are chunked, requests arrive
    # mid-decode, and plain requests share every step with contrast requests.
    engine = build_engine(str(after_path), contrast_model=str(before_path), slots=3, max_context=128,
                          max_prefill_tokens=11, attention=attention)
    rng = random.Random(hash(kind) % 1000)
    arrivals, expected = {}, {}
    for index in range(9):
        prompt = random_prompt(rng, rng.randint(1, 30))
        alpha = [None, 0.0, 0.5, 2.0][index % 4]
        new_tokens = rng.randint(4, 16)
        req = request(f"r{index}", prompt, max_new_tokens=new_tokens, contrast_alpha=alpha,
                      ignore_eos=alpha is not None)
        arrivals.setdefault(0 if index < 3 else rng.randint(1, 20), []).append(req)
        if alpha is None:
            expected[req.request_id] = hf_greedy(after, prompt, new_tokens)
        else:
            expected[req.request_id] = contrastive_reference(after, before, prompt, alpha, new_tokens)
    run = drive(engine, arrivals)
    for request_id, tokens in expected.items():
        assert run.tokens[request_id] == tokens, request_id


def test_alpha_zero_is_plain_greedy_decoding_of_the_after_model(pairs, pair_models):
    after_path, before_path = pairs["llama"]
    after, _before = pair_models["llama"]
    rng = random.Random(5)
    prompts = [random_prompt(rng, rng.randint(2, 20)) for _ in range(4)]
    engine = build_engine(str(after_path), contrast_model=str(before_path), slots=4, max_context=128)
    run = drive(engine, {0: [request(f"p{i}", p, max_new_tokens=20, contrast_alpha=0.0) for i, p in enumerate(prompts)]})
    for i, prompt in enumerate(prompts):
        assert run.tokens[f"p{i}"] == hf_greedy(after, prompt, 20)


def test_a_positive_alpha_changes_the_output(pairs, pair_models):
    """The test pair differs enough that contrast is visible (else the tests above prove little)."""
    after, before = pair_models["llama"]
    rng = random.Random(9)
    prompts = [random_prompt(rng, 10) for _ in range(4)]
    differs = [contrastive_reference(after, before, p, 2.0, 12) != contrastive_reference(after, before, p, 0.0, 12)
               for p in prompts]
    assert any(differs)


def test_seeded_contrast_sampling_does_not_depend_on_batch_mates(pairs):
    after_path, before_path = pairs["llama"]
    probe = dict(max_new_tokens=16, contrast_alpha=1.0, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True)
    alone = drive(build_engine(str(after_path), contrast_model=str(before_path), slots=4, max_context=128),
                  {0: [request("probe", [5, 6, 7, 8], **probe)]})
    rng = random.Random(3)
    crowd = {0: [request(f"m{i}", random_prompt(rng, 9), max_new_tokens=10, contrast_alpha=[None, 3.0][i % 2])
                 for i in range(3)]}
    crowd[2] = [request("probe", [5, 6, 7, 8], **probe)]
    crowded = drive(build_engine(str(after_path), contrast_model=str(before_path), slots=4, max_context=128), crowd)
    assert crowded.tokens["probe"] == alone.tokens["probe"]


def test_a_worker_without_a_contrast_model_refuses_contrast_alpha(tiny_models):
    engine = build_engine(str(tiny_models["llama"]), slots=2, max_context=64)
    with pytest.raises(InvalidRequest, match="--contrast-model"):
        engine.add(request("r", [5, 6], max_new_tokens=8, contrast_alpha=1.0))


def test_a_pair_with_different_vocabularies_is_refused_at_start(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB + 16, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not share the tokenizer"):
        build_engine(str(tiny_models["llama"]), contrast_model=str(tmp_path), slots=2, max_context=64)


def test_a_pair_shares_one_kv_memory_budget(pairs):
    after_path, before_path = pairs["llama"]
    alone = build_engine(str(after_path), slots=4, kv_memory=2**18)
    paired = build_engine(str(after_path), contrast_model=str(before_path), slots=4, kv_memory=2**18)
    # One pool of blocks per model, both out of the budget: half the blocks each (one of
    # them the scratch block).
    assert paired._blocks.capacity + 1 == (alone._blocks.capacity + 1) // 2
    assert paired.kv_cache_bytes <= 2**18 and alone.kv_cache_bytes <= 2**18


def test_contrast_through_the_daemons(daemons, pairs, pair_models):
    """A worker serving a pair, driven through Redis by the client, as a user runs it."""
    import concurrent.futures

    import redis
    from batchd import Client
    from batchd.client.keys import Keys
    from batchd.status import read_status

    after_path, before_path = pairs["llama"]
    after, before = pair_models["llama"]
    daemons.scheduler()
    daemons.start("worker", "--engine", "hf", "--model", str(after_path), "--contrast-model", str(before_path),
                  "--device", "cpu", "--dtype", "float32", "--slots", "4", "--max-context", "128")
    daemons.wait_for_workers(1)
    rng = random.Random(11)
    prompts = [random_prompt(rng, rng.randint(3, 15)) for _ in range(6)]
    alphas = [1.5, None, 0.5, 3.0, None, 1.0]
    with Client(daemons.url) as client, concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client.generate, prompt_token_ids=p, max_new_tokens=10, contrast_alpha=a,
                               ignore_eos=a is not None, timeout=60) for p, a in zip(prompts, alphas)]
        results = [f.result() for f in futures]
    for prompt, alpha, result in zip(prompts, alphas, results):
        if alpha is None:
            assert result.token_ids == hf_greedy(after, prompt, 10)
        else:
            assert result.token_ids == contrastive_reference(after, before, prompt, alpha, 10)
    probe = redis.Redis.from_url(daemons.url)
    [worker] = read_status(probe, Keys())["workers"]
    probe.close()
    assert worker["contrast_model"] == before_path.name


def test_a_contrast_request_to_a_worker_without_a_pair_gets_a_typed_error_and_the_worker_serves_on(daemons, pairs):
    from batchd import Client

    daemons.scheduler()
    daemons.start("worker", "--engine", "hf", "--model", str(pairs["llama"][0]), "--device", "cpu",
                  "--dtype", "float32", "--slots", "2", "--max-context", "64")
    daemons.wait_for_workers(1)
    with Client(daemons.url) as client:
        with pytest.raises(InvalidRequest, match="--contrast-model"):
            client.generate(prompt_token_ids=[5, 6, 7], max_new_tokens=4, contrast_alpha=1.0, timeout=60)
        assert len(client.generate(prompt_token_ids=[5, 6, 7], max_new_tokens=4, ignore_eos=True,
                                   timeout=60).token_ids) == 4
    assert all(p.poll() is None for p in daemons.processes), daemons.logs()
