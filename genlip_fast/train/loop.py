"""The training loop: AdamW with warmup + cosine, grad clip, packed batches, then "Let ViT Speak" captions."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from ..data.loader import HostSampleStream
from ..data.pipeline import build_data_loader
from ..data.tokenizer import Tokenizer, load_tokenizer
from ..model import GenLIP, get_preset
from ..model.config import ModelConfig
from .config import JobConfig, to_dict
from .schedule import warmup_cosine

log = logging.getLogger("genlip_fast.train")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model_config(cfg: JobConfig, tokenizer: Tokenizer) -> ModelConfig:
    m = cfg.model
    over = {"attn_backend": m.attn_backend, "ce_backend": m.ce_backend}
    if m.vocab_size is not None:
        over["vocab_size"] = m.vocab_size
    elif m.preset.startswith("tiny"):
        over["vocab_size"] = tokenizer.vocab_size
    elif tokenizer.vocab_size > get_preset(m.preset).vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} entries, more than the model's vocab")
    if m.drop_path is not None:
        over["drop_path"] = m.drop_path
    if m.gate is not None:
        over["gate"] = m.gate
    return get_preset(m.preset, **over)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, biases, layer scales and embeddings get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or "embed" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def ensure_demo_data(cfg: JobConfig) -> None:
    """Generate the shapes dataset where the config points when it is not there yet."""
    from ..data.webdataset import expand_shards

    try:
        expand_shards(cfg.data.train_shards)
        return
    except FileNotFoundError:
        if not cfg.data.generate_demo_data:
            raise
    from ..data.synthetic import generate_shards

    out = Path(cfg.data.train_shards).parent
    log.info("generating the shapes dataset in %s", out)
    generate_shards(out, size=cfg.data.image_size, seed=cfg.data.seed)


def caption_heldout(model: GenLIP, cfg: JobConfig, tokenizer: Tokenizer, device: torch.device) -> list[dict]:
    """Greedy captions for held-out images, beside the true ones."""
    if not cfg.data.val_shards or cfg.train.caption_samples <= 0:
        return []
    stream = HostSampleStream(cfg.data.val_shards, tokenizer, image_size=cfg.data.image_size, loop=False,
                              seed=cfg.data.seed)
    samples = []
    for s in stream:
        samples.append(s)
        if len(samples) == cfg.train.caption_samples:
            break
    model.eval()
    out = model.generate([s.patches for s in samples], [s.grid_hw for s in samples], eot_id=tokenizer.eot_id,
                         max_new_tokens=cfg.train.max_new_tokens)
    model.train()
    return [
        {"key": s.key, "true": tokenizer.decode(s.caption_ids.tolist()), "generated": tokenizer.decode(ids)}
        for s, ids in zip(samples, out)
    ]


def train(cfg: JobConfig, *, progress: bool = True) -> dict:
    """Train one process; returns ``{"losses": [...], "captions": [...]}``."""
    torch.manual_seed(cfg.train.seed)
    device = pick_device(cfg.train.device)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    ensure_demo_data(cfg)
    mcfg = build_model_config(cfg, tokenizer)
    model = GenLIP(mcfg).to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas,
                            eps=cfg.optim.eps)
    batches = build_data_loader(cfg.data, tokenizer)

    out_dir = Path(cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    metrics = open(out_dir / "metrics.jsonl", "w")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, desc="train", dynamic_ncols=True)
    losses: list[float] = []
    t0, tokens = time.perf_counter(), 0
    for step in range(cfg.train.steps):
        lr = warmup_cosine(step, total_steps=cfg.train.steps, peak_lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
                           warmup_ratio=cfg.optim.warmup_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = next(batches).to(device)
        loss = model(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf)
        opt.step()
        value = loss.item()
        losses.append(value)
        tokens += int(batch.cu_seqlens[-1])
        rate = tokens / (time.perf_counter() - t0)
        metrics.write(json.dumps({"step": step + 1, "loss": value, "lr": lr, "grad_norm": float(gnorm),
                                  "tokens_per_s": rate, "samples": batch.num_samples}) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
        elif (step + 1) % cfg.train.log_every == 0:
            log.info("step %d loss %.4f lr %.2e tokens/s %.0f", step + 1, value, lr, rate)
    if bar is not None:
        bar.close()
    metrics.close()
    skipped = batches.stream.skipped
    if skipped.total:
        log.warning("skipped %d bad samples: %s", skipped.total, skipped.counts)
    captions = caption_heldout(model, cfg, tokenizer, device)
    torch.save({"model": model.state_dict(), "model_config": mcfg.__dict__}, out_dir / "model.pt")
    return {"losses": losses, "captions": captions, "model": model}
