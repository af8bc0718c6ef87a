"""The wire contract: round trips, and every kind of bad payload gets a typed error."""

from __future__ import annotations

import msgpack
import pytest

from batchd.client import protocol as p
from batchd.client.core import build_request
from batchd.client.errors import InvalidRequest, UnsupportedVersion


def good(**overrides) -> dict:
    return {"v": 1, "id": "req-1", "prompt": "hello", **overrides}


def test_request_round_trip_keeps_every_field():
    request = p.Request(v=1, id="abc-1", messages=[p.ChatMessage("user", "hi")],
                        params=p.SamplingParams(max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=40, seed=3,
                                                stop=["\n"], stop_token_ids=[2], ignore_eos=True),
                        priority=5, producer="svc-a", deadline=123.5, submitted_at=100.0, attempt=1)
    assert p.decode_request(p.encode(request)) == request


def test_a_foreign_msgpack_encoder_is_understood():
    # A producer in another language sends a plain msgpack map.
    data = msgpack.packb(good(params={"max_new_tokens": 5, "stop": ["."]}))
    request = p.decode_request(data, "req-1")
    assert request.prompt == "hello" and request.params.max_new_tokens == 5 and request.params.stop == ["."]


@pytest.mark.parametrize("payload, fragment", [
    (b"\xc1\x00garbage", "not valid msgpack"),
    (msgpack.packb([1, 2, 3]), "Expected `object`"),
    (msgpack.packb(good(params={"max_new_tokens": "5"})), "max_new_tokens"),
    (msgpack.packb(good(params={"max_new_tokens": 0})), ">= 1"),
    (msgpack.packb(good(params={"temperature": -1.0})), "temperature"),
    (msgpack.packb(good(params={"top_p": 0.0})), "top_p"),
    (msgpack.packb(good(unknown_field=1)), "unknown field `unknown_field`"),
    (msgpack.packb(good(prompt="")), "prompt"),
    (msgpack.packb(good(prompt="x" * (p.MAX_PROMPT_CHARS + 1))), "prompt"),
    (msgpack.packb(good(prompt=None)), "got none"),
    (msgpack.packb(good(prompt_token_ids=[1, 2])), "exactly one of"),
    (msgpack.packb(good(prompt_token_ids=None, prompt=None, messages=[])), "messages"),
    (msgpack.packb(good(id="has space")), "$.id"),
    (msgpack.packb(good(id="")), "$.id"),
    (msgpack.packb({"id": "req-1", "prompt": "x"}), "missing required field `v`"),
    (msgpack.packb(good(params={"contrast_alpha": float("nan")})), "contrast_alpha"),
    (msgpack.packb(good(params={"contrast_alpha": float("inf")})), "contrast_alpha"),
    (msgpack.packb(good(params={"contrast_alpha": 1e3})), "contrast_alpha"),
    (msgpack.packb(good(params={"contrast_alpha": "strong"})), "contrast_alpha"),
])
def test_bad_payloads_raise_invalid_request_with_a_reason(payload, fragment):
    with pytest.raises(InvalidRequest) as info:
        p.decode_request(payload)
    assert fragment in info.value.message


def test_an_unknown_version_says_which_versions_differ():
    with pytest.raises(UnsupportedVersion, match="version 2.*version 1"):
        p.decode_request(msgpack.packb(good(v=2, new_thing=True)))


def test_oversized_payload_is_refused_before_decoding():
    with pytest.raises(InvalidRequest, match="limit"):
        p.decode_request(b"\x00" * (p.MAX_REQUEST_BYTES + 1))


def test_entry_id_must_match_the_request_id():
    with pytest.raises(InvalidRequest, match="does not match"):
        p.decode_request(msgpack.packb(good()), "another-id")


def test_events_round_trip_as_a_tagged_union():
    events = [p.TokenEvent(index=3, token_ids=[5, 6], text="ab"), p.RestartEvent(attempt=1, reason="died"),
              p.FinalEvent(p.Result("r1", "length", text="ab", token_ids=[5, 6], usage=p.Usage(2, 2)))]
    assert [p.decode_event(p.encode(e)) for e in events] == events


def test_client_arguments_are_validated_at_the_call():
    common = dict(max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=None,
                  stop_token_ids=None, ignore_eos=False, priority=0, producer="t", timeout=None, deadline=None)
    request, payload = build_request("ok-1", "hi", None, None, **common)
    assert p.decode_request(payload) == request
    with pytest.raises(InvalidRequest, match="max_new_tokens"):
        build_request("bad-1", "hi", None, None, **{**common, "max_new_tokens": -3})
    with pytest.raises(InvalidRequest):
        build_request("bad-2", "hi", [{"role": "user"}], None, **common)
    with pytest.raises(InvalidRequest, match="exactly one"):
        build_request("bad-3", None, None, None, **common)
    with pytest.raises(InvalidRequest, match="contrast_alpha"):
        build_request("bad-4", "hi", None, None, **common, contrast_alpha=float("nan"))
    with pytest.raises(InvalidRequest):
        build_request("bad-5", "hi", None, None, **common, contrast_alpha="strong")


def test_timeout_becomes_an_absolute_deadline():
    common = dict(max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop="\n",
                  stop_token_ids=None, ignore_eos=False, priority=0, producer="t", deadline=None)
    request, _ = build_request("t-1", "hi", None, None, timeout=5.0, **common)
    assert request.deadline == pytest.approx(request.submitted_at + 5.0, abs=0.01)
    assert request.params.stop == ["\n"]


def test_the_producer_api_imports_no_torch_or_transformers():
    import subprocess
    import sys

    code = ("import sys, batchd; from batchd import Client, AsyncClient; import batchd.client.protocol; "
            "heavy = [m for m in ('torch', 'transformers', 'batchd.scheduler', 'batchd.workers') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr


@pytest.mark.parametrize("fields, message", [
    (dict(task="score", prompt_token_ids=[1], continuation_token_ids=[2], rows=[[3]]), "rows are for next_token_logprobs"),
    (dict(task="next_token_logprobs", prompt="text", prefix_pin="0" * 32), "take token ids"),
    (dict(task="unpin"), "names its pin"),
    (dict(task="unpin", prefix_pin="0" * 32, prompt_token_ids=[1]), "names its pin"),
    (dict(task="pin", prompt="text"), "pins token ids"),
    (dict(task="pin", prefix_pin="0" * 32, prompt_token_ids=[1]), "not both"),
    (dict(task="next_token_logprobs", prefix_pin="not-a-handle"), "prefix_pin"),
])
def test_compact_and_pin_requests_are_checked(fields, message):
    with pytest.raises(InvalidRequest, match=message):
        p.decode_request(p.encode(p.Request(v=p.PROTOCOL_VERSION, id="r1", **fields)))


def test_a_request_on_a_pin_with_rows_needs_no_prompt_of_its_own():
    request = p.decode_request(p.encode(p.Request(v=p.PROTOCOL_VERSION, id="r1", task="next_token_logprobs",
                                            prefix_pin="ab" * 16, rows=[[], [5, 6]])))
    assert request.prompt_token_ids is None and request.rows == [[], [5, 6]]


def test_rows_may_ask_for_each_rows_top_k():
    request = p.decode_request(p.encode(p.Request(v=p.PROTOCOL_VERSION, id="r1", task="next_token_logprobs",
                                            prompt_token_ids=[1], rows=[[3], [4]], top_logprobs=5)))
    assert request.rows == [[3], [4]] and request.top_logprobs == 5
