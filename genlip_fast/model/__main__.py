"""``python -m genlip_fast.model``: parameter counts of the presets beside the published ones (Table 1 of the paper;
the Qwen3-0.6B model card's non-embedding count for ``qwen3_0.6b``)."""

import torch

from . import PAPER_PARAMS, PRESETS, GenLIP, count_parameters


def main() -> None:
    print("| preset | published | blocks w/o gate | gate | patch embed | text embed | LM head | total |")
    print("|---|---|---|---|---|---|---|---|")
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            c = count_parameters(GenLIP(cfg))
        paper = f"{PAPER_PARAMS[name] / 1e9:g}B" if name in PAPER_PARAMS else "-"
        cols = [c[k] / 1e6 for k in ("blocks", "gate", "patch_embed", "text_embed", "lm_head", "total")]
        print(f"| {name} | {paper} | " + " | ".join(f"{x:.1f}M" for x in cols) + " |")


if __name__ == "__main__":
    main()
