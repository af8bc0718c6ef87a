"""The gateway's translation (cli/openai_api.py), without a server: bodies in, submit
arguments and OpenAI's shapes out."""

from __future__ import annotations

import json

import pytest

from batchd.client.errors import (
    BrokerUnavailable,
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    RequestTooLarge,
    ResultTimeout,
    UnknownModel,
    WorkerFailed,
)
from batchd.client.protocol import Result, TokenLogprob, TopLogprob, Usage
from batchd import openai_api as api


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_a_chat_body_becomes_batchd_messages_and_sampling():
    request = api.parse_chat(body(model="m", messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
        max_completion_tokens=9, stop="END", seed=3, user="ignored", metadata={"also": "ignored"}))
    assert api.chat_messages(request) == [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi there"}]
    sampling = api.sampling(request, request.max_completion_tokens)
    assert sampling == dict(max_new_tokens=9, temperature=1.0, top_p=1.0, top_k=0, seed=3, stop=["END"],
                            ignore_eos=False, logprobs=None)
    asked = [api.logprobs_asked(api.parse_chat(body(messages=[{"role": "user", "content": "x"}], **fields)))
             for fields in ({}, {"logprobs": True}, {"logprobs": True, "top_logprobs": 4})]
    assert asked == [None, 0, 4]
    assert [api.choice_seed(3, i) for i in range(3)] == [3, 4, 5] and api.choice_seed(None, 2) is None


@pytest.mark.parametrize("prompt, expected", [
    ("one", [{"prompt": "one"}]),
    (["a", "b"], [{"prompt": "a"}, {"prompt": "b"}]),
    ([5, 6], [{"prompt_token_ids": [5, 6]}]),
    ([[5], [6, 7]], [{"prompt_token_ids": [5]}, {"prompt_token_ids": [6, 7]}]),
])
def test_completion_prompts_in_every_form_openai_allows(prompt, expected):
    assert api.completion_prompts(api.parse_completion(body(prompt=prompt))) == expected


@pytest.mark.parametrize("parse, fields, param", [
    (api.parse_chat, dict(messages=[{"role": "user", "content": "x"}], temperature=3), None),
    (api.parse_chat, dict(messages=[]), None),
    (api.parse_chat, dict(messages=[{"role": "user", "content": "x"}], tools=[{}]), "tools"),
    (api.parse_chat, dict(messages=[{"role": "user", "content": "x"}], presence_penalty=0.5), "presence_penalty"),
    (api.parse_chat, dict(messages=[{"role": "user", "content": "x"}], top_logprobs=3), "top_logprobs"),
    (api.parse_chat, dict(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=21), None),
    (api.parse_completion, dict(prompt=["a", 5]), "prompt"),
    (api.parse_completion, dict(prompt="a", echo=True), None),
    (api.parse_completion, dict(prompt="a", logprobs=6), None),
    (api.parse_completion, dict(prompt="a", n=17), None),
])
def test_what_the_gateway_cannot_honour_is_a_400_naming_it(parse, fields, param):
    with pytest.raises(InvalidRequest) as refused:
        parse(body(**fields))
    status, error, headers = api.error_of(refused.value)
    assert status == 400 and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["param"] == param
    if param is None and "temperature" in fields:
        assert "temperature" in error["error"]["message"]


def test_bad_json_is_a_400():
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        api.parse_completion(b"{")


@pytest.mark.parametrize("error, status", [
    (InvalidRequest("x"), 400), (RequestTooLarge("x"), 400), (UnknownModel("x"), 404), (Overloaded("x"), 429),
    (DeadlineExceeded("x"), 504), (ResultTimeout("x"), 504), (WorkerFailed("x"), 502), (Cancelled("x"), 499),
    (BrokerUnavailable("x"), 503),
    (RuntimeError("bug"), 500),
])
def test_errors_map_to_openais_status_codes(error, status):
    got, error_body, headers = api.error_of(error)
    assert got == status and set(error_body["error"]) == {"message", "type", "param", "code"}
    assert headers == ({"Retry-After": "1"} if status == 429 else {})
    if status == 404:
        assert error_body["error"]["code"] == "model_not_found"


def test_a_result_cut_by_its_deadline_is_an_error_not_an_answer():
    cut = Result(request_id="r", finish_reason="deadline", text="part", usage=Usage(3, 2))
    with pytest.raises(DeadlineExceeded, match="after 2 tokens"):
        api.check_finished(cut)
    done = Result(request_id="r", finish_reason="length", text="all")
    assert api.check_finished(done) is done and api.finish_reason(done) == "length"


def test_responses_and_chunks_have_openais_shapes():
    results = [Result(request_id="r", finish_reason="stop", text="hi", usage=Usage(4, 2)),
               Result(request_id="s", finish_reason="length", text="yo", usage=Usage(4, 3))]
    chat = api.chat_completion("chatcmpl-r", "m", results)
    assert [c["message"]["content"] for c in chat["choices"]] == ["hi", "yo"]
    assert chat["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    entries = [TokenLogprob(5, "h", -0.5, [TopLogprob(5, "h", -0.5), TopLogprob(6, "é", -1.5)]),
               TokenLogprob(7, "i", -1.0, [TopLogprob(8, "o", -0.75), TopLogprob(7, "i", -1.0)])]
    text = api.text_completion("cmpl-r", "m", results[:1], [api.completion_logprobs(entries[:1], 0)])
    assert text["choices"][0]["logprobs"] == {"tokens": ["h"], "token_logprobs": [-0.5], "top_logprobs": None,
                                              "text_offset": [0]}
    with_alternatives = api.completion_logprobs(entries, 2)
    assert with_alternatives["top_logprobs"] == [{"h": -0.5, "é": -1.5}, {"o": -0.75, "i": -1.0}]
    assert with_alternatives["text_offset"] == [0, 1]
    content = api.chat_logprobs(entries)["content"]
    assert content[0] == {"token": "h", "logprob": -0.5, "bytes": [104], "top_logprobs": [
        {"token": "h", "logprob": -0.5, "bytes": [104]}, {"token": "é", "logprob": -1.5, "bytes": [195, 169]}]}
    # Streamed: each chunk's own tokens; a completion's text_offset counts the choice's text so far.
    streamed = api.Chunks("cmpl-r", "m", chat=False, alternatives=1)
    assert streamed.text(0, "h", logprobs=entries[:1])["choices"][0]["logprobs"]["text_offset"] == [0]
    second = streamed.text(0, "i", logprobs=entries[1:])["choices"][0]["logprobs"]
    assert second == {"tokens": ["i"], "token_logprobs": [-1.0], "top_logprobs": [{"o": -0.75, "i": -1.0}],
                      "text_offset": [1]}
    assert api.Chunks("cmpl-r", "m", chat=False).text(0, "h", logprobs=entries[:1])["choices"][0]["logprobs"] is None
    chunks = api.Chunks("chatcmpl-r", "m", chat=True)
    assert chunks.role(0)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks.text(1, "x")["choices"][0] == {"index": 1, "delta": {"content": "x"}, "logprobs": None,
                                                 "finish_reason": None}
    assert chunks.text(0, "", "stop")["choices"][0]["delta"] == {}
    assert chunks.usage(results)["choices"] == [] and chunks.usage(results)["usage"]["total_tokens"] == 9
