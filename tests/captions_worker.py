"""One rank of the sharded-captioning test (tests/test_eval_captions.py): the tiny model under ``apply_fsdp`` on
every rank of the process group, captions of fixed images through ``train.evaluate.generate_captions`` (the
KV-cache captioner), written to ``OUT_DIR/rank<r>.json``.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/captions_worker.py OUT_DIR STOP_WORD
"""

import json
import sys
from pathlib import Path

import torch

from genlip_fast.data import Sample
from genlip_fast.data.synthetic import WORDS
from genlip_fast.data.tokenizer import Tokenizer, build_word_tokenizer
from genlip_fast.model import GenLIP, get_preset
from genlip_fast.train.distributed import apply_fsdp, init_distributed, mixed_precision_policy, shutdown
from genlip_fast.train.evaluate import generate_captions

GRIDS = [(2, 3), (1, 1), (4, 2), (3, 3), (1, 5)]
MAX_NEW = 10


def tokenizer(stop_word: str = "<|endoftext|>") -> Tokenizer:
    """The demo vocabulary, with ``stop_word`` as the word that ends a caption."""
    return Tokenizer(build_word_tokenizer(WORDS), eot=stop_word, source="demo words")


def model_and_samples() -> tuple[GenLIP, list[Sample]]:
    """A tiny model with random weights (the same on every rank) and five images of different grid sizes."""
    torch.manual_seed(0)
    cfg = get_preset("tiny", attn_backend="reference", ce_backend="reference", vocab_size=tokenizer().vocab_size)
    model = GenLIP(cfg).eval()
    g = torch.Generator().manual_seed(1)
    samples = [Sample(torch.randn(h * w, cfg.patch_dim, generator=g), (h, w), torch.tensor([2]), key=f"img{i}")
               for i, (h, w) in enumerate(GRIDS)]
    return model, samples


def _captions(info, stop_word: str) -> list[str]:
    model, samples = model_and_samples()
    apply_fsdp(model, info.mesh, mixed_precision_policy("fp32", info.device))
    return generate_captions(model, samples, tokenizer(stop_word), MAX_NEW)


def sharded_captions(stop_word: str) -> tuple[int, list[str]]:
    """Join the process group (torchrun's, or a single process), shard the model, caption: ``(rank, captions)``."""
    info = init_distributed("cpu", "gloo")
    try:
        return info.rank, _captions(info, stop_word)
    finally:
        shutdown(info)  # collects the sharded model's reference cycles first (distributed.destroy_process_group)


if __name__ == "__main__":
    out, stop = Path(sys.argv[1]), sys.argv[2]
    rank, captions = sharded_captions(stop)
    (out / f"rank{rank}.json").write_text(json.dumps(captions))
