"""Benchmarks run on a GPU (``pytest benchmarks/ --benchmark-only``); on a CPU machine only those marked ``cpu_ok``
(the data pipeline's CPU mode) run, the rest are skipped. After pytest-benchmark's timing table, the run ends with
one table per benchmark file of the derived figures (``summarize.py``): useful TFLOP/s or throughput, peak memory
and the speed-up over the file's baseline in the same run."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU")
    for item in items:
        if "cpu_ok" not in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own table
def pytest_terminal_summary(terminalreporter, config):
    from summarize import terminal_tables

    session = getattr(config, "_benchmarksession", None)
    benches = [b.as_dict(include_data=False) for b in getattr(session, "benchmarks", []) if not b.has_error]
    if benches:
        terminalreporter.write_sep("-", "derived figures (benchmarks/summarize.py)")
        for line in terminal_tables(benches):
            terminalreporter.write_line(line)
