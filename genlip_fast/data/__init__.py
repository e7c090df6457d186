"""Data: the packed batch, packing, tokenizers, shards and loaders."""

from .batch import IGNORE_INDEX, PackedBatch, Sample
from .packing import Packer, SampleTooLongError, pack_images, pack_samples

__all__ = ["IGNORE_INDEX", "PackedBatch", "Packer", "Sample", "SampleTooLongError", "pack_images", "pack_samples"]
