"""Benchmarks run on a GPU only (``pytest benchmarks/ --benchmark-only``); on a CPU machine they are skipped."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU")
    for item in items:
        item.add_marker(skip)
