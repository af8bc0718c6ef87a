"""How a caller's stream continues when its request is re-dispatched (EventParser, no Redis)."""

from __future__ import annotations

from batchd.client import Delta, StreamRestarted
from batchd.client.core import EventParser
from batchd.client.protocol import FinalEvent, RestartEvent, Result, TokenEvent, encode


def stream(*events):
    parser = EventParser("r")
    return [item for item in (parser.parse(encode(e)) for e in events) if item is not None]


def tokens(index, ids, text):
    return TokenEvent(index=index, token_ids=ids, text=text)


def test_a_rerun_that_repeats_the_streamed_tokens_continues_seamlessly():
    items = stream(tokens(0, [1], "a"), tokens(1, [2], "b"),
                   RestartEvent(attempt=1, reason="worker died"), RestartEvent(attempt=1, reason="resumed"),
                   tokens(0, [1], "a"), tokens(1, [2], "b"), tokens(2, [3], "c"),
                   FinalEvent(Result(request_id="r", finish_reason="stop", text="abc")))
    assert items[:3] == [Delta("a", [1], 0), Delta("b", [2], 1), Delta("c", [3], 2)]
    assert items[3].text == "abc"


def test_a_rerun_that_decodes_differently_restarts_the_text():
    items = stream(tokens(0, [1], "a"), tokens(1, [2], "b"), RestartEvent(attempt=1),
                   tokens(0, [1], "a"), tokens(1, [9], "z"), tokens(2, [3], "c"))
    assert items == [Delta("a", [1], 0), Delta("b", [2], 1), StreamRestarted(1, ""), Delta("azc", [1, 9, 3], 0)]


def test_text_held_back_for_stop_strings_is_not_repeated():
    items = stream(tokens(0, [1, 2], "ab"), tokens(2, [3], ""), RestartEvent(attempt=1),
                   tokens(0, [1, 2, 3], "ab"), tokens(3, [4], "cd"))
    assert "".join(d.text for d in items) == "abcd"
    assert [d.token_ids for d in items] == [[1, 2], [3], [4]]


def test_a_second_death_during_the_replay_still_resumes():
    items = stream(tokens(0, [1, 2, 3], "abc"), RestartEvent(attempt=1), tokens(0, [1], "a"),
                   RestartEvent(attempt=2), tokens(0, [1, 2, 3, 4], "abcd"))
    assert items == [Delta("abc", [1, 2, 3], 0), Delta("d", [4], 3)]
