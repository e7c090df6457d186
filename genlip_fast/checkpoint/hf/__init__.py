"""A genlip_fast model as a transformers package: ``python -m genlip_fast.convert export-hf CKPT OUT`` writes a
folder that ``AutoModel`` / ``AutoImageProcessor.from_pretrained(OUT, trust_remote_code=True)`` load, offline.

- ``export.py``: the conversion (config, preprocessor config, vision-only safetensors, the code files below).
- ``configuration_genlip_fast.py``, ``modeling_genlip_fast.py``, ``image_processing_genlip_fast.py``: the remote
  code copied into every export. They import only torch, numpy, Pillow, transformers and the standard library, never
  genlip_fast, so this package's ``__init__`` imports none of them.
"""

from .export import export_hf, hf_config, preprocessor_config

__all__ = ["export_hf", "hf_config", "preprocessor_config"]
