"""Job configuration: nested dataclasses, loaded from TOML with ``--section.key=value`` overrides.

Every field has a one-line doc (the string under it). Unknown sections or keys, and values of the wrong type, are
errors that name the offending key. A list of tables (``[[data.sources]]``) is given on the command line as a TOML
array, ``--data.sources='[{path="a/*.tar", weight=2}, {path="b/*.tar"}]'``, which replaces the whole list.

What the user set (their own TOML, the command line) is told apart from what a bundled preset set: a preset's
demo-only parts (the tiny preset's held-out shards and probe set) step aside, with one line, when the training data
is not the demo's, while the same settings written by the user are used as written (and an error if unusable).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..data.config import DataConfig, caption_rule_text, data_sources
from ..data.transforms import PIXEL_NORMS
from .tables import ConfigError, apply_table, dotted_keys, numeric_fields, override_table

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
log = logging.getLogger("genlip_fast.train")


@dataclass
class ModelSection:
    preset: str = "tiny"
    """Model preset: 'L/16', 'So/16', 'g/16', 'qwen3_0.6b', their '-official' forms, or a tiny one ('tiny', ...)."""
    vocab_size: int | None = None
    """Embedding rows; None = the preset's (tiny presets take the tokenizer's size)."""
    attn_backend: str = "auto"
    """Attention implementation: 'auto' | 'triton' | 'reference' | 'flex'."""
    ce_backend: str = "auto"
    """LM head + cross-entropy implementation: 'auto' | 'triton' | 'reference'."""
    drop_path: float | None = None
    """Stochastic depth of the last block; None = the preset's."""
    gate: str | None = None
    """Attention gate: 'elementwise' | 'headwise' | 'none'; None = the preset's."""
    mlp_bias: bool | None = None
    """Biases on the SwiGLU linears; None = the preset's (on for the '-official' presets)."""
    drop_path_mode: str | None = None
    """Drop path per 'sample' or per 'pack' (the authors'); None = the preset's."""
    drop_path_schedule: str | None = None
    """Drop-path rate over depth: 'linear' or 'constant' (the authors'); None = the preset's."""


