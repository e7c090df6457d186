"""Captioning metrics over (references, generated texts): BLEU-4, CIDEr and exact match.

BLEU-4 and CIDEr are computed by ``pycocoevalcap``'s pure-Python scorers: the COCO caption evaluation code, which
LMMS-Eval (the toolkit the paper evaluates captioning with) calls too, so the numbers mean what published ones
mean. "CIDEr" is COCO's CIDEr-D (n = 1..4, Gaussian length penalty sigma = 6, clipped n-gram weights, times 10), with
its IDF taken from the references being scored, as COCO does: it needs a corpus (a single image scores 0).
The Java parts of that package (PTB tokenizer, METEOR, SPICE) are not used; :func:`normalize` splits text the way
the PTB tokenizer followed by COCO's punctuation filter does for plain captions (lower case, words only).

``pycocoevalcap`` is an optional dependency (``pip install 'genlip_fast[eval]'``), imported when a score is asked for.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_WORD = re.compile(r"\w+")


def normalize(text: str) -> list[str]:
    """Lower-cased words of ``text``; punctuation and spacing dropped ("Center." and "center ." are the same)."""
    return _WORD.findall(text.lower())


def scorers():
    """pycocoevalcap's ``(BleuScorer, CiderScorer)`` classes; ``ImportError`` naming the install command."""
    try:
        from pycocoevalcap.bleu.bleu_scorer import BleuScorer
        from pycocoevalcap.cider.cider_scorer import CiderScorer
    except ImportError as e:
        raise ImportError("BLEU-4 and CIDEr need pycocoevalcap: pip install 'genlip_fast[eval]' "
                          "(or pip install pycocoevalcap)") from e
    return BleuScorer, CiderScorer


def caption_metrics(references: Sequence[str | Sequence[str]], generated: Sequence[str]) -> dict[str, float]:
    """Corpus scores of ``generated[i]`` against ``references[i]`` (one string or several per item).

    Returns ``{"bleu4", "cider", "exact_match"}``: BLEU-4 in [0, 1] (COCO's corpus BLEU, closest reference length),
    CIDEr as COCO reports it (CIDEr-D, ~0..10; 1.0 is what papers write as "100"), and the fraction of generated
    captions whose words equal those of one of their references.
    """
    if len(references) != len(generated):
        raise ValueError(f"{len(references)} reference entries but {len(generated)} generated captions")
    if not generated:
        raise ValueError("no captions to score")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not r for r in refs):
        raise ValueError("every generated caption needs at least one reference")
    BleuScorer, CiderScorer = scorers()
    bleu, cider = BleuScorer(n=4), CiderScorer(n=4, sigma=6.0)
    exact = 0
    for rs, g in zip(refs, generated):
        hyp, norm_refs = normalize(g), [normalize(r) for r in rs]
        exact += any(hyp == r for r in norm_refs)
        joined_refs = [" ".join(r) for r in norm_refs]
        bleu += (" ".join(hyp), joined_refs)
        cider += (" ".join(hyp), joined_refs)
    bleu_scores, _ = bleu.compute_score(option="closest", verbose=0)
    cider_score, _ = cider.compute_score()
    return {"bleu4": float(bleu_scores[3]), "cider": float(cider_score), "exact_match": exact / len(generated)}


__all__ = ["caption_metrics", "normalize", "scorers"]
