"""Data configuration (the ``[data]`` section of a job config) and the sources it names."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .captions import CaptionRule, parse_rule
from .specs import split_sources


@dataclass
class SourceConfig:
    """One ``[[data.sources]]`` entry: shards drawn from with a weight, with their own caption rule and prompt."""

    path: str = ""
    """Its shards: a spec as data.train_shards takes (brace ranges, globs, folders, comma lists, URLs)."""
    caption: str = ""
    """Where its captions are (a caption rule, see data.caption); '' = data.caption."""
    weight: float = 1.0
    """Its share of the samples, relative to the other sources' weights (> 0)."""
    prompt: str = ""
    """Text put between image and caption of each of its samples, carrying no loss (e.g. the authors' stage-2
    "Describe the image in detail."); '' = none."""
    name: str = ""
    """Its name in logs and metrics; '' = its folder's name."""


@dataclass
class DataConfig:
    train_shards: str = ""
    """Training shards: a path, glob (** recursive), brace range ({000000..099999}), folder (searched recursively)
    or URL of .tar / .parquet shards, comma-separated for several; 'p1;p2' = sources of equal weight (the authors'
    form). Or leave it '' and list [[data.sources]]."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Several sources mixed by weight ([[data.sources]] tables; on the command line a TOML array,
    --data.sources='[{path="a/*.tar", weight=2}, {path="b/*.tar"}]'); '' train_shards then."""
    caption: str = "auto"
    """Where a sample's caption is, as a rule: 'auto' (txt, then a conversation's last assistant turn, then json
    caption / text), 'txt', 'json:PATH' (json:conversations.-1.value), 'conv[+prompt][:PATH]', tried in order when
    separated by ';' (genlip_fast/data/captions.py)."""
    val_shards: str = ""
    """Held-out shards (a spec as train_shards), for the validation loss and captions ('' = none)."""
    generate_demo_data: bool = False
    """Generate the demo shapes dataset when train_shards (of the form DIR/train-*.tar) matches nothing and DIR is
    new or empty (the tiny demo config turns it on); never writes next to or over existing files."""
    tokenizer: str = "demo"
    """'demo', 'qwen', or a local tokenizer.json path; nothing is downloaded."""
    stage: int = 1
    """1: square ``image_size`` crops (resize shorter side + centre crop); 2: native aspect ratio."""
    image_size: int = 64
    """Stage-1 square input size in pixels (the paper: 224)."""
    patch_size: int = 16
    """Patch side in pixels; stage-2 sizes are multiples of it."""
    min_patches: int = 16
    """Stage 2: fewest patches per image (small images are upsampled to reach it)."""
    max_patches: int = 1024
    """Stage 2: most patches per image (large images are downsampled to fit)."""
    pixel_norm: str = "clip"
    """Pixel normalisation: 'clip' (OpenAI CLIP's mean and std) or 'half' ((u8/255 - 0.5)/0.5, the authors')."""
    pack_tokens: int = 1024
    """Tokens per pack (the paper: 16384)."""
    lookahead: int = 1
    """Samples buffered for best-fit packing (1 = greedy, fine for stage 1; stage 2 wants ~64)."""
    truncate_captions: bool = False
    """Cut the captions of samples longer than a pack to fit (otherwise such samples are skipped and counted)."""
    max_caption_tokens: int = 0
    """Cut captions to this many tokens, end-of-text included (0 = no limit)."""
    caption_field: str = ""
    """Deprecated: caption_field = 'x' is caption = 'json:x'."""
    image_column: str = ""
    """Parquet shards: the column of encoded images ('' = found by its type: binary, or {bytes, path} structs)."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options per protocol for remote shards, on top of the environment's (AWS_ENDPOINT_URL, credentials),
    e.g. [data.storage_options.s3] endpoint_url = "http://minio:9000"; on the command line as JSON."""
    read_ahead: int = 64
    """Remote shards: samples whose bytes are fetched ahead of the stream, concurrently (0 = fetch each when
    reached)."""
    backend: str = "auto"
    """Image decode: 'auto' (DALI when installed, on the GPU when there is one), 'dali', or 'host' (Pillow)."""
    batch_size: int = 64
    """Images decoded per DALI (or host) batch; packs are cut from the stream of samples regardless."""
    num_threads: int = 4
    """CPU threads of the DALI pipeline (or of the host decoder)."""
    shuffle_shards: int = 16
    """Shards each data stream reads at once (of each source, in a mixture); every sample is drawn at random from one
    of them (a shuffle buffer across open shards). More mixes batches better; each open shard holds its index in
    memory."""
    prefetch: int = 4
    """Packs prepared ahead of the training step by the background thread (0 = no thread, build on demand)."""
    seed: int = 0
    """Shuffle seed of the sample stream (shard order and sample order inside each shard, per epoch; the draws)."""


