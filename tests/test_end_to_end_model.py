"""End to end with the real default model: SmolLM2 through Redis equals Hugging Face generate."""

from __future__ import annotations

import pytest
import redis

from batchd.client.keys import Keys
from batchd.client.protocol import ChatMessage, Request
from batchd.status import read_status

from batchd import Client
from test_end_to_end import run_producers
from test_gateway import sdk, start_gateway
from test_routing import MAX_NEW_TOKENS as TINY_MAX_NEW_TOKENS, TINY_PROMPTS, hf_answer, tiny  # noqa: F401 (fixture)

pytestmark = pytest.mark.model

PROMPTS = [
    "What is the capital of France?", "Name the three primary colors.", "What is 7 times 8?",
    "Who wrote Romeo and Juliet?", "What is the largest planet?", "Translate 'thank you' into Spanish.",
    "Give me one tip for sleeping better.", "What is the boiling point of water?",
]
MAX_NEW_TOKENS = 10


def reference_token_ids(loaded, prompts: list[str]) -> dict[str, list[int]]:
    """Greedy Hugging Face generate, one request at a time, float32 on the CPU."""
    import torch

    from batchd.workers.hf.models import tokenize

    eos = loaded.tokenizer.eos_token_id
    answers = {}
    for prompt in prompts:
        request = Request(v=1, id="ref", messages=[ChatMessage("user", prompt)])
        ids = tokenize(loaded.tokenizer, request)
        with torch.no_grad():
            out = loaded.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=eos)
        answers[prompt] = [t for t in out[0, len(ids):].tolist()]
    return answers


def strip_eos(ids: list[int], eos: set[int]) -> list[int]:
    return [t for t in ids if t not in eos]


def test_32_chat_requests_from_4_processes_match_hf_generate(daemons, tmp_path, tiny):
    """The default model beside a tiny random one in one fleet: each request names its model and
    is answered by that model's worker, equal to that model's Hugging Face generate; the openai
    SDK's chat completion, streamed and not, equals Client.generate."""
    daemons.scheduler("--max-batch", "16", "--max-wait-ms", "100")
    daemons.start("worker", "--engine", "hf", "--model", "smollm2-135m", "--slots", "16", "--device", "cpu",
                  "--dtype", "float32", "--worker-id", "worker-smollm2")
    daemons.start("worker", "--engine", "hf", "--model", str(tiny[1]), "--device", "cpu", "--dtype", "float32",
                  "--slots", "4", "--served-model-name", "tiny", "--worker-id", "worker-tiny")
    daemons.wait_for_workers(2, timeout=300)
    prompt_sets = [[PROMPTS[(p * 8 + i) % len(PROMPTS)] for i in range(8)] for p in range(4)]
    with Client(daemons.url) as client:
        tinies = {p: client.submit(p, model="tiny", max_new_tokens=TINY_MAX_NEW_TOKENS, timeout=240)
                  for p in TINY_PROMPTS}
        results = run_producers(daemons.url, prompt_sets, tmp_path, chat=True, max_new_tokens=MAX_NEW_TOKENS,
                                timeout=240, model="smollm2-135m")
        tinies = {p: h.result() for p, h in tinies.items()}
    for prompt, result in tinies.items():
        assert result.worker == "worker-tiny"
        assert [t for t in result.token_ids if t != 2] == hf_answer(tiny[0], prompt), prompt
    assert {r["worker"] for r in results} == {"worker-smollm2"}
    assert len(results) == 32 and len({r["request_id"] for r in results}) == 32

    from batchd.workers.hf.models import load_model

    loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
    expected = reference_token_ids(loaded, PROMPTS)
    eos = {loaded.tokenizer.eos_token_id}
    for result in results:
        assert strip_eos(result["token_ids"], eos) == strip_eos(expected[result["prompt"]], eos), result["prompt"]
    paris = [r["text"] for r in results if r["prompt"] == PROMPTS[0]]
    assert all("Paris" in text for text in paris), paris
    status = read_status(redis.Redis.from_url(daemons.url), Keys())
    assert max(status["job_sizes"]) > 1, status["job_sizes"]

    messages = [{"role": "user", "content": PROMPTS[0]}]
    openai_client = sdk(start_gateway(daemons))
    whole = openai_client.chat.completions.create(model="smollm2-135m", messages=messages,
                                                  max_tokens=MAX_NEW_TOKENS, temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in openai_client.chat.completions.create(
        model="smollm2-135m", messages=messages, max_tokens=MAX_NEW_TOKENS, temperature=0, stream=True) if c.choices)
    assert whole.choices[0].message.content == streamed == paris[0]
