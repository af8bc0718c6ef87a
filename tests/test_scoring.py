"""Scoring requests: log-probabilities equal a Hugging Face forward pass, whatever the batch mates."""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest
import torch

from batchd.client import AsyncClient, Client, InvalidRequest, RequestTooLarge
from batchd.client.protocol import PROTOCOL_VERSION, Request, SamplingParams, encode, decode_request
from batchd.workers.engine import ScoreItem
from batchd.workers.hf.scoring import score_batch

VOCAB = 96
TOLERANCE = 1e-4


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def _byte_tokenizer():
    """A real tokenizer file for the worker to load: bytes of printable ASCII, one token each."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {chr(c): c - 29 for c in range(32, 125)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _reference(model, tokens: list[int]) -> torch.Tensor:
    """log_softmax of one unpadded Hugging Face forward pass: row i is the distribution after tokens[:i+1]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), dim=-1)


PROMPTS = [[5, 17, 33], [9], list(range(3, 60)), [40, 41, 42, 43, 44, 45, 46]]


@pytest.fixture(scope="module")
def model():
    return _tiny_llama()


def test_score_batch_equals_one_prompt_at_a_time_forward(model):
    items = [ScoreItem(PROMPTS[0]), ScoreItem(PROMPTS[1], top_k=5),
             ScoreItem(PROMPTS[2], continuation_token_ids=[7, 8, 9, 10]),
             ScoreItem(PROMPTS[3], continuation_token_ids=[90])]
    outputs = score_batch(model, items)

    full = _reference(model, PROMPTS[0])[-1]
    assert outputs[0].next_token_logprobs.shape == (VOCAB,)
    assert torch.allclose(outputs[0].next_token_logprobs, full, atol=TOLERANCE)

    top = torch.topk(_reference(model, PROMPTS[1])[-1], 5)
    assert outputs[1].top_token_ids == top.indices.tolist()
    assert outputs[1].top_logprobs == pytest.approx(top.values.tolist(), abs=TOLERANCE)

    for output, prompt, continuation in ((outputs[2], PROMPTS[2], [7, 8, 9, 10]), (outputs[3], PROMPTS[3], [90])):
        rows = _reference(model, prompt + continuation)[len(prompt) - 1:-1]
        expected = rows.gather(1, torch.tensor(continuation)[:, None])[:, 0]
        assert output.token_logprobs == pytest.approx(expected.tolist(), abs=TOLERANCE)
        assert output.total_logprob == pytest.approx(float(expected.sum()), abs=TOLERANCE)


def test_the_scorer_answers_rows_with_vectors_or_each_rows_top_k(model):
    """The path of runners without scoring in steps: an item with rows, one answer of every row's."""
    from batchd.workers.hf.scoring import Scorer

    scorer = Scorer(model, _byte_tokenizer(), max_context=128)
    rows = [[], [7], [8, 9]]
    vectors, tops = scorer.score([ScoreItem(PROMPTS[0], rows=rows), ScoreItem(PROMPTS[0], top_k=4, rows=rows)])
    assert vectors.next_token_logprobs.shape == (3, VOCAB)
    for row, tokens in enumerate(rows):
        expected = _reference(model, PROMPTS[0] + tokens)[-1]
        assert torch.allclose(vectors.next_token_logprobs[row], expected, atol=TOLERANCE)
        top = torch.topk(expected, 4)
        assert tops.top_token_ids[4 * row:4 * row + 4] == top.indices.tolist()
        assert tops.top_logprobs[4 * row:4 * row + 4] == pytest.approx(top.values.tolist(), abs=TOLERANCE)


def test_score_batch_split_by_token_budget_gives_the_same_answers(model):
    items = [ScoreItem(p, continuation_token_ids=[11, 12]) for p in PROMPTS]
    together = score_batch(model, items)
    one_by_one = score_batch(model, items, max_batch_tokens=1)
    for a, b in zip(together, one_by_one):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=TOLERANCE)


@pytest.fixture
def checkpoint(tmp_path, model):
    folder = tmp_path / "tiny-llama"
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    _byte_tokenizer().save_pretrained(folder)
    return folder


