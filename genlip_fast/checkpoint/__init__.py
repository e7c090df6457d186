"""Everything that reads or writes a model to disk, below ``train/``, ``eval/`` and ``speak/``; it imports only
``model/``, ``data/`` and ``ops/`` (checked by the import-linter contract in pyproject.toml).

- ``format.py``: the trainer checkpoint on disk (step folders, meta.json, finding the checkpoint a path means, the
  manifest check in one process); ``manifest.py`` its checksums; ``safe_load.py`` reading its files without running
  pickled code. Writing one from every rank, and the check shared between ranks, need a process group and stay in
  ``genlip_fast/train/checkpoint.py``.
- ``load.py``: the one module that says how a model is loaded from any of its forms (trainer checkpoint or run
  folder, exported ``.safetensors``, the authors' folder) -> ``(GenLIP, InputSpec)``. It imports no conversion.
- ``official.py``: the authors' layout (weight names, config both ways, reading and writing a folder).
- Conversions, which import ``load.py``: ``export.py`` (the safetensors export and its command),
  ``convert.py`` (the authors' layout both ways, for ``python -m genlip_fast.convert``), ``hf/`` (the transformers
  package, ``export-hf``: its conversion and the remote code it copies); ``sharded.py`` writes the safetensors
  shards of the last two.
"""

from .convert import export_official, import_official
from .export import export
from .format import (
    META,
    latest_checkpoint,
    list_checkpoints,
    model_config_dict,
    move_aside,
    read_meta,
    require_passing,
    resolve_checkpoint,
    step_dir_name,
    step_folders,
    verify_checkpoint,
)
from .load import inputs_from_meta, load_checkpoint_model, load_exported, load_model, model_config_from_meta
from .official import OfficialFormatError
from .safe_load import CheckpointError, load_dcp, rng_state, set_rng_state

__all__ = ["META", "CheckpointError", "OfficialFormatError", "export", "export_official", "import_official",
           "inputs_from_meta", "latest_checkpoint", "list_checkpoints", "load_checkpoint_model", "load_dcp",
           "load_exported", "load_model", "model_config_dict", "model_config_from_meta", "move_aside", "read_meta",
           "require_passing", "resolve_checkpoint", "rng_state", "set_rng_state", "step_dir_name", "step_folders",
           "verify_checkpoint"]
