"""A served tokenizer loaded as a Hugging Face tokenizer (transformers, which the client never imports)."""

from __future__ import annotations

import tempfile
from typing import Any

from transformers import AutoTokenizer

from batchd.client import tokenizers


def hf_tokenizer(served: tokenizers.ServedTokenizer) -> Any:
    """The Hugging Face tokenizer of client.served_tokenizer(model); TokenizerMismatch if what
    this transformers loads from the files is not what the workers advertise."""
    with tempfile.TemporaryDirectory(prefix="batchd-tokenizer-") as folder:
        tokenizer = AutoTokenizer.from_pretrained(served.save(folder))
    tokenizers.check(tokenizer, served.info, "this model",
                     what="the tokenizer this transformers loads from the served files")
    return tokenizer