def test_scoring_through_daemons_matches_hf_and_mixes_with_generate(daemons, checkpoint, model):
    daemons.scheduler()
    daemons.start("worker", "--engine", "hf", "--model", str(checkpoint), "--device", "cpu", "--dtype", "float32",
                  "--slots", "4")
    daemons.wait_for_workers(1)
    tokenizer = _byte_tokenizer()
    prompt_text, continuation_text = "Paris is the", " capital"
    text_prompt = tokenizer(prompt_text)["input_ids"]
    text_continuation = tokenizer(continuation_text, add_special_tokens=False)["input_ids"]

    with Client(daemons.url) as client, concurrent.futures.ThreadPoolExecutor(12) as pool:
        full = [pool.submit(client.next_token_logprobs, p, timeout=30) for p in PROMPTS]
        top = [pool.submit(client.next_token_logprobs, p, top_k=3, timeout=30) for p in PROMPTS]
        scores = [pool.submit(client.score, prompt_token_ids=p, continuation_token_ids=[20, 21, 22], timeout=30)
                  for p in PROMPTS]
        by_text = pool.submit(client.score, prompt_text, continuation_text, timeout=30)
        generated = [pool.submit(client.generate, prompt_token_ids=p, max_new_tokens=8, ignore_eos=True,
                                 timeout=30) for p in PROMPTS]

        for prompt, answer, best in zip(PROMPTS, full, top):
            expected = _reference(model, prompt)[-1]
            answer, best = answer.result(), best.result()
            assert answer.result.finish_reason == "stop"
            assert answer.logprobs == pytest.approx(expected.tolist(), abs=TOLERANCE)
            assert best.logprobs is None
            assert best.top_token_ids == torch.topk(expected, 3).indices.tolist()
            assert best.top_logprobs == pytest.approx(torch.topk(expected, 3).values.tolist(), abs=TOLERANCE)
        for prompt, answer in zip(PROMPTS, scores):
            rows = _reference(model, prompt + [20, 21, 22])[len(prompt) - 1:-1]
            expected = rows.gather(1, torch.tensor([[20], [21], [22]]))[:, 0]
            assert answer.result().token_logprobs == pytest.approx(expected.tolist(), abs=TOLERANCE)
        rows = _reference(model, text_prompt + text_continuation)[len(text_prompt) - 1:-1]
        expected = rows.gather(1, torch.tensor(text_continuation)[:, None])[:, 0]
        assert by_text.result().total_logprob == pytest.approx(float(expected.sum()), abs=TOLERANCE)
        assert all(len(g.result().token_ids) == 8 for g in generated)
        with pytest.raises(InvalidRequest, match="outside the model's vocabulary"):
            client.score(prompt_token_ids=[5], continuation_token_ids=[VOCAB + 5], timeout=30)
        with pytest.raises(RequestTooLarge, match="prompt and continuation hold 300 tokens"):
            client.score(prompt_token_ids=[5] * 200, continuation_token_ids=[6] * 100, timeout=30)
        with pytest.raises(InvalidRequest, match="outside"):
            client.next_token_logprobs([VOCAB + 1], timeout=30)

    async def through_async_client():
        async with AsyncClient(daemons.url) as client:
            return await asyncio.gather(client.next_token_logprobs(PROMPTS[0], top_k=2, timeout=30),
                                        client.score(prompt_token_ids=PROMPTS[1], continuation_token_ids=[30],
                                                     timeout=30))

    best, scored = asyncio.run(through_async_client())
    assert best.top_token_ids == torch.topk(_reference(model, PROMPTS[0])[-1], 2).indices.tolist()
    assert scored.total_logprob == pytest.approx(float(_reference(model, PROMPTS[1] + [30])[0, 30]), abs=TOLERANCE)


def test_bad_scoring_input_is_invalid_request(daemons, redis_server):
    daemons.scheduler()
    daemons.echo_worker()
    daemons.wait_for_workers(1)
    with Client(daemons.url) as client:
        with pytest.raises(InvalidRequest, match="continuation"):
            client.score(prompt_token_ids=[1, 2])  # nothing to score
        with pytest.raises(InvalidRequest, match="top_logprobs"):
            client.next_token_logprobs([1, 2], top_k=0)
        with pytest.raises(InvalidRequest, match="no model"):
            client.next_token_logprobs([1, 2], timeout=10)


@pytest.mark.parametrize("fields, message", [
    ({"task": "score"}, "needs exactly one of continuation"),
    ({"task": "score", "continuation": "x", "continuation_token_ids": [1]}, "needs exactly one of continuation"),
    ({"continuation_token_ids": [1]}, "only for task 'score'"),
    ({"task": "score", "continuation": "x", "top_logprobs": 3}, "only for task 'next_token_logprobs'"),
    ({"task": "next_token_logprobs", "params": SamplingParams(max_new_tokens=5)}, "decodes nothing"),
    ({"task": "translate"}, "task"),
    ({"logprobs_dtype": "float16"}, "only for the full vector"),
    ({"task": "next_token_logprobs", "top_logprobs": 5, "logprobs_dtype": "float16"}, "only for the full vector"),
    ({"task": "next_token_logprobs", "logprobs_dtype": "bfloat16"}, "logprobs_dtype"),
])
def test_malformed_scoring_request_is_refused_on_decode(fields, message):
    payload = encode(Request(v=PROTOCOL_VERSION, id="r1", prompt_token_ids=[1, 2], **fields))
    with pytest.raises(InvalidRequest, match=message):
        decode_request(payload, "r1")
