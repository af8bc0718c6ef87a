"""The continuous-batching engine for Hugging Face causal LMs (`--engine hf`), and what only it
needs: loading models (models.py), detokenizing (detokenizer.py), scoring outside the steps
(scoring.py).

Importing this package loads no torch until the engine itself is asked for, so the command
line can read models.py's choices (DTYPES, QUANTIZATIONS) without it.
"""

__all__ = ["HFEngine", "build_engine"]


def __getattr__(name):
    if name in __all__:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(name)