@dataclass(frozen=True)
class Source:
    """A source as the loader reads it: its name, shard spec, parsed caption rule, weight and prompt."""

    name: str
    spec: str
    rule: CaptionRule
    weight: float = 1.0
    prompt: str = ""


def caption_rule_text(cfg: DataConfig) -> str:
    """``data.caption``, or the rule the deprecated ``data.caption_field`` means (``'x'`` -> ``'json:x'``)."""
    if cfg.caption_field:
        if cfg.caption not in ("auto", f"json:{cfg.caption_field}"):
            raise ValueError(f"data.caption_field = {cfg.caption_field!r} (deprecated) and data.caption = "
                             f"{cfg.caption!r} disagree: set only data.caption (e.g. 'json:{cfg.caption_field}')")
        return f"json:{cfg.caption_field}"
    return cfg.caption


def _default_name(spec: str) -> str:
    """A source's name from its spec: the folder before any pattern (``/data/blip3o/{00..99}.tar`` -> ``blip3o``),
    else the folder or file named (``/data/cc3m/`` -> ``cc3m``)."""
    head = re.split(r"[*?\[{,]", spec, maxsplit=1)[0]
    path = head.rsplit("/", 1)[0] if head != spec else re.sub(r"\.(tar|parquet)$", "", spec.rstrip("/"))
    return re.sub(r"[^\w.-]+", "_", path.rsplit("/", 1)[-1]) or "source"


def data_sources(cfg: DataConfig) -> list[Source]:
    """The training sources ``cfg`` names: ``data.sources``, or ``data.train_shards`` (one source; ``'p1;p2'`` is
    two of equal weight). Raises ``ValueError`` naming the option for a rule that does not parse, a weight that is
    not > 0, a source without a path, both train_shards and sources set, or neither. Reads no file."""
    default_rule = caption_rule_text(cfg)
    if cfg.sources and cfg.train_shards:
        raise ValueError(f"data.train_shards = {cfg.train_shards!r} and [[data.sources]] are both set: use one "
                         "(train_shards is the one-source form; list every source under [[data.sources]])")
    entries = cfg.sources or [SourceConfig(path=p) for p in split_sources(cfg.train_shards)]
    if not entries:
        raise ValueError("no training data: set data.train_shards (a path, glob, brace range or folder of shards) "
                         "or list [[data.sources]]")
    out: list[Source] = []
    for i, e in enumerate(entries):
        where = f"data.sources[{i}]" if cfg.sources else "data.train_shards"
        if not isinstance(e, SourceConfig):
            raise ValueError(f"{where} must be a table with path, caption, weight, prompt, name; got {e!r}")
        if not e.path.strip():
            raise ValueError(f"{where}.path is empty: every source needs its shards")
        if not (math.isfinite(e.weight) and e.weight > 0):
            raise ValueError(f"{where}.weight = {e.weight!r}; allowed: a finite number > 0")
        rule = e.caption or default_rule
        try:
            parsed = parse_rule(rule)
        except ValueError as err:
            raise ValueError(f"{where + '.caption' if e.caption else 'data.caption'}: {err}") from None
        out.append(Source(e.name or _default_name(e.path.strip()), e.path.strip(), parsed, float(e.weight), e.prompt))
    names = [s.name for s in out]
    for i, s in enumerate(out):  # names are metric keys: make repeats unique
        if names.count(s.name) > 1:
            out[i] = Source(f"{s.name}_{i}", s.spec, s.rule, s.weight, s.prompt)
    return out
