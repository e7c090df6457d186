"""``python -m genlip_fast.eval probe --checkpoint RUN --train DIR --val DIR``

Linear probe of a trained encoder: mean-pooled final-norm features of the frozen model on ImageFolder-layout folders
(``DIR/<class>/<image>``), a logistic regression fitted on ``--train``, top-1 accuracy on ``--val``. ``RUN`` is a run's
out_dir, a checkpoints folder, one checkpoint, or a file written by ``python -m genlip_fast.checkpoint.export``. The
model is read as ``genlip_fast.load_encoder`` reads it and features come through its vision-encoder module. Images go
through the run's own stage-1 or stage-2 transforms and pixel normalisation (from the checkpoint's config;
``--stage`` and ``--image-size`` override, and are needed for an exported file, which records only the
normalisation).

The demo's probe set (the shape of the largest object, 4 classes) is written next to the demo data::

    python -m genlip_fast.eval probe --checkpoint runs/tiny --train data/shapes/probe/train --val data/shapes/probe/val
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def load_for_eval(checkpoint: str, *, stage: int | None = None, image_size: int | None = None,
                  attn_backend: str = "auto"):
    """``(encoder, data config, description)`` of a checkpoint, run folder or exported file, on CPU: the
    :class:`~genlip_fast.speak.VisionEncoder` with the run's training transform (``stage`` / ``image_size``
    override it; an exported file, without a data config, defaults to stage 1 at 224)."""
    from ..checkpoint.load import inputs_from_meta, load_checkpoint_model, load_model
    from ..speak import VisionEncoder

    path = Path(checkpoint)
    if path.is_file():
        model, inputs = load_model(path, need_text=False)
        data, what = {}, f"{path}"
    else:
        model, meta = load_checkpoint_model(path)
        inputs = inputs_from_meta(meta)
        data, what = (meta.get("job_config") or {}).get("data", {}), f"{meta['checkpoint']} (step {meta['step']})"
    model.set_backends(attn=attn_backend)
    stage = stage or data.get("stage", 1)
    transform = dataclasses.replace(inputs.image, image_size=(image_size or data.get("image_size", 224))
                                    if stage == 1 else None)
    return VisionEncoder(model.eval(), transform), data, what


def _probe(args) -> int:
    import torch

    from ..checkpoint import CheckpointError
    from .probe import ImageFolder, probe_encoder

    try:
        train = ImageFolder.read(args.train)
        val = ImageFolder.read(args.val, classes=train.classes)
        encoder, data, what = load_for_eval(args.checkpoint, stage=args.stage, image_size=args.image_size,
                                            attn_backend=args.attn_backend)
        train_images, val_images = train.decode(encoder.transform), val.decode(encoder.transform)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"genlip-eval: {e}", file=sys.stderr)
        return 2
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    res = probe_encoder(encoder.to(device), train, val, train_images, val_images, l2=args.l2,
                        max_tokens=args.max_tokens or data.get("pack_tokens", 16384))
    res.update(classes=len(train.classes), train_images=len(train.paths), val_images=len(val.paths),
               checkpoint=what)
    if args.json:
        print(json.dumps(res))
    else:
        t = encoder.transform
        print(f"linear probe of {what}: {len(train.classes)} classes, {len(train.paths)} training / "
              f"{len(val.paths)} validation images (" + (f"stage 1, image size {t.image_size}" if t.image_size else
                                                         "stage 2, native aspect ratio") + ")")
        print(f"top-1: {100 * res['top1']:.1f}% (training images {100 * res['train_top1']:.1f}%; "
              f"chance {100 * res['chance']:.1f}%)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m genlip_fast.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="linear probe of the frozen encoder on ImageFolder-layout folders")
    p.add_argument("--checkpoint", required=True, help="run out_dir, checkpoint folder or exported .safetensors")
    p.add_argument("--train", required=True, help="ImageFolder the classifier is fitted on")
    p.add_argument("--val", required=True, help="ImageFolder the top-1 accuracy is measured on")
    p.add_argument("--l2", type=float, default=1e-3, help="L2 penalty on the classifier weights (default 1e-3)")
    p.add_argument("--stage", type=int, choices=(1, 2), default=None, help="image transform (default: the run's)")
    p.add_argument("--image-size", type=int, default=None, help="stage-1 crop size (default: the run's, else 224)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per encoded pack (default: the run's)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda' (default auto)")
    p.add_argument("--attn-backend", choices=["auto", "triton", "reference", "flex"], default="auto",
                   help="attention implementation (auto: Triton on CUDA, PyTorch on CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.l2 < 0:
        ap.error(f"--l2 = {args.l2}: must be >= 0")
    return _probe(args)


if __name__ == "__main__":
    sys.exit(main())
