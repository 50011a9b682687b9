"""kindred: fast, lean, predictable QLoRA fine-tuning of small LLMs on one GPU.

The public API: ``kindred.ops`` (functional ops on torch tensors), ``kindred.nn`` (modules),
``kindred.formats`` (checkpoint formats), ``kindred.models`` (decoders built from HF configs),
``kindred.plan`` (model catalogue and estimates), ``kindred.data`` (chat templates, tokenizers, token budgets,
packing), ``kindred.train`` (the QLoRA trainer; ``kindred.train(cfg)``), ``kindred.generate`` (batched
generation), ``kindred.eval`` (test batteries, base vs tuned, reports, blind comparison), ``kindred.export``,
``kindred.bakeoff`` (candidate models through one protocol: plan, eval, fine-tune, eval, blind comparison).
Subpackages are imported on first use (so ``kindred --help`` does not import torch).
"""

import importlib

from .errors import KindredError, KindredFormatError, KindredValueError

__version__ = "0.1.0"
_SUBPACKAGES = (
    "bakeoff",
    "data",
    "eval",
    "export",
    "formats",
    "generate",
    "models",
    "nn",
    "ops",
    "plan",
    "train",
)
__all__ = [
    "KindredError",
    "KindredFormatError",
    "KindredValueError",
    "cuda_compiled",
    "doctor",
    "sentencepiece_compiled",
    *_SUBPACKAGES,
]


# The compiled core loads on first use too: on an H200 machine, torch imported after the core segfaulted
# (kindred doctor, at 12e74fc), and ``import kindred`` then ``import torch`` is every notebook's first cell.
_CORE_NAMES = ("cuda_compiled", "sentencepiece_compiled")


def __getattr__(name: str):
    if name in _CORE_NAMES:
        return getattr(importlib.import_module("._core", __name__), name)
    if name == "doctor":  # kindred.doctor() reads every layer: imported on first use
        return importlib.import_module(".installation", __name__).doctor
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'kindred' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBPACKAGES))
