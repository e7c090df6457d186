"""``python -m genlip_fast.speak``: caption images, show what each patch says, or write features of many images.

    python -m genlip_fast.speak IMAGE... --checkpoint PATH [--prompt TEXT] [--max-new-tokens N] [--top-p P]
    python -m genlip_fast.speak readout IMAGE --checkpoint PATH --out readout.png [--top-k K]
    python -m genlip_fast.speak features INPUT --checkpoint PATH --out DIR [--patches] [--layer N]  (features.py)

PATH is a training run (its latest checkpoint), a checkpoint folder, an exported ``.safetensors`` file, or a folder
in the authors' layout (config.json + safetensors). Images are preprocessed as the checkpoint's own: native aspect
ratio (16–1024 patches, stage 2's rule) for genlip_fast runs, the authors' processor for their weights;
``--image-size N`` asks for a fixed square, ``native`` for the native aspect ratio. The tokenizer, prompt, stop
words and pixel statistics are the checkpoint's own (the authors' weights: Qwen tokenizer, "Describe the image in
detail.", ``<|im_end|>``, mean = std = 0.5).

Checkpoints load through ``genlip_fast.checkpoint.load`` (this command line and :func:`~.encoder.load_encoder`);
the rest of ``speak/`` imports only the model, data and ops.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..data.inputs import image_size_arg

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder, .safetensors, or the "
                                                        "authors' HF folder")
    ap.add_argument("--image-size", type=image_size_arg, default=None,
                    help="N: a fixed N x N square (genlip_fast: shorter side + centre crop; the authors' weights: "
                         "squash); 'native': native aspect ratio; default: the checkpoint's own preprocessing")
    ap.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--attn-backend", choices=["auto", "triton", "reference", "flex"], default="auto",
                    help="prefix-LM attention implementation (auto: Triton on CUDA, PyTorch on CPU)")


def _common(ap: argparse.ArgumentParser) -> None:
    _model_args(ap)
    ap.add_argument("--decode", choices=["pillow", "dali"], default="pillow", help="image decoder")
    ap.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer ('demo', 'qwen', path)")


def _device_dtype(args) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    return device, DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)


def _setup(args):
    from ..checkpoint.load import load_model
    from ..data.tokenizer import load_tokenizer

    device, dtype = _device_dtype(args)
    model, inputs = load_model(args.checkpoint)
    model.set_backends(attn=args.attn_backend)
    model = model.to(device=device, dtype=dtype)
    tok = load_tokenizer(args.tokenizer or inputs.tokenizer)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.source} has {tok.vocab_size} entries, more than the model's "
                         f"{model.cfg.vocab_size}; pass the checkpoint's tokenizer with --tokenizer")
    return model, inputs, tok, inputs.image.sized(args.image_size)


def _read(paths: list[str]) -> list[bytes]:
    out = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"no image file at {p}")
        out.append(Path(p).read_bytes())
    return out


def caption_main(argv: list[str]) -> int:
    from .generate import Sampling, generate

    ap = argparse.ArgumentParser(prog="python -m genlip_fast.speak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, ...)")
    _common(ap)
    ap.add_argument("--prompt", default=None, help="text after the image; default: the checkpoint's ('' = none)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64, help="images captioned together")
    args = ap.parse_args(argv)
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    model, inputs, tok, transform = _setup(args)
    prompt = inputs.prompt if args.prompt is None else args.prompt
    prompt_ids = tok.encode(prompt) if prompt else None
    stop = {tok.eot_id} | {i for s in inputs.stop if (i := tok.token_to_id(s)) is not None}
    for start in range(0, len(args.images), args.batch_size):
        names = args.images[start:start + args.batch_size]
        decoded = transform.decode(_read(names), args.decode)
        captions = generate(model, [p for p, _ in decoded], [g for _, g in decoded], stop_ids=stop,
                            prompt_ids=prompt_ids, max_new_tokens=args.max_new_tokens, sampling=sampling)
        for name, ids in zip(names, captions):
            ids = ids[:next((j for j, t in enumerate(ids) if t in stop), len(ids))]
            print(f"{name}: {tok.decode(ids)}", flush=True)
    return 0


def readout_main(argv: list[str]) -> int:
    from ..data.inputs import open_image
    from .readout import draw_readout, patch_top_words, readout_json

    ap = argparse.ArgumentParser(prog="python -m genlip_fast.speak readout",
                                 description="Top words per patch (paper §4.6.2), as a PNG and as JSON.")
    ap.add_argument("image", help="one image file")
    _common(ap)
    ap.add_argument("--out", default="readout.png", help="the picture (PNG)")
    ap.add_argument("--json", default=None, help="the JSON (default: --out with .json)")
    ap.add_argument("--top-k", type=int, default=5, help="words per patch in the JSON")
    ap.add_argument("--cell", type=int, default=48, help="pixels per patch in the picture")
    args = ap.parse_args(argv)
    model, _, tok, transform = _setup(args)
    resized = transform.resize(open_image(args.image))
    patches, grid = transform.to_patches(resized)
    probs, ids = patch_top_words(model, patches, grid, args.top_k)
    doc = readout_json(args.image, grid, probs, ids, tok)
    picture = draw_readout(resized, grid, [p["top"][0]["token"] for p in doc["patches"]], cell=args.cell)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out, format="PNG")
    json_path = Path(args.json) if args.json else out.with_suffix(".json")
    json_path.write_text(json.dumps(doc, indent=1, ensure_ascii=False))
    print(f"wrote {out} ({picture.width}x{picture.height}, grid {grid[0]}x{grid[1]}) and {json_path}")
    return 0


def features_main(argv: list[str]) -> int:
    from ..checkpoint.load import origin
    from . import features
    from .encoder import load_encoder

    ap = argparse.ArgumentParser(prog="python -m genlip_fast.speak features", description=features.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="a folder of images (searched recursively) or shards (.tar, .parquet; local or "
                                  "remote): a file, a glob, a folder holding shards, a brace range, a comma list")
    _model_args(ap)
    ap.add_argument("--out", required=True, help="output folder (a rerun continues it)")
    ap.add_argument("--batch-size", type=int, default=64, help="images encoded together")
    ap.add_argument("--shard-size", type=int, default=10000,
                    help="images per output shard of a folder input (shards: one output shard per input shard)")
    ap.add_argument("--patches", action="store_true", help="also write every patch's features")
    ap.add_argument("--layer", type=int, default=None,
                    help="use this block's output (0 = the first, -1 = the last, before the final norm); "
                         "default: the final-norm features")
    ap.add_argument("--norm", action="store_true", help="pass --layer's output through the final norm")
    ap.add_argument("--out-dtype", choices=sorted(features.OUT_DTYPES), default="float32", help="dtype of the files")
    ap.add_argument("--meta", choices=["jsonl", "parquet"], default="jsonl", help="metadata format")
    ap.add_argument("--workers", type=int, default=4, help="threads decoding images")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.norm and args.layer is None:
        ap.error("--norm needs --layer (the default features are the final norm's already)")
    device, dtype = _device_dtype(args)
    # A run folder means its latest checkpoint: fix which one here and record it, so a rerun after training saved a
    # newer one refuses to continue the folder rather than mix two checkpoints' features.
    read = origin(args.checkpoint)["path"]
    encoder = load_encoder(read, dtype=dtype, device=device, image_size=args.image_size,
                           attn_backend=args.attn_backend)
    n = len(encoder.model.blocks)
    if args.layer is not None and not -n <= args.layer < n:
        ap.error(f"--layer {args.layer}: the model has {n} blocks (0..{n - 1} or -{n}..-1)")
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    job = features.FeatureJob(checkpoint=read, layer=args.layer, norm=args.norm, patches=args.patches,
                              out_dtype=args.out_dtype, meta=args.meta, image_size=args.image_size, dtype=dtype_name)
    c = features.extract(encoder, job, args.input, args.out, shard_size=args.shard_size, batch_size=args.batch_size,
                         workers=args.workers, progress=not args.no_progress)
    print(f"{args.out}: {c['written']} shard(s) written, {c['skipped']} complete already; {c['encoded']} images "
          f"encoded, {c['failed']} failed (their metadata rows say why)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "readout":
            return readout_main(argv[1:])
        if argv and argv[0] == "features":
            return features_main(argv[1:])
        return caption_main(argv)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"genlip_fast.speak: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
