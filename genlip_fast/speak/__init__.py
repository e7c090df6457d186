"""Let ViT Speak: KV-cache captioning, the patch-semantics readout and the vision-encoder module.

``python -m genlip_fast.speak IMAGE... --checkpoint PATH`` captions, ``... readout IMAGE ...`` shows what each patch
says, ``... features INPUT ...`` writes features of a folder or shards (``features.py``);
``genlip_fast.load_encoder(PATH)`` returns a :class:`VisionEncoder`.
"""

from .encoder import EncoderOutput, VisionEncoder
from .generate import KVCache, Sampling, generate, sample_next, top_p_filter
from ..data.inputs import ImageTransform, InputSpec

__all__ = ["EncoderOutput", "ImageTransform", "InputSpec", "KVCache", "Sampling", "VisionEncoder", "generate",
           "sample_next", "top_p_filter"]