@dataclass
class OptimSection:
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-6
    """Final learning rate of the cosine decay."""
    warmup_ratio: float = 0.007
    """Fraction of the steps spent in linear warmup."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay, on the parameters optim.decay names."""
    decay: str = "matrices"
    """What weight decay applies to: 'matrices' (norms, biases, layer scales and embeddings get none) or 'all'
    (every parameter, as the authors' AdamW)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""


@dataclass
class TrainSection:
    steps: int = 400
    """Optimizer steps."""
    seed: int = 0
    """Seed of parameter init and drop path."""
    device: str = "auto"
    """'auto' (CUDA when present), 'cpu' or 'cuda'."""
    log_every: int = 10
    """Steps between log lines."""
    out_dir: str = "runs/tiny"
    """Where logs, metrics and checkpoints go."""
    caption_samples: int = 8
    """Held-out images captioned at the end of the run."""
    max_new_tokens: int = 24
    """Longest generated caption."""
    global_batch_samples: int = 0
    """Samples per optimizer step across all ranks, as the paper gives it (32K); turned into packs per step."""
    packs_per_step: int = 0
    """Packs per optimizer step across all ranks; 0 = from global_batch_samples (or one pack per data stream)."""
    tokens_per_sample: float = 0.0
    """Mean tokens per sample used to turn global_batch_samples into packs; 0 = measure from the first packs."""
    max_bad_steps: int = 3
    """Stop with an error after this many optimizer steps in a row with a NaN/inf loss or gradient norm."""
    stop_at_step: int = 0
    """End this run after this step with a checkpoint, as if preempted; rerun to continue (0 = run to the end)."""
    tensorboard: bool = True
    """Write TensorBoard scalars to out_dir/tb (skipped with a warning when tensorboard is not installed)."""
    float8: str = "off"
    """Float8 GEMMs in the blocks' linears (torchao; pip install '.[float8]'): 'off', 'tensorwise', 'rowwise' or
    'rowwise_with_gw_hp' (tensorwise and rowwise pad packs to a multiple of 16 tokens)."""
    float8_filter: str = "all"
    """Which block linears train.float8 converts: 'all', 'mlp', or a regular expression searched in their names
    (blocks.3.attn.q_proj, blocks.3.mlp.w1, ...). The LM head and the embeddings always stay in high precision."""


@dataclass
class ParallelSection:
    backend: str = "auto"
    """torch.distributed backend: 'auto' (nccl on CUDA, gloo on CPU), 'nccl' or 'gloo'."""
    replicate: int = 0
    """HSDP replicas (the mesh's outer dim, usually nodes); 0 = world size / shard. 1 = plain FSDP over all ranks."""
    shard: int = 0
    """Ranks each replica shards parameters, gradients and optimizer state over; 0 = the GPUs of one node
    (LOCAL_WORLD_SIZE), or world size / replicate when that is given. replicate x shard = the world size."""
    collective_timeout_s: float = 300.0
    """Seconds a collective may wait before it fails (then every waiting rank ends with one line naming the ranks
    behind); at 90% of it a stalled rank logs them. It must exceed the longest time one rank can work while another
    waits for it: the first step's compilation, a checkpoint save, a rank's first pack; raise it for slow storage."""
    data_streams: int = 0
    """Data loader streams the global batch is drawn from (0 = one per rank), at least the world size; rank r reads
    the streams s with s % world_size == r. Runs with the same streams see the same packs, whatever the ranks."""
    remap_streams: bool = False
    """On resume with a different number of data streams (e.g. on other GPUs): map the saved stream positions onto
    the new streams (nothing skipped or repeated; sample order and pack composition change) instead of refusing."""
    mixed_precision: str = "auto"
    """'auto' (bf16 params + fp32 gradient reduce on CUDA, fp32 on CPU), 'bf16' or 'fp32'."""
    activation_checkpoint: str = "none"
    """'none', 'full' (every block) or 'ratio' (a fraction ac_ratio of the blocks, evenly spread)."""
    ac_ratio: float = 0.5
    """Fraction of blocks recomputed in backward under activation_checkpoint = 'ratio'."""
    compile: bool = False
    """torch.compile each transformer block."""
    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward in a step's last micro-step (ZeRO-3; not the last
    block or the root); False keeps them until backward. Earlier micro-steps never reshard (see prepare_micro_step)."""


@dataclass
class CheckpointSection:
    every: int = 0
    """Optimizer steps between checkpoints (0 = only at the end, at stop_at_step and on SIGTERM/SIGUSR1/Ctrl-C)."""
    keep: int = 3
    """Most recent complete checkpoints kept (older ones are deleted; ones that fail their check are moved aside)."""
    dir: str = ""
    """Checkpoint folder; '' = out_dir/checkpoints."""
    resume: bool = True
    """Continue from the latest complete checkpoint in the checkpoint folder when there is one."""
    init_from: str = ""
    """Checkpoint (or run folder) whose model weights start a fresh run, e.g. stage 2 from stage 1; the optimizer,
    schedule and data start anew. Ignored when resuming."""
    final: bool = True
    """Save a checkpoint when training ends."""
    fallback: bool = True
    """When the newest checkpoint fails its check (manifest sizes and checksums), move it aside and resume from the
    newest one that passes, with a warning; false: stop with an error instead."""


@dataclass
class EvalSection:
    every: int = 0
    """Optimizer steps between evaluations on held-out data (0 = none); also before the first step and at the end."""
    packs: int = 4
    """Packs of data.val_shards whose caption loss is measured, the same ones every time (0, or no val_shards: none)."""
    captions: int = 0
    """Held-out images captioned (greedy, up to train.max_new_tokens) for BLEU-4, CIDEr and exact match (0 = none)."""
    probe_train: str = ""
    """ImageFolder (DIR/<class>/<image>) a linear probe of the frozen encoder is fitted on ('' = no probe; 'demo' =
    the probe set the demo generator writes beside data.train_shards, DIR/probe/train)."""
    probe_val: str = ""
    """ImageFolder the probe's top-1 accuracy is measured on (required with probe_train; 'demo' = DIR/probe/val)."""
    probe_l2: float = 1e-3
    """L2 penalty on the probe's logistic-regression weights (features standardised)."""


@dataclass
class JobConfig:
    model: ModelSection = field(default_factory=ModelSection)
    """The model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards, tokenizer and packing."""
    optim: OptimSection = field(default_factory=OptimSection)
    """AdamW and the LR schedule."""
    train: TrainSection = field(default_factory=TrainSection)
    """The loop."""
    parallel: ParallelSection = field(default_factory=ParallelSection)
    """FSDP2, precision, activation checkpointing, compile."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Saving, resuming, initialising from another run."""
    eval: EvalSection = field(default_factory=EvalSection)
    """Validation loss, captioning metrics and a linear probe during training."""


