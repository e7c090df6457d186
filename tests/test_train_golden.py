"""Golden losses: the tiny preset, 8 steps, CPU, fp32, reference kernels — catches silent trainer regressions.

The file holds the per-step losses of ``tiny_config(make_shapes(...), steps=8)`` (see tests/tiny_run.py).
A deliberate change to the model, trainer, schedule or generated data changes them; regenerate with

    GENLIP_UPDATE_GOLDEN=1 python -m pytest tests/test_train_golden.py

and say why in the commit. Across CPUs, fp32 matmul rounding differs at ~1e-7, so the check allows 1e-4 relative:
far below what any real change (LR, schedule, normalisation, masking, init) moves the losses by.
"""

import json
import os
from pathlib import Path

import torch

from genlip_fast.train.trainer import train
from tiny_run import tiny_config

GOLDEN = Path(__file__).parent / "assets" / "losses" / "tiny.json"
STEPS = 8


def test_tiny_losses_match_the_golden_file(shapes, tmp_path):
    cfg = tiny_config(shapes, tmp_path / "run", steps=STEPS, checkpoint__final=False)
    losses = train(cfg, progress=False)["losses"]
    if os.environ.get("GENLIP_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({
            "description": "tiny preset, 256-token packs, reference kernels, fp32, CPU, seed 0; per-step loss",
            "steps": STEPS, "losses": losses}, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())["losses"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(golden), rtol=1e-4, atol=0)
    assert losses[-1] < losses[0]
