"""The continuous-batching engine for Hugging Face causal LMs (`--engine hf`)."""

from .engine import HFEngine, build_engine

__all__ = ["HFEngine", "build_engine"]
