"""kindred: fast, lean, predictable QLoRA fine-tuning of small LLMs on one GPU.

The public API: ``kindred.ops`` (functional ops on torch tensors), ``kindred.nn`` (modules),
``kindred.formats`` (checkpoint formats), ``kindred.models`` (decoders built from HF configs),
``kindred.plan`` (model catalogue and estimates), ``kindred.data`` (chat templates, tokenizers, token budgets,
packing), ``kindred.train`` (the QLoRA trainer; ``kindred.train(cfg)``), ``kindred.eval`` (test batteries,
base vs tuned, reports, blind comparison), ``kindred.export`` (merged weights).
"""

from . import data, eval, export, formats, models, nn, ops, train
from ._core import cuda_compiled, sentencepiece_compiled
from .errors import KindredError, KindredFormatError, KindredValueError

__version__ = "0.1.0"
__all__ = [
    "KindredError",
    "KindredFormatError",
    "KindredValueError",
    "cuda_compiled",
    "data",
    "eval",
    "export",
    "formats",
    "models",
    "nn",
    "ops",
    "sentencepiece_compiled",
    "train",
]
