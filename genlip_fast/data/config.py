"""Data configuration (the ``[data]`` section of a job config)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    train_shards: str = "data/shapes/train-*.tar"
    """Training shards: a path, glob or folder of webdataset .tar or Parquet files, local or URLs (s3://, gs://,
    https://); comma-separated for several."""
    val_shards: str = "data/shapes/val-*.tar"
    """Held-out shards, captioned by the model at the end of the run ('' = none)."""
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
    """Take the caption from this field of the sample's .json (e.g. 'caption'; a Parquet shard's column); '' = the
    .txt member."""
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
    """Shards each data stream reads at once; every sample is drawn at random from one of them (a shuffle buffer
    across open shards). More mixes batches better; each open shard holds its index in memory."""
    prefetch: int = 4
    """Packs prepared ahead of the training step by the background thread (0 = no thread, build on demand)."""
    seed: int = 0
    """Shuffle seed of the sample stream (shard order and sample order inside each shard, per epoch; the draws)."""
