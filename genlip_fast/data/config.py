"""Data configuration (the ``[data]`` section of a job config)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    train_shards: str = "data/shapes/train-*.tar"
    """Training shards: a path, glob or folder of webdataset .tar files."""
    val_shards: str = "data/shapes/val-*.tar"
    """Held-out shards, captioned by the model at the end of the run ('' = none)."""
    generate_demo_data: bool = True
    """Generate the shapes dataset at the shard paths' folder when no shard is there yet."""
    tokenizer: str = "demo"
    """'demo', 'qwen', or a local tokenizer.json path; nothing is downloaded."""
    image_size: int = 64
    """Stage-1 square input size in pixels (the paper: 224)."""
    pack_tokens: int = 1024
    """Tokens per pack (the paper: 16384)."""
    lookahead: int = 1
    """Samples buffered for best-fit packing (1 = greedy, fine for stage 1)."""
    truncate_captions: bool = False
    """Cut captions of samples longer than a pack instead of failing."""
    seed: int = 0
    """Shuffle seed of the sample stream."""
