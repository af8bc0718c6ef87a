"""Streaming text equals the full decode, across split characters and SentencePiece spaces."""

from __future__ import annotations

import pytest
from batchd.workers.hf.detokenizer import Detokenizer

MULTIBYTE = ["Café, naïve 🙂 and 日本語 side by side.", "🙂🙂🙂 four-byte characters back to back"]
PLAIN = ["the cat sat on the mat", "  leading spaces and another word  ", "word"]


def _metaspace_tokenizer():
    """A SentencePiece-style tokenizer ('▁' marks a space, byte fallback for the rest)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    core.normalizer = normalizers.Replace(" ", "▁")
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    core.train_from_iterator(["the cat sat on the mat", "a word and another word"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")


@pytest.fixture(scope="module", params=["byte-level", "sentencepiece"])
def tokenizer(request, tiny_models):
    if request.param == "byte-level":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tiny_models["llama"])
    return _metaspace_tokenizer()


def _stream(tokenizer, text: str, prompt: str = "Hi", stop=()) -> tuple[list[str], Detokenizer]:
    detok = Detokenizer(tokenizer, tokenizer(prompt)["input_ids"], stop)
    pieces = [detok.add(token) for token in tokenizer(text, add_special_tokens=False)["input_ids"]]
    pieces.append(detok.flush())
    return pieces, detok


def _continuation(tokenizer, prompt: str, text: str) -> str:
    """The text the tokens add after the prompt; a SentencePiece word keeps its leading space."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(prompt_ids + ids, skip_special_tokens=True)[len(tokenizer.decode(prompt_ids, skip_special_tokens=True)):]


@pytest.mark.parametrize("text", PLAIN)
def test_stream_equals_full_decode(tokenizer, text):
    pieces, _ = _stream(tokenizer, text)
    assert "".join(pieces) == _continuation(tokenizer, "Hi", text)


@pytest.mark.parametrize("text", MULTIBYTE)
def test_multibyte_stream_equals_full_decode(tiny_models, text):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    pieces, _ = _stream(tokenizer, text)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_split_character_waits_for_its_last_byte(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    ids = tokenizer("🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1, "the test needs the emoji split over several tokens"
    detok = Detokenizer(tokenizer, [1])
    assert [detok.add(token) for token in ids] == [""] * (len(ids) - 1) + ["🙂"]


def test_stop_string_is_trimmed_and_never_streamed(tokenizer):
    pieces, detok = _stream(tokenizer, "the cat sat on the mat", stop=["on the"])
    expected = _continuation(tokenizer, "Hi", "the cat sat on the mat")
    assert "".join(pieces) == expected[:expected.index("on the")]
    assert detok.stopped_by == "on the"


def test_text_that_only_might_become_a_stop_string_is_released(tokenizer):
    pieces, detok = _stream(tokenizer, "the cat sat on the mat", stop=["on the moon"])
    assert detok.stopped_by is None
    assert "".join(pieces) == _continuation(tokenizer, "Hi", "the cat sat on the mat")
    # "on the m" is held back until "at" shows it is not "on the moon".
    assert "on the m" not in "".join(pieces[:-2])


def test_the_rust_stream_and_the_python_window_give_the_same_pieces(tokenizer):
    """The fast path (tokenizers' DecodeStream) against the window it replaces, on text and on
    random tokens after a text prompt (split characters, bytes that never complete)."""
    import random

    from batchd.workers.hf import detokenizer

    rng = random.Random(3)
    vocab = tokenizer.backend_tokenizer.get_vocab_size()
    texts = PLAIN + MULTIBYTE
    for _ in range(200):
        prompt = tokenizer(rng.choice(texts)[:rng.randint(1, 30)])["input_ids"]
        if rng.random() < 0.5:
            tokens = tokenizer(" ".join(rng.choices(texts, k=2)), add_special_tokens=False)["input_ids"]
        else:
            tokens = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        fast = Detokenizer(tokenizer, prompt)
        slow = Detokenizer(tokenizer, prompt)
        slow._stream = None
        assert fast._stream is not None or detokenizer.DecodeStream is None
        assert [fast.add(t) for t in tokens] + [fast.flush()] == [slow.add(t) for t in tokens] + [slow.flush()]


def test_a_prompt_ending_inside_a_character_keeps_the_python_window(tiny_models):
    """Token ids may end a prompt mid-character; the stream would emit those bytes as output."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    ids = tokenizer("ab🙂", add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tokenizer, ids[:-1])  # the emoji's last byte cut off
    assert detok._stream is None
    assert "".join([detok.add(t) for t in tokenizer(" cd", add_special_tokens=False)["input_ids"]] + [detok.flush()]) \
        == _continuation_ids(tokenizer, ids[:-1], " cd")


def _continuation_ids(tokenizer, prompt_ids: list[int], text: str) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(prompt_ids + ids)[len(tokenizer.decode(prompt_ids)):]
