"""Benchmarks need a CUDA device; they are deselected unless run with -m benchmark."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA device")
    for item in items:
        item.add_marker(skip)
