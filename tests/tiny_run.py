"""Small, fast training setups for the tests.

``make_shapes(dir)`` writes a few generated shards; ``tiny_config(data_dir, out_dir, ...)`` is the tiny preset on
them with 256-token packs and the reference (CPU) kernels, so a step takes a fraction of a second on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

from genlip_fast.train.config import JobConfig, load_config


def make_shapes(data_dir: str | Path, *, num_train: int = 240, per_shard: int = 60, num_val: int = 8) -> Path:
    """Generated shapes shards (4 training shards by default, so up to 4 data streams have their own)."""
    from genlip_fast.data.synthetic import generate_shards

    data_dir = Path(data_dir)
    if not any(data_dir.glob("train-*.tar")):
        generate_shards(data_dir, num_train=num_train, num_val=num_val, per_shard=per_shard, size=64, seed=0)
    return data_dir


def tiny_overrides(data_dir: str | Path, out_dir: str | Path, *, steps: int = 6, pack_tokens: int = 256,
                   **extra) -> list[str]:
    """``--section.key=value`` strings for the tiny test run; ``extra`` as ``section__key=value``."""
    over = {
        "data.train_shards": f"{data_dir}/train-*.tar",
        "data.val_shards": "",
        "data.pack_tokens": pack_tokens,
        "model.attn_backend": "reference",
        "model.ce_backend": "reference",
        "train.steps": steps,
        "train.out_dir": str(out_dir),
        "train.tensorboard": False,
        "train.caption_samples": 0,
        "train.device": "cpu",
        "optim.warmup_ratio": 0.2,
        "checkpoint.final": True,
        "eval.every": 0,
    }
    over.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"--{k}={v}" for k, v in over.items()]


def tiny_config(data_dir: str | Path, out_dir: str | Path, **kw) -> JobConfig:
    return load_config("tiny", tiny_overrides(data_dir, out_dir, **kw))


def tiny_estimate(data_dir: str | Path, world_size: int) -> int:
    """The trainer's estimate of one checkpoint of the tiny test run (what start-up checks room for)."""
    import torch

    from genlip_fast.data.tokenizer import load_tokenizer
    from genlip_fast.model import GenLIP
    from genlip_fast.train.checkpoint import estimate_checkpoint_bytes
    from genlip_fast.train.trainer import build_model_config, build_optimizer

    cfg = tiny_config(data_dir, "unused")
    model = GenLIP(build_model_config(cfg, load_tokenizer(cfg.data.tokenizer)))
    return estimate_checkpoint_bytes(model, build_optimizer(cfg, model, torch.device("cpu")), world_size=world_size)


def run_cli(capsys, data_dir: str | Path, out_dir: str | Path, *extra: str, **over) -> tuple[int, str]:
    """``python -m genlip_fast.train --no-progress`` on the tiny test run, in this process: (exit status, stderr)."""
    from genlip_fast.train.__main__ import main

    rc = main(["--no-progress", *tiny_overrides(data_dir, out_dir, **over), *extra])
    return rc, capsys.readouterr().err


def one_line(err: str, prefix: str) -> str:
    """The one ``genlip-train:`` line of ``err``, which must start with ``prefix``; no traceback anywhere."""
    lines = [line for line in err.splitlines() if line.startswith("genlip-train:")]
    assert len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in err, err
    return lines[0]


def recap_layout_shard(path: str | Path, n: int = 48) -> Path:
    """A shard whose captions are where no default looks: ``jpg`` + ``json`` with Recap-DataComp's ``re_caption``
    (no ``txt``, ``caption`` or conversation), so none of its records has a caption unless ``data.caption`` says
    ``json:re_caption``."""
    import json

    from genlip_fast.data.synthetic import photo_jpeg
    from genlip_fast.data.webdataset import write_shard

    meta = {"re_caption": "a small photo of some shapes .", "url": "https://example.com/x.jpg"}
    write_shard(path, [(f"k{i:04d}", {"jpg": photo_jpeg(96, 80, i), "json": json.dumps(meta).encode()})
                       for i in range(n)])
    return Path(path)