def resolve_config_path(name: str) -> Path:
    """A TOML path, or the name of a bundled preset (``tiny``, ``so16_stage1``, ...)."""
    p = Path(name)
    if p.is_file():
        return p
    bundled = CONFIG_DIR / (name if name.endswith(".toml") else f"{name}.toml")
    if bundled.is_file():
        return bundled
    known = sorted(q.stem for q in CONFIG_DIR.glob("*.toml"))
    raise ConfigError(f"no config file {name!r} (bundled presets: {known})")


def load_config(path: str | None = None, overrides: list[str] = ()) -> JobConfig:
    """Defaults, then the TOML file, then ``--section.key=value`` overrides (later wins); then a bundled preset's
    demo-only parts step aside when the data is not the demo's (:func:`_demo_parts_step_aside`)."""
    cfg = JobConfig()
    explicit: set[str] = set()  # keys the user set: their own TOML and the command line
    preset: dict = {}  # what a bundled preset set
    if path:
        file = resolve_config_path(path)
        try:
            with open(file, "rb") as f:
                table = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"config file {file}: {e}") from None
        apply_table(cfg, table)
        if file.resolve().parent == CONFIG_DIR:
            preset = table
        else:
            explicit |= dotted_keys(table)
    for item in overrides:
        dotted, table = override_table(item)
        apply_table(cfg, table)
        explicit.add(dotted)
    _resolve_data(cfg, explicit, preset, Path(path).stem if path else "")
    return validate(cfg)


def _resolve_data(cfg: JobConfig, explicit: set[str], preset: dict, name: str) -> None:
    """The user's data choices over the preset's: sources the user lists replace the preset's train_shards (and
    the reverse); the deprecated caption_field becomes data.caption (one warning); demo-only parts step aside."""
    d = cfg.data
    if d.sources and d.train_shards:
        if "data.train_shards" not in explicit:
            d.train_shards = ""
        elif "data.sources" not in explicit:
            d.sources = []
    if d.caption_field:
        try:
            rule = caption_rule_text(d)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        log.warning("data.caption_field is deprecated: read as data.caption = %r", rule)
        d.caption, d.caption_field = rule, ""
    if preset.get("data", {}).get("generate_demo_data"):
        _demo_parts_step_aside(cfg, explicit, name)


def _demo_parts_step_aside(cfg: JobConfig, explicit: set[str], name: str) -> None:
    """A demo preset (one that generates the demo data) on other data: its demo-only settings — the demo's held-out
    shards (data.val_shards), what is measured on them (eval.packs, eval.captions) and its probe set (eval.probe_*
    = 'demo') — step aside with one line, where the user did not set them. On the demo's data in another folder the
    held-out shards follow it."""
    from ..data.synthetic import demo_data_folder

    d, e = cfg.data, cfg.eval
    folder = None if d.sources else demo_data_folder(d.train_shards)
    if folder is not None:
        if "data.val_shards" not in explicit and d.val_shards:
            d.val_shards = str(folder / "val-*.tar")
        return
    aside = []
    if "data.val_shards" not in explicit and d.val_shards:
        d.val_shards = ""
        aside.append("data.val_shards (the demo's held-out shards)")
        for key in ("packs", "captions"):
            if f"eval.{key}" not in explicit and getattr(e, key):
                setattr(e, key, 0)
                aside.append(f"eval.{key}")
    demo_probe = [k for k in ("probe_train", "probe_val") if getattr(e, k) == "demo" and f"eval.{k}" not in explicit]
    if demo_probe:
        for k in demo_probe:
            setattr(e, k, "")
        aside.append("eval.probe_train / eval.probe_val (the demo's probe set)")
    if aside:
        log.info("the %s preset's demo-only parts step aside, as the training data is not the demo's: %s. Set them "
                 "to your own held-out shards and ImageFolders to evaluate on them", name or "bundled",
                 ", ".join(aside))


