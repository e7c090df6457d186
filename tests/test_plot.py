"""``python -m genlip_fast.train.plot RUN_DIR -o curves.png`` draws the expected panels from a run's metrics.jsonl
(issue 17)."""

import json
import math

import pytest

pytest.importorskip("matplotlib")

from PIL import Image  # noqa: E402

from genlip_fast.train.plot import main, plot_run  # noqa: E402


def write_run(run, steps=30, eval_every=10):
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            row = {"step": s, "loss": 3.0 * math.exp(-s / 10), "lr": 1e-3 * min(1.0, s / 5), "tokens_per_s": 900.0 + s,
                   "skipped": False}
            if s == 7:
                row["loss"] = float("nan")  # a skipped step: a gap, not an error
            if eval_every and s % eval_every == 0:
                row.update(val_loss=row["loss"] * 1.1, probe_top1=0.25 + s / 100, probe_train_top1=0.5 + s / 100,
                           val_bleu4=s / 40, val_cider=s / 10, val_exact_match=s / 50, eval_time_s=0.5)
            f.write(json.dumps(row) + "\n")


def test_plot_writes_a_png_with_the_expected_panels(tmp_path, capsys):
    write_run(tmp_path / "run")
    out = tmp_path / "curves.png"
    assert main([str(tmp_path / "run"), "-o", str(out)]) == 0
    assert "loss, learning rate, tokens/s, probe top-1, captioning" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (800, 5 * 240)  # 8 x 2.4 inches per panel at 100 dpi

    write_run(tmp_path / "plain", eval_every=0)
    titles = plot_run(tmp_path / "plain", tmp_path / "plain.png")
    assert titles == ["loss", "learning rate", "tokens/s"]
    with Image.open(tmp_path / "plain.png") as im:
        assert im.size == (800, 3 * 240)


def test_plot_names_a_missing_metrics_file(tmp_path, capsys):
    assert main([str(tmp_path / "nothing")]) == 2
    assert str(tmp_path / "nothing" / "metrics.jsonl") in capsys.readouterr().err
