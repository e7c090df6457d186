"""The training data loader: shards in, packed batches out, with a position that checkpoints save and restore."""

from __future__ import annotations

from collections.abc import Iterator

from .batch import PackedBatch
from .config import DataConfig
from .loader import HostSampleStream, packed_batches
from .packing import Packer
from .tokenizer import Tokenizer


class PackedLoader:
    """Iterator of :class:`PackedBatch` for one rank.

    ``state_dict()`` records how many packs were handed out; ``load_state_dict()`` replays the deterministic stream
    up to there, so a resumed run sees exactly the packs that come next.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, *, rank: int = 0, world_size: int = 1):
        self.cfg, self.tokenizer, self.rank, self.world_size = cfg, tokenizer, rank, world_size
        self.packs_yielded = 0
        self._reset()

    def _reset(self) -> None:
        self.stream = HostSampleStream(self.cfg.train_shards, self.tokenizer, image_size=self.cfg.image_size,
                                       seed=self.cfg.seed, rank=self.rank, world_size=self.world_size)
        self.packer = Packer(self.cfg.pack_tokens, lookahead=self.cfg.lookahead, truncate=self.cfg.truncate_captions)
        self._it = packed_batches(iter(self.stream), self.packer)

    def __iter__(self) -> Iterator[PackedBatch]:
        return self

    def __next__(self) -> PackedBatch:
        batch = next(self._it)
        self.packs_yielded += 1
        return batch

    def state_dict(self) -> dict:
        return {"packs_yielded": self.packs_yielded, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        self._reset()
        self.packs_yielded = 0
        for _ in range(int(state["packs_yielded"])):
            next(self)


def build_data_loader(cfg: DataConfig, tokenizer: Tokenizer, *, rank: int = 0, world_size: int = 1) -> PackedLoader:
    return PackedLoader(cfg, tokenizer, rank=rank, world_size=world_size)
