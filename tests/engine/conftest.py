"""Tiny random-weight models with a real byte-level BPE tokenizer, and helpers to drive an engine.

The models are saved as checkpoint folders and loaded through build_engine,
the same seam a worker uses; nothing here needs a download.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from engine_helpers import EOS, VOCAB

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Continuous batching keeps every slot busy while requests come and go.",
    "Café, naïve, résumé: accents are two bytes; 日本語 is three; 🙂 is four.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Paris is the capital of France. Berlin is the capital of Germany.",
]


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(TEXT * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _config(kind: str):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

    common = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": EOS, "pad_token_id": 0}
    if kind == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, **common)
    if kind == "qwen3":
        return Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                           initializer_range=0.1, tie_word_embeddings=True, **common)
    if kind == "qwen2":  # biases on q, k and v: the fused projection carries them too
        return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1,
                           tie_word_embeddings=False, **common)
    if kind == "gpt2":  # not in the Llama family: exercises the generic path
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.1, **common)
    raise ValueError(kind)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    tokenizer = _train_tokenizer()
    folders = {}
    for kind in ("llama", "qwen3", "qwen2", "gpt2"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(kind))
        model.generation_config.eos_token_id = EOS
        model.generation_config.pad_token_id = 0
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[kind] = folder
    return folders


@pytest.fixture(scope="session")
def reference_models(tiny_models):
    from transformers import AutoModelForCausalLM

    return {kind: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for kind, path in tiny_models.items()}




# In-process engine tests run twice: in lockstep (the CPU default: each step's tokens
# are read before the next is queued) and with one step in flight (the GPU default), so
# the overlap's bookkeeping (tokens read on the device, dropped speculative rows, slots
# reused under a step still running) is checked against the same references on the CPU.
# Only tests that build an engine: a tokenizer or a model loaded alone runs the same either way.
def pytest_generate_tests(metafunc):
    in_process = {"tiny_models", "pairs"} & set(metafunc.fixturenames) and "daemons" not in metafunc.fixturenames
    if "engine_overlap" in metafunc.fixturenames and in_process and builds_engine(metafunc.function):
        metafunc.parametrize("engine_overlap", [False, True], ids=["lockstep", "overlap"], indirect=True)


ENGINE_BUILDERS = frozenset({"build_engine", "HFEngine"})


def builds_engine(function) -> bool:
    """Whether a test calls build_engine or HFEngine: itself, in a function nested in it,
    or through a helper function of its module."""
    module_globals = function.__globals__
    todo, seen = [function.__code__], set()
    while todo:
        code = todo.pop()
        if code in seen:
            continue
        seen.add(code)
        if ENGINE_BUILDERS & set(code.co_names):
            return True
        todo += [const for const in code.co_consts if isinstance(const, types.CodeType)]
        todo += [helper.__code__ for helper in map(module_globals.get, code.co_names)
                 if isinstance(helper, types.FunctionType) and helper.__module__ == function.__module__]
    return False


@pytest.fixture(autouse=True)
def engine_overlap(request, monkeypatch):
    """The engine's default overlap for this test (None: the device's default)."""
    overlap = getattr(request, "param", None)
    if overlap is not None:
        from batchd.workers.hf.engine import HFEngine

        start, default = HFEngine.__init__, overlap

        def init(self, *args, overlap=None, **options):
            start(self, *args, overlap=default if overlap is None else overlap, **options)

        monkeypatch.setattr(HFEngine, "__init__", init)
    return overlap
