"""Incremental detokenization and stop strings for one request.

Decoding one token at a time is wrong for byte-level BPE (a character split
over tokens decodes to U+FFFD until its last byte arrives) and for
SentencePiece (a word's leading space depends on the token before it). So each
new token is decoded together with a few tokens before it and only the text
past what those already produced is taken, the way vLLM does it. Text that
could still grow into a stop string is held back until it cannot.
"""

from __future__ import annotations

from typing import Any

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers before 0.21
    DecodeStream = None

# Tokens of context before the new ones; enough for any merge a tokenizer does.
CONTEXT_TOKENS = 6


def _fast_decode(tokenizer: Any):
    """The Rust tokenizer's own decode where it gives the same text: a third of the cost per call,
    which adds up at one call per token per request on a busy engine."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return tokenizer.decode
    return backend.decode


def _stream(tokenizer: Any, context: list[int]):
    """(Rust tokenizer, its incremental decoder primed with the prompt's last tokens), or None.

    The `tokenizers` library's DecodeStream keeps the same window as `_window_diff` in Rust:
    one call per token instead of two decodes and the Python around them (1.42x less time a
    token on the default model's tokenizer, benchmarks/detokenize.py; every running request
    pays it every step). Used where it gives the same text: a fast tokenizer without
    clean-up of spaces, and a prompt whose last tokens end on a whole character (a prompt
    sent as token ids may not; the stream would then emit the prompt's dangling bytes)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False) or DecodeStream is None:
        return None
    if context and backend.decode(context, skip_special_tokens=True).endswith("\ufffd"):
        return None
    stream = DecodeStream(skip_special_tokens=True)
    if context:
        stream.step(backend, context)
    return backend, stream



class Detokenizer:
    """Turns one request's generated token ids into text, piece by piece."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], stop: list[str] | tuple[str, ...] = ()):
        self._decode = _fast_decode(tokenizer)
        # Prompt tokens give the first generated word its correct leading space.
        self._ids: list[int] = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self._stream = _stream(tokenizer, self._ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = tuple(stop)
        self._text = ""  # all decoded text so far
        self._emitted = 0  # characters of _text already handed out
        self.stopped_by: str | None = None

    def add(self, token_id: int, visible: bool = True) -> str:
        """Add one generated token and return the text now safe to emit.

        An invisible token (the stop token that ends a request) still counts
        as context but adds no text. After a stop string matched, the text is
        cut before it and nothing more is emitted.
        """
        if self.stopped_by is not None:
            return ""
        if visible:
            self._text += self._decode_next(token_id)
            self._match_stop()
        return self._release(final=self.stopped_by is not None)

    def flush(self) -> str:
        """Everything still held back, for a request that ends now.

        Bytes that never completed a character come out as U+FFFD, as a full decode shows them.
        """
        if self.stopped_by is None and self._read_offset < len(self._ids):
            self._text += self._window_diff()
            self._read_offset = len(self._ids)
            self._match_stop()
        return self._release(final=True)

    def _decode_next(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self._stream is not None:
            backend, stream = self._stream
            # None while a character is incomplete; the stream holds its bytes meanwhile.
            piece = stream.step(backend, token_id) or ""
            if piece:
                self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return piece
        piece = self._window_diff()
        if not piece or piece.endswith("\ufffd"):
            # An incomplete multi-byte character: wait for the bytes that finish it.
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return piece

    def _window_diff(self) -> str:
        """Text the unread tokens add after the context tokens before them."""
        decode = self._decode
        before = decode(self._ids[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        after = decode(self._ids[self._prefix_offset:], skip_special_tokens=True)
        return after[len(before):] if len(after) > len(before) else ""

    def _match_stop(self) -> None:
        if not self._stop:
            return
        # Text that could begin a stop string is never emitted, so a match starts after it.
        hits = [(self._text.find(s, self._emitted), s) for s in self._stop]
        hits = [(at, s) for at, s in hits if at >= 0]
        if hits:
            at, stop = min(hits)
            self._text = self._text[:at]
            self.stopped_by = stop

    def _release(self, final: bool) -> str:
        end = len(self._text) if final or not self._stop else len(self._text) - self._held_back()
        if end <= self._emitted:
            return ""
        piece = self._text[self._emitted:end]
        self._emitted = end
        return piece

    def _held_back(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        tail_limit = min(len(self._text) - self._emitted, max(map(len, self._stop), default=1) - 1)
        for size in range(tail_limit, 0, -1):
            tail = self._text[-size:]
            if any(stop.startswith(tail) for stop in self._stop):
                return size
        return 0
