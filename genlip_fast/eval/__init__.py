"""Evaluation of a GenLIP model: captioning metrics and a linear probe of the frozen encoder.

A floor between ``train/`` and ``model/``: the trainer's periodic evaluation (``train/evaluate.py``) and the
``python -m genlip_fast.eval`` command use it; it imports ``data/`` and reads features through the vision-encoder
API (``speak/``).
"""

from .captioning import caption_metrics, normalize
from .probe import ImageFolder, LinearProbe, encoder_features, fit_linear_probe, linear_probe, probe_encoder

__all__ = ["ImageFolder", "LinearProbe", "caption_metrics", "encoder_features", "fit_linear_probe", "linear_probe",
           "normalize", "probe_encoder"]
