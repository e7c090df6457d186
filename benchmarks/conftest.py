"""Benchmarks run on a GPU (``pytest benchmarks/ --benchmark-only``); on a CPU machine only those marked ``cpu_ok``
(the data pipeline's CPU mode) run, the rest are skipped."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU")
    for item in items:
        if "cpu_ok" not in item.keywords:
            item.add_marker(skip)
