"""Held-out captions go through the KV-cache captioner (``genlip_fast.speak.generate``), also under FSDP2: on 1 and
2 ranks (gloo) the sharded model's greedy captions equal the unsharded recompute oracle's (``GenLIP.generate``)
word for word, on every rank, with samples that stop at different steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from captions_worker import GRIDS, MAX_NEW, model_and_samples, sharded_captions, tokenizer

WORKER = Path(__file__).resolve().parent / "captions_worker.py"
REPO = WORKER.parent.parent


@pytest.fixture(scope="module")
def oracle():
    """The recompute path on the unsharded model: a stop word it really produces mid-caption, and its captions."""
    model, samples = model_and_samples()
    patches, grids = [s.patches for s in samples], [s.grid_hw for s in samples]
    free = model.generate(patches, grids, eot_id=-1, max_new_tokens=MAX_NEW)
    stop_id = free[1][2]
    tok = tokenizer(tokenizer().id_to_token(stop_id))
    want = model.generate(patches, grids, eot_id=stop_id, max_new_tokens=MAX_NEW)
    lengths = [len(c) for c in want]
    assert min(lengths) < MAX_NEW == max(lengths), lengths  # some stop early, some run to the limit
    return tok.id_to_token(stop_id), [tok.decode(c) for c in want]


def test_one_rank_fsdp_captions_equal_the_recompute_oracle(oracle, monkeypatch):
    from genlip_fast.model import GenLIP

    stop, want = oracle

    def recompute(*a, **k):
        raise AssertionError("held-out captions must come from the KV-cache captioner, not GenLIP.generate")

    monkeypatch.setattr(GenLIP, "generate", recompute)
    rank, got = sharded_captions(stop)
    assert rank == 0 and got == want and len(set(want)) > 1


def test_two_ranks_agree_with_each_other_and_the_oracle(oracle, tmp_path):
    stop, want = oracle
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(tmp_path), stop]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0] == got[1] == want and len(got[0]) == len(GRIDS)
