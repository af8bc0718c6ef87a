"""A served model's tokenizer: its fingerprint, the files a worker stores, and the caller's check.

Callers that send token ids (SMC samplers, constrained decoding) tokenise
themselves; ids from another tokenizer would silently mean other tokens. A
worker advertises TokenizerInfo in its heartbeat and stores the tokenizer at
`batchd:tokenizer:{model}` (Keys.tokenizer): field `info`, and field `files`
with what Hugging Face's save_pretrained writes. A client reads `info` to check
a caller's tokenizer and `files` to give the caller the worker's own.

Tokenizers are taken by duck typing (get_vocab, save_pretrained, the *_token_id
attributes): the client imports no transformers.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import msgspec

from .errors import NoWorkers, TokenizerMismatch, UnknownModel
from .protocol import TokenizerInfo

# A stored tokenizer outlives its last worker by this long; each heartbeat of a worker
# serving it pushes the expiry back.
TOKENIZER_TTL_MS = 3600 * 1000


def describe(tokenizer: Any) -> TokenizerInfo:
    """The fingerprint of a Hugging Face tokenizer: what decides which id is which token."""
    by_id = sorted((token_id, token) for token, token_id in tokenizer.get_vocab().items())
    special_ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    specials = sorted(set(getattr(tokenizer, "all_special_ids", ())))
    digest = hashlib.sha256(msgspec.msgpack.encode([by_id, specials, special_ids])).hexdigest()
    return TokenizerInfo(hash=digest, vocab_size=len(tokenizer), bos_token_id=special_ids[0],
                         eos_token_id=special_ids[1], pad_token_id=special_ids[2])


def stored_fields(tokenizer: Any, info: TokenizerInfo) -> dict[str, bytes]:
    """The fields a worker writes at Keys.tokenizer(model) for this tokenizer (info: describe's)."""
    with tempfile.TemporaryDirectory(prefix="batchd-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        files = {}
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as file:
                files[name] = file.read()
    return {"info": msgspec.msgpack.encode(info), "files": msgspec.msgpack.encode(files)}


@dataclass(frozen=True)
class ServedTokenizer:
    """A served model's tokenizer as stored in Redis: its fingerprint and its files, by name.
    Hugging Face's AutoTokenizer.from_pretrained(served.save(folder)) loads it (the client
    imports no transformers; batchd.integrations.hf_tokenizer does both steps)."""

    info: TokenizerInfo
    files: dict[str, bytes]

    def save(self, folder: str) -> str:
        """Write the files into folder (which exists) and return it."""
        for name, content in self.files.items():
            if os.path.basename(name) != name or name.startswith("."):
                raise TokenizerMismatch(f"the stored tokenizer holds a file named {name!r}; refusing to write it")
            with open(os.path.join(folder, name), "wb") as file:
                file.write(content)
        return folder


def stored_tokenizer(info_field: bytes | None, files_field: bytes | None, model: str) -> ServedTokenizer:
    """The fields read from Keys.tokenizer(model)."""
    info = stored_info(info_field, model)
    if files_field is None:
        raise UnknownModel(f"the tokenizer of model {model!r} expired while being read; try again")
    return ServedTokenizer(info, msgspec.msgpack.decode(files_field, type=dict[str, bytes]))


def check(tokenizer: Any, served: TokenizerInfo, model: str, what: str = "your tokenizer") -> None:
    """Raise TokenizerMismatch unless tokenizer is the one served for model."""
    mine = describe(tokenizer)
    if mine.hash == served.hash:
        return
    differences = [f"{name} {getattr(mine, name)} vs {getattr(served, name)}"
                   for name in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")
                   if getattr(mine, name) != getattr(served, name)]
    raise TokenizerMismatch(
        f"{what} is not the one workers serve for {model} (hash {mine.hash[:12]} vs {served.hash[:12]}"
        + (f"; {', '.join(differences)}" if differences else "; same size and special ids, other tokens")
        + "): token ids would mean other tokens. Use client.served_tokenizer(model) instead.")


def the_only_model(models: list[str]) -> str:
    """The model a call without model= means: the fleet's only one."""
    if len(models) == 1:
        return models[0]
    if not models:
        raise NoWorkers("no live worker: start one, or name the model (model=...)")
    raise UnknownModel(f"the fleet serves several models ({', '.join(models)}): name one with model=")


def stored_info(raw: bytes | None, model: str) -> TokenizerInfo:
    """The `info` field read from Keys.tokenizer(model)."""
    if raw is None:
        raise UnknownModel(f"no worker stores a tokenizer for model {model!r}: none serves it, or it "
                           "serves no tokenizer (the echo engine)")
    return msgspec.msgpack.decode(raw, type=TokenizerInfo)
