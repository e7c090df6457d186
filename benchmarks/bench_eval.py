"""Cost of one evaluation during training (train/evaluate.py), part by part, for the tiny demo config on CPU.

The demo's evaluation: validation loss on the held-out packs, greedy captions of 16 held-out images (BLEU-4,
CIDEr), and the linear probe on the generated 200 + 100 probe images; beside it, one training step's forward and
backward on one pack, for scale. The untrained model is the dearest case (its captions never end early).
Runs on one thread, and ``extra_info`` records CPU seconds beside the wall time: on a machine shared with other jobs
the CPU time of one thread is the figure that means something. ::

    pytest benchmarks/bench_eval.py --benchmark-only
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from genlip_fast.data.pipeline import build_data_loader
from genlip_fast.data.synthetic import generate_probe_set, generate_shards
from genlip_fast.data.tokenizer import load_tokenizer
from genlip_fast.model import GenLIP
from genlip_fast.train.config import load_config
from genlip_fast.train.evaluate import Evaluator
from genlip_fast.train.trainer import build_model_config

CACHE = Path(os.environ.get("BENCH_EVAL_DIR", "/tmp/genlip_bench_eval"))
PARTS = ("val_loss", "captions", "probe", "all", "train_step")

pytestmark = pytest.mark.cpu_ok


@pytest.fixture(scope="module")
def setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if not (CACHE / "done").is_file():
        shutil.rmtree(CACHE, ignore_errors=True)  # an interrupted earlier run's partial cache
        generate_shards(CACHE, size=64)  # the demo's data: 4,000 training and 64 held-out images
        generate_probe_set(CACHE / "probe", size=64)
        (CACHE / "done").write_text("ok")
    cfg = load_config("tiny", [f"--data.train_shards={CACHE}/train-*.tar", f"--data.val_shards={CACHE}/val-*.tar",
                               "--train.device=cpu"])
    tok = load_tokenizer(cfg.data.tokenizer)
    evaluator = Evaluator(cfg, tok, SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu")))
    torch.manual_seed(0)
    model = GenLIP(build_model_config(cfg, tok))
    loader = build_data_loader(cfg.data, tok)
    pack = next(loader)
    loader.close()
    yield cfg, evaluator, model, pack
    torch.set_num_threads(threads)


def _part(evaluator: Evaluator, name: str):
    """An evaluator that runs only ``name`` (or everything)."""
    if name == "all":
        return evaluator
    only = copy.copy(evaluator)
    only.slots = evaluator.slots if name == "val_loss" else 0
    only.samples = evaluator.samples if name == "captions" else []
    only.probe = evaluator.probe if name == "probe" else None
    return only


@pytest.mark.parametrize("part", PARTS)
def test_eval_cost(benchmark, setup, part):
    cfg, evaluator, model, pack = setup
    if part == "train_step":
        model.train()

        def fn():
            model(pack).backward()
            model.zero_grad(set_to_none=True)
    else:
        ev = _part(evaluator, part)

        def fn():
            return ev(cfg.eval.every, model)

    cpu = []

    def timed():
        c = time.process_time()
        fn()
        cpu.append(time.process_time() - c)

    benchmark.pedantic(timed, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        name=f"eval/{part}", device=f"CPU ({os.cpu_count()} cores)", torch=torch.__version__,
        torch_threads=torch.get_num_threads(), median_ms=benchmark.stats.stats.median * 1e3,
        cpu_s=sorted(cpu)[len(cpu) // 2], load_avg=round(os.getloadavg()[0], 1),
        held_out_tokens=sum(int(p.cu_seqlens[-1]) for p in evaluator.mine), captions=len(evaluator.samples),
        probe_images=sum(len(f.paths) for f in evaluator.probe[:2]),
    )