CHOICES = {
    "model.attn_backend": ("auto", "triton", "reference", "flex"),
    "model.ce_backend": ("auto", "triton", "reference"),
    "model.drop_path_mode": (None, "sample", "pack"),
    "model.drop_path_schedule": (None, "linear", "constant"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.float8": ("off", "tensorwise", "rowwise", "rowwise_with_gw_hp"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "parallel.mixed_precision": ("auto", "bf16", "fp32"),
    "parallel.activation_checkpoint": ("none", "full", "ratio"),
    "data.stage": (1, 2),
    "data.backend": ("auto", "dali", "host"),
    "data.pixel_norm": tuple(PIXEL_NORMS),
    "optim.decay": ("matrices", "all"),
}

RANGES = {
    # counts
    ">= 1": ("train.steps", "train.log_every", "train.max_new_tokens", "train.max_bad_steps", "checkpoint.keep",
             "model.vocab_size", "data.image_size", "data.patch_size", "data.min_patches", "data.max_patches",
             "data.pack_tokens", "data.lookahead", "data.batch_size", "data.num_threads", "data.shuffle_shards"),
    ">= 0": ("train.seed", "train.caption_samples", "train.global_batch_samples", "train.packs_per_step",
             "train.stop_at_step", "parallel.data_streams", "checkpoint.every", "data.max_caption_tokens",
             "data.prefetch", "data.seed", "data.read_ahead", "train.tokens_per_sample", "optim.min_lr",
             "optim.weight_decay",
             "optim.grad_clip", "parallel.replicate", "parallel.shard", "eval.every", "eval.packs", "eval.captions",
             "eval.probe_l2"),
    # rates
    "> 0": ("optim.lr", "optim.eps", "parallel.collective_timeout_s", "data.sources.weight"),
    "in [0, 1)": ("optim.warmup_ratio", "optim.betas", "model.drop_path"),
    "in (0, 1]": ("parallel.ac_ratio",),
}
"""The allowed range of every numeric option (``None``, where a field allows it, means "the default"). Every
int or float field must be listed: ``validate`` refuses a config class with an unchecked numeric field."""

_IN_RANGE = {
    ">= 1": lambda v: v >= 1, ">= 0": lambda v: v >= 0, "> 0": lambda v: v > 0,
    "in [0, 1)": lambda v: 0 <= v < 1, "in (0, 1]": lambda v: 0 < v <= 1,
}


def validate(cfg: JobConfig) -> JobConfig:
    """Check values that a type alone does not (choices, ranges); raise ConfigError naming the key and what is
    allowed."""
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{dotted} = {value!r}; choose one of {list(allowed)}")
    from ..model.config import PRESETS

    if cfg.model.preset not in PRESETS:
        raise ConfigError(f"model.preset = {cfg.model.preset!r}; choose one of {sorted(PRESETS)}")
    rule_of = {dotted: rule for rule, keys in RANGES.items() for dotted in keys}
    for dotted, value in numeric_fields(cfg).items():
        if dotted in CHOICES:
            continue
        rule = rule_of.get(dotted)
        if rule is None:
            raise RuntimeError(f"config field {dotted} has no allowed range in genlip_fast/train/config.py RANGES")
        for v in value if isinstance(value, tuple) else (value,):
            if v is not None and not (math.isfinite(v) and _IN_RANGE[rule](v)):
                raise ConfigError(f"{dotted} = {value!r}; allowed: a finite number {rule}")
    if cfg.train.float8_filter not in ("all", "mlp"):
        try:
            re.compile(cfg.train.float8_filter)
        except re.error as e:
            raise ConfigError(f"train.float8_filter = {cfg.train.float8_filter!r} is not a regular expression ({e}); "
                              f"use 'all', 'mlp' or a pattern such as 'mlp|attn.o_proj'") from None
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.min_lr = {cfg.optim.min_lr!r} is above optim.lr = {cfg.optim.lr!r}")
    e = cfg.eval
    if bool(e.probe_train) != bool(e.probe_val):
        raise ConfigError(f"eval.probe_train = {e.probe_train!r} and eval.probe_val = {e.probe_val!r}: the probe "
                          f"needs both folders (or neither)")
    d = cfg.data
    try:
        if d.train_shards or d.sources:  # no data at all is found where the data is needed (preflight)
            data_sources(d)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if d.min_patches > d.max_patches:
        raise ConfigError(f"data.min_patches = {d.min_patches} is above data.max_patches = {d.max_patches}")
    if d.stage == 1 and d.image_size % d.patch_size:
        raise ConfigError(f"data.image_size = {d.image_size} is not a multiple of data.patch_size = {d.patch_size}; "
                          f"try {max(1, round(d.image_size / d.patch_size)) * d.patch_size}")
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
