"""Patch-semantics readout (paper §4.6.2): what word each image patch "says".

The LM head is applied to the final hidden state of every image token; the top-k words per patch are drawn over the
image (each patch tinted by its top word, the word written in it, a legend of the words below) and listed in JSON.
Image tokens attend only to image tokens, so an image-only pass gives exactly their states in ``[image | text]``.
"""

from __future__ import annotations

import math

import torch

from ..data.packing import pack_images
from ..data.tokenizer import Tokenizer
from ..model import GenLIP

# Tableau-20 colours: distinct enough for the legend; more words than colours reuse them (the legend says which).
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
           (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
           (219, 219, 141), (158, 218, 229)]
LEGEND_WORDS = 24


@torch.no_grad()
def patch_top_words(model: GenLIP, patches: torch.Tensor, grid_hw: tuple[int, int],
                    k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` next-token probabilities and ids per patch: ``(P, k)`` float32 and ``(P, k)`` int64 (CPU), rows
    in row-major grid order."""
    device = model.patch_embed.weight.device
    h = model.hidden_states(pack_images([patches], [grid_hw]).to(device))  # (P, d); prefix = length
    probs = torch.softmax(model.logits(h), dim=-1)
    top = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return top.values.cpu(), top.indices.cpu()


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """How a token reads on its own (special tokens by their name)."""
    text = tokenizer.decode([token_id]).strip()
    return text or (tokenizer.id_to_token(token_id) or f"<{token_id}>")  # specials decode to ""


def readout_json(name: str, grid_hw: tuple[int, int], probs: torch.Tensor, ids: torch.Tensor,
                 tokenizer: Tokenizer) -> dict:
    """One entry per patch: its grid row and column and its top-k tokens with probabilities."""
    gh, gw = grid_hw
    patches = []
    for i, (pr, tk) in enumerate(zip(probs.tolist(), ids.tolist())):
        patches.append({"index": i, "row": i // gw, "col": i % gw,
                        "top": [{"token": token_text(tokenizer, t), "id": t, "prob": round(p, 6)}
                                for p, t in zip(pr, tk)]})
    return {"image": name, "grid": [gh, gw], "top_k": probs.shape[1], "patches": patches}


def draw_readout(image, grid_hw: tuple[int, int], words: list[str], *, cell: int = 48):
    """The readout picture: ``image`` (the model's input, a PIL image) scaled so each patch is ``cell`` pixels
    square, each patch tinted by its top word with the word written in it, and a legend below. Width
    ``grid_w * cell``; height ``grid_h * cell`` plus the legend."""
    from PIL import Image, ImageDraw, ImageFont

    gh, gw = grid_hw
    if len(words) != gh * gw:
        raise ValueError(f"{len(words)} words for a {gh}x{gw} grid")
    counts: dict[str, int] = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    colour = {w: PALETTE[i % len(PALETTE)] for i, w in enumerate(ranked)}
    W, H = gw * cell, gh * cell
    font = ImageFont.load_default(size=max(8, cell // 4))
    line = max(14, cell // 3)
    shown = ranked[:LEGEND_WORDS]
    per_row = max(1, W // 150)
    legend_rows = math.ceil((len(shown) + (len(ranked) > len(shown))) / per_row)
    canvas = Image.new("RGB", (W, H + 8 + legend_rows * line), (255, 255, 255))
    base = image.convert("RGB").resize((W, H), Image.BICUBIC)
    tint = Image.new("RGB", (W, H))
    draw_tint = ImageDraw.Draw(tint)
    for i, w in enumerate(words):
        r, c = divmod(i, gw)
        draw_tint.rectangle((c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1), fill=colour[w])
    canvas.paste(Image.blend(base, tint, 0.35), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, w in enumerate(words):
        r, c = divmod(i, gw)
        draw.rectangle((c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1), outline=(255, 255, 255))
        text = w
        while len(text) > 1 and draw.textlength(text, font=font) > cell - 4:
            text = text[:-2] + "…"
        draw.text((c * cell + 2, r * cell + 2), text, fill=(255, 255, 255), font=font, stroke_width=1,
                  stroke_fill=(0, 0, 0))
    entries = [(w, f"{w} ({counts[w]})") for w in shown]
    if len(ranked) > len(shown):
        entries.append((None, f"… {len(ranked) - len(shown)} more words"))
    for j, (w, label) in enumerate(entries):
        x, y = (j % per_row) * 150 + 4, H + 8 + (j // per_row) * line
        if w is not None:
            draw.rectangle((x, y, x + line - 4, y + line - 4), fill=colour[w])
        draw.text((x + line, y), label, fill=(0, 0, 0), font=font)
    return canvas
