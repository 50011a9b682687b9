"""kindred's modules: thin layers that validate and call kindred.ops."""

from .linear4bit import Linear4bit
from .loss import LinearCrossEntropyLoss

__all__ = ["Linear4bit", "LinearCrossEntropyLoss"]
