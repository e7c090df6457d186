"""A linear probe of the frozen encoder: mean-pooled final-norm features -> logistic regression -> top-1 accuracy.

The paper judges its encoder by probes of frozen features (§4, attentive probing on ImageNet-1K); this is the small,
cheap version that runs during training and on a laptop: each image's final-LayerNorm features (image tokens only,
full attention), averaged over its patches, and a multinomial logistic regression fitted on them.

The classifier is a few lines of PyTorch rather than scikit-learn (which, with SciPy, would add ~100 MB of
dependencies for one function): features standardised with the training set's mean and std, cross entropy plus
``l2 / 2 * ||W||^2``, minimised by full-batch L-BFGS in float64 from zeros. The objective is strictly convex in the
weights, so the fit is deterministic and does not depend on an initialisation or a learning rate.

Images come from ImageFolder-layout folders (``DIR/<class>/<image>``), turned into patches as the run's training
data are (:class:`~genlip_fast.speak.ImageTransform`: its geometry and pixel normalisation), and their features
come from the vision-encoder API (:class:`~genlip_fast.speak.VisionEncoder`), the same path a user of the trained
encoder takes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.inputs import open_image
from ..data.reader import IMAGE_EXTS
from ..speak import ImageTransform, VisionEncoder

log = logging.getLogger(__name__)

Image = tuple[torch.Tensor, tuple[int, int]]
"""One decoded image: ``(patches (grid_h * grid_w, C * p * p) float32, (grid_h, grid_w))``."""


@dataclass
class ImageFolder:
    """The files of an ImageFolder-layout directory: ``root/<class>/<image>``, classes in sorted order."""

    root: Path
    classes: list[str]
    paths: list[Path]
    labels: list[int]

    @classmethod
    def read(cls, root: str | Path, classes: Sequence[str] | None = None) -> "ImageFolder":
        """List ``root``'s images (``.jpg``, ``.jpeg``, ``.png``, ``.webp``; other files are ignored). ``classes``
        fixes the class list (a validation folder takes its training folder's); a class folder not in it is an
        error, as are a missing ``root``, no class folders, or a class folder without images."""
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"probe images: {str(root)!r} is not a folder (expected ImageFolder layout: "
                                    f"DIR/<class>/<image>)")
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not found:
            raise ValueError(f"probe images: {str(root)!r} has no class folders (expected DIR/<class>/<image>)")
        if classes is None:
            classes = found
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"probe images: {str(root)!r} has classes {unknown} that the training folder lacks "
                             f"(known: {list(classes)})")
        paths, labels, empty = [], [], []
        for name in found:
            files = sorted(p for p in (root / name).iterdir()
                           if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS)
            if not files:
                empty.append(name)
            paths += files
            labels += [list(classes).index(name)] * len(files)
        if empty:
            raise ValueError(f"probe images: class folders {empty} in {str(root)!r} hold no .jpg/.jpeg/.png/.webp "
                             f"images")
        return cls(root, list(classes), paths, labels)

    def decode(self, transform: ImageTransform) -> list[Image]:
        """Every image through ``transform`` (the run's: stage 1 resize + centre crop or stage 2 native aspect, and
        its pixel normalisation); an unreadable file is an error naming it (a skipped image would change the
        accuracy's denominator)."""
        out = []
        for p in self.paths:
            try:
                out.append(transform(open_image(p)))
            except ValueError as e:
                raise ValueError(f"probe image {str(p)!r}: {e}") from None
        return out


@torch.no_grad()
def encoder_features(encoder: VisionEncoder, images: Sequence[Image], *, max_tokens: int = 16384) -> torch.Tensor:
    """``(N, d)`` float32 (CPU): each image's final-LayerNorm features from the vision encoder (image tokens only,
    full attention; one packed pass per group), averaged over its patches. Images are encoded a pack of at most
    ``max_tokens`` tokens at a time (an image larger than that goes alone). Every rank of a sharded model must call
    it with the same images."""
    feats: list[torch.Tensor] = []
    group: list[Image] = []

    def flush():
        feats.extend(h.float().mean(0).cpu() for h in encoder([p for p, _ in group], [g for _, g in group]))
        group.clear()

    used = 0
    for img in images:
        n = img[0].shape[0]
        if group and used + n > max_tokens:
            flush()
            used = 0
        group.append(img)
        used += n
    if group:
        flush()
    if not feats:
        raise ValueError("no images to encode")
    return torch.stack(feats)


@dataclass
class LinearProbe:
    """A fitted multinomial logistic regression on standardised features."""

    mean: torch.Tensor
    """``(d,)`` float64 training-feature mean."""
    std: torch.Tensor
    """``(d,)`` float64 training-feature std (floored at 1e-6)."""
    weight: torch.Tensor
    """``(C, d)`` float64."""
    bias: torch.Tensor
    """``(C,)`` float64."""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` float64 class scores of ``(N, d)`` features."""
        return ((x.double() - self.mean) / self.std) @ self.weight.T + self.bias

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Top-1 accuracy on ``(N, d)`` features and ``(N,)`` int64 labels."""
        return (self.logits(x).argmax(1) == y).double().mean().item()


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, l2: float = 1e-3,
                     max_iter: int = 500) -> LinearProbe:
    """Fit :class:`LinearProbe` to ``(N, d)`` features and ``(N,)`` int64 labels in ``[0, num_classes)``: minimise
    ``mean cross entropy + l2 / 2 * ||W||^2`` (bias not penalised) by full-batch L-BFGS, float64, from zeros."""
    if x.dim() != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"features must be (N, d) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    x = x.detach().double().cpu()
    y = y.detach().long().cpu()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                            tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(objective)
    return LinearProbe(mean, std, weight.detach(), bias.detach())


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, *, l2: float = 1e-3) -> dict[str, float]:
    """Fit on the training features, score both splits: ``{"top1", "train_top1", "chance"}`` (fractions; chance is
    the share of the most frequent class in the validation labels)."""
    probe = fit_linear_probe(train_x, train_y, num_classes, l2=l2)
    chance = torch.bincount(val_y, minlength=num_classes).max().item() / max(1, val_y.numel())
    return {"top1": probe.accuracy(val_x, val_y), "train_top1": probe.accuracy(train_x, train_y), "chance": chance}


def probe_encoder(encoder: VisionEncoder, train: ImageFolder, val: ImageFolder, train_images: Sequence[Image],
                  val_images: Sequence[Image], *, l2: float = 1e-3, max_tokens: int = 16384) -> dict[str, float]:
    """Features of both folders' decoded images (:func:`encoder_features`), then :func:`linear_probe`."""
    tx = encoder_features(encoder, train_images, max_tokens=max_tokens)
    vx = encoder_features(encoder, val_images, max_tokens=max_tokens)
    return linear_probe(tx, torch.tensor(train.labels), vx, torch.tensor(val.labels), len(train.classes), l2=l2)


__all__ = ["ImageFolder", "LinearProbe", "encoder_features", "fit_linear_probe", "linear_probe", "probe_encoder"]
