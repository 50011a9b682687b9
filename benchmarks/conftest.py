"""Benchmarks are deselected unless run with -m benchmark. Most need a CUDA device; a module that sets
RUNS_ON_CPU = True runs its benchmarks without one, except those marked gpu."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA device")
    for item in items:
        cpu_module = getattr(getattr(item, "module", None), "RUNS_ON_CPU", False)
        if "gpu" in item.keywords or not cpu_module:
            item.add_marker(skip)
