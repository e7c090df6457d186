"""The authors' checkpoint layout (HF ``GenLIPModel``: ``config.json`` + safetensors): its weight names and
config both ways, reading and writing a folder, and :func:`load_official` (which ``load.py`` calls for such a
folder). It imports no other form; the conversions that combine it with them are ``convert.py``::

    python -m genlip_fast.convert import-official SRC_DIR OUT       # -> a genlip_fast checkpoint folder
    python -m genlip_fast.convert export-official CKPT OUT_DIR      # -> config.json + model*.safetensors

Weight names (DESIGN.md, "The authors' code"), ours -> theirs::

    patch_embed                 vision_embeddings.patch_embedding
    blocks.N.norm1 / norm2      visual.layers.N.layer_norm1 / layer_norm2
    blocks.N.attn.q_proj        visual.layers.N.self_attn.q_proj   rows permuted: ours per head [q_h | g_h],
                                                                   theirs [all heads' q | all heads' gate]
    blocks.N.attn.{k,v,o}_proj  visual.layers.N.self_attn.{k_proj, v_proj, out_proj}
    blocks.N.mlp.w1 / w3 / w2   visual.layers.N.mlp.gate_fc / fc1 / fc2     (fc2(silu(gate_fc x) * fc1 x))
    blocks.N.ls1 / ls2          visual.layers.N.layer_scale1 / layer_scale2 .lambda1
    norm                        ln_post
    text_embed / text_in        embeddings / in_proj     (in_proj and proj only when text_embed_dim != width)
    text_out / lm_head          proj / lm_head

Their MLP always has biases; a model without them (the paper presets) is written with zero biases, and the
genlip_fast config travels in ``config.json`` (``genlip_fast_model_config``) so that importing the export again
gives back the same model, bit for bit.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..data.inputs import AUTHORS_PIXEL_MEAN, AUTHORS_PIXEL_STD, ImageTransform, InputSpec
from ..model import GenLIP, ModelConfig
from ..model.config import AUTHORS_CODE
from .format import model_config_dict, model_config_from_dict
from .sharded import INDEX, write_shards

log = logging.getLogger(__name__)

AUTHORS_PROMPT = "Describe the image in detail."
AUTHORS_STOP = "<|im_end|>"
GENLIP_FAST_KEY = "genlip_fast_model_config"
GENLIP_FAST_INPUTS = "genlip_fast_inputs"
PREPROCESSOR = "preprocessor_config.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class OfficialFormatError(ValueError):
    """An official-layout config or state dict that does not describe a model genlip_fast can load."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise OfficialFormatError(msg)


def config_from_official(c: dict) -> ModelConfig:
    """The authors' ``config.json`` -> :class:`ModelConfig` (their code: MLP biases, one constant drop-path rate on
    whole packed rows). A ``genlip_fast_model_config`` entry (written by
    :func:`~genlip_fast.checkpoint.convert.export_official`) wins."""
    _require(c.get("model_type") != "genlip_fast_vision",
             "config.json is a transformers export of genlip_fast (export-hf: vision tower only); load it with "
             "transformers, or use the checkpoint it was exported from (config.json: genlip_fast.source)")
    if GENLIP_FAST_KEY in c:
        return model_config_from_dict(c[GENLIP_FAST_KEY])
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        _require(key in c, f"config.json has no {key!r}")
    _require(c.get("use_swiglu_ffn", False) and c.get("hidden_act", "gelu_pytorch_tanh") == "silu",
             f"config.json: only the SwiGLU MLP with silu is supported (use_swiglu_ffn="
             f"{c.get('use_swiglu_ffn')!r}, hidden_act={c.get('hidden_act')!r})")
    _require(not c.get("use_llm_head", False), "config.json: use_llm_head (an LLM decoder head) is not supported")
    _require(not c.get("tie_word_embeddings", False), "config.json: tie_word_embeddings=true is not supported")
    _require(c.get("ls_init_value", 0.0) > 1e-6,
             f"config.json: ls_init_value={c.get('ls_init_value')!r} means no layer scale; genlip_fast blocks have one")
    for key in ("spatial_merge_size", "temporal_patch_size"):
        _require(c.get(key, 1) == 1, f"config.json: {key}={c.get(key)!r} is not supported (1 only)")
    rope = c.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type"))
    _require(kind in ("mrope", "default") and "mrope_section" in rope,
             f"config.json: rope_scaling must have type 'mrope' or 'default' and an mrope_section, got {rope!r}")
    width, text = int(c["hidden_size"]), c.get("text_embed_dim")
    return ModelConfig(
        dim=width, n_layers=int(c["num_hidden_layers"]), n_heads=int(c["num_attention_heads"]),
        ffn_dim=int(c["intermediate_size"]), vocab_size=int(c["vocab_size"]),
        text_embed_dim=None if text in (None, width) else int(text),
        patch_size=int(c.get("patch_size", 16)), in_channels=int(c.get("num_channels", 3)),
        mrope_section=tuple(int(s) for s in rope["mrope_section"]),
        mrope_interleaved=bool(c.get("mrope_interleaved", False)), rope_theta=float(c.get("rope_theta", 10000.0)),
        gate="elementwise" if c.get("gated_attention", False) else "none",
        layer_scale_init=float(c["ls_init_value"]), drop_path=float(c.get("drop_path_rate", 0.0)),
        norm_eps=float(c.get("layer_norm_eps", 1e-6)), **AUTHORS_CODE,
    )


def config_to_official(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """:class:`ModelConfig` -> the authors' ``config.json`` (plus the genlip_fast config, which their code keeps
    as an unused attribute)."""
    _require(cfg.gate != "headwise", "the authors' code has no headwise gate; this model cannot be exported")
    theirs = dict(norm="layernorm", qk_norm=False, attn_bias=True, num_kv_heads=cfg.n_heads,
                  head_dim=cfg.dim // cfg.n_heads)
    other = [f"{k}={getattr(cfg, k)!r}" for k, v in theirs.items() if getattr(cfg, k) != v]
    _require(not other, f"the authors' GenLIP block has LayerNorm, no q/k norm, attention biases and d // heads "
                        f"channels in every key/value head; this model has {', '.join(other)} and cannot be exported")
    _require(cfg.layer_scale_init is not None and cfg.layer_scale_init > 1e-6,
             f"layer_scale_init={cfg.layer_scale_init} would remove the authors' layer scales (they exist only above "
             "1e-6)")
    ours = {**model_config_dict(cfg), "attn_backend": "auto", "ce_backend": "auto"}
    return {
        "architectures": ["GenLIPModel"], "model_type": "genlip",
        "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_channels": cfg.in_channels, "patch_size": cfg.patch_size,
        "hidden_act": "silu", "use_swiglu_ffn": True, "gated_attention": cfg.gate == "elementwise",
        "ls_init_value": cfg.layer_scale_init, "drop_path_rate": cfg.drop_path, "layer_norm_eps": cfg.norm_eps,
        "text_embed_dim": cfg.text_embed_dim or cfg.dim, "vocab_size": cfg.vocab_size,
        "mrope_interleaved": cfg.mrope_interleaved, "rope_theta": cfg.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": list(cfg.mrope_section)},
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_llm_head": False, "tie_word_embeddings": False,
        "spatial_merge_size": 1, "temporal_patch_size": 1, "torch_dtype": _TORCH_DTYPE_NAMES[dtype],
        GENLIP_FAST_KEY: ours,
    }


def name_map(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter name -> theirs, for every tensor of their layout (MLP biases included)."""
    m = {"patch_embed.weight": "vision_embeddings.patch_embedding.weight",
         "patch_embed.bias": "vision_embeddings.patch_embedding.bias"}
    parts = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.q_proj": "self_attn.q_proj",
             "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj", "attn.o_proj": "self_attn.out_proj",
             "mlp.w1": "mlp.gate_fc", "mlp.w3": "mlp.fc1", "mlp.w2": "mlp.fc2"}
    for i in range(cfg.n_layers):
        for ours, theirs in parts.items():
            for kind in ("weight", "bias"):
                m[f"blocks.{i}.{ours}.{kind}"] = f"visual.layers.{i}.{theirs}.{kind}"
        m[f"blocks.{i}.ls1"] = f"visual.layers.{i}.layer_scale1.lambda1"
        m[f"blocks.{i}.ls2"] = f"visual.layers.{i}.layer_scale2.lambda1"
    m.update({"norm.weight": "ln_post.weight", "norm.bias": "ln_post.bias", "text_embed.weight": "embeddings.weight",
              "lm_head.weight": "lm_head.weight"})
    if cfg.text_embed_dim not in (None, cfg.dim):
        for kind in ("weight", "bias"):
            m[f"text_in.{kind}"] = f"in_proj.{kind}"
            m[f"text_out.{kind}"] = f"proj.{kind}"
    return m


def _q_rows(t: torch.Tensor, H: int, D: int, *, to_official: bool) -> torch.Tensor:
    """Reorder q_proj rows (weight or bias): ours ``(H, [q | g], D)`` <-> theirs ``([q | g], H, D)``."""
    shape = t.shape
    if to_official:
        return t.reshape(H, 2, D, -1).transpose(0, 1).reshape(shape).contiguous()
    return t.reshape(2, H, D, -1).transpose(0, 1).reshape(shape).contiguous()


def to_official(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> theirs (missing MLP biases of a bias-free model become zeros)."""
    out = {}
    for ours, theirs in name_map(cfg).items():
        if ours not in state_dict:
            _require(".mlp." in ours and ours.endswith(".bias") and not cfg.mlp_bias,
                     f"the state dict has no {ours!r}")
            w = state_dict[ours.replace(".bias", ".weight")]
            out[theirs] = torch.zeros(w.shape[0], dtype=w.dtype)
            continue
        t = state_dict[ours]
        if ".attn.q_proj." in ours and cfg.gate == "elementwise":
            t = _q_rows(t, cfg.n_heads, cfg.head_dim, to_official=True)
        out[theirs] = t
    return out


def from_official(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Their state dict -> ours for ``cfg``. Raises :class:`OfficialFormatError` naming every missing, unexpected
    or mis-shaped tensor (their own loader re-initialises missing weights silently; this one refuses)."""
    names = name_map(cfg)
    with torch.device("meta"):
        expected = {theirs: tuple(t.shape) for theirs, t in
                    to_official(GenLIP(cfg.replace(mlp_bias=True)).state_dict(), cfg.replace(mlp_bias=True)).items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(f"{k}: {tuple(sd[k].shape)} (expected {expected[k]})" for k in set(expected) & set(sd)
                    if tuple(sd[k].shape) != expected[k])
    problems = [f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else "",
                f"mis-shaped {shapes}" if shapes else ""]
    _require(not any(problems), "official state dict does not fit the config: " + "; ".join(p for p in problems if p))
    out = {}
    for ours, theirs in names.items():
        t = sd[theirs]
        if ".attn.q_proj." in ours and cfg.gate == "elementwise":
            t = _q_rows(t, cfg.n_heads, cfg.head_dim, to_official=False)
        if ".mlp." in ours and ours.endswith(".bias") and not cfg.mlp_bias:
            _require(not t.any(), f"{theirs} is not zero but the config has no MLP biases")
            continue
        out[ours] = t
    return out


def read_official(src: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config.json, state dict)`` of a folder in the authors' layout: one ``*.safetensors`` file, or shards
    listed by ``model.safetensors.index.json``."""
    from safetensors.torch import load_file

    src = Path(src)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json (expected the authors' HF layout: config.json + safetensors)")
    config = json.loads((src / "config.json").read_text())
    if (src / INDEX).is_file():
        weight_map = json.loads((src / INDEX).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (src / f).is_file():
                raise FileNotFoundError(f"{src / INDEX} lists {f}, which is not in {src}")
    else:
        files = sorted(p.name for p in src.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{src}: no *.safetensors file")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(src / f))
        dup = sorted(set(part) & set(sd))
        _require(not dup, f"{src}: tensors {dup} appear in more than one file")
        sd.update(part)
    return config, sd


def write_official(out_dir: str | Path, config: dict, sd: dict[str, torch.Tensor], *,
                   max_shard_bytes: int = 5 * 2**30, inputs: InputSpec | None = None) -> list[Path]:
    """Write ``config.json`` and the tensors, in shards of at most ``max_shard_bytes`` (with an index when there
    is more than one), plus the pixel statistics in ``preprocessor_config.json``. Returns the safetensors files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = write_shards(out, sd, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if inputs is not None:
        img = inputs.image
        (out / PREPROCESSOR).write_text(json.dumps({
            "image_mean": list(img.pixel_mean), "image_std": list(img.pixel_std), "patch_size": img.patch_size,
            "min_pixels": img.min_patches * img.patch_size**2, "max_pixels": img.max_patches * img.patch_size**2,
        }, indent=2))
    return files


def official_inputs(src: str | Path, config: dict) -> InputSpec:
    """How the authors' weights read their inputs: the Qwen tokenizer, their prompt and stop word, and their image
    processor (:func:`authors_transform` of ``preprocessor_config.json``). A folder written by
    :func:`~genlip_fast.checkpoint.convert.export_official` carries the genlip_fast run's own
    (``genlip_fast_inputs`` in config.json)."""
    if GENLIP_FAST_INPUTS in config:
        return InputSpec.from_dict(config[GENLIP_FAST_INPUTS])
    pre = Path(src) / PREPROCESSOR
    p = json.loads(pre.read_text()) if pre.is_file() else {}
    image = authors_transform(p, int(p.get("patch_size", config.get("patch_size", 16))))
    return InputSpec(tokenizer="qwen", prompt=AUTHORS_PROMPT, stop=(AUTHORS_STOP,), image=image)


def authors_transform(p: dict, patch: int) -> ImageTransform:
    """The resize of the authors' processor config ``p`` (``resize_rule = "siglip_qwen2vl"``, bilinear): SigLIP2's
    (their ``*-224`` models; ``size`` ``{"height", "width"}``) squashes to that square; their Qwen2-VL-style one
    (``*-NaViT``; ``min_pixels`` / ``max_pixels``, or ``size`` ``{"shortest_edge", "longest_edge"}``) resizes with
    ``smart_resize``; without a config, the latter with their 4,096-262,144 pixels. Statistics: the config's, else
    SigLIP2's 0.5 / 0.5. :class:`OfficialFormatError` names a setting it cannot reproduce."""
    _require(p.get("resample", 2) == 2, f"{PREPROCESSOR}: resample={p.get('resample')!r} is not supported (2, "
                                        "bilinear, as the authors' processors use)")
    _require(p.get("merge_size", 1) == 1, f"{PREPROCESSOR}: merge_size={p.get('merge_size')!r} is not supported "
                                          "(1 only: one token per patch)")
    size = p.get("size") or {}
    square = "height" in size or "width" in size
    _require(not square or size.get("height") == size.get("width"),
             f"{PREPROCESSOR}: size {size} is not square (GenLIP's fixed-size inputs are)")
    lo = int(p.get("min_pixels", size.get("shortest_edge", 16 * patch**2)) if not square else 16 * patch**2)
    hi = int(p.get("max_pixels", size.get("longest_edge", 1024 * patch**2)) if not square else 1024 * patch**2)
    _require(lo % patch**2 == 0 and hi % patch**2 == 0,
             f"{PREPROCESSOR}: min_pixels {lo} / max_pixels {hi} are not whole numbers of {patch}x{patch} patches")
    return ImageTransform(patch_size=patch, image_size=int(size["height"]) if square else None,
                          min_patches=lo // patch**2, max_patches=hi // patch**2, resize_rule="siglip_qwen2vl",
                          pixel_mean=tuple(p.get("image_mean", AUTHORS_PIXEL_MEAN)),
                          pixel_std=tuple(p.get("image_std", AUTHORS_PIXEL_STD)))


def load_official(src: str | Path) -> tuple[GenLIP, InputSpec]:
    """A :class:`GenLIP` (fp32, CPU) from a folder in the authors' layout, and how it reads its inputs."""
    config, sd = read_official(src)
    cfg = config_from_official(config)
    if not cfg.mlp_bias and any(sd[t].any() for o, t in name_map(cfg).items() if ".mlp." in o and o.endswith("bias")):
        log.warning("%s: the MLP biases are not zero (trained further with the authors' code?): loading them", src)
        cfg = cfg.replace(mlp_bias=True)
    ours = from_official(sd, cfg)
    with torch.device("meta"):
        model = GenLIP(cfg)
    model = model.to_empty(device="cpu")
    model.load_state_dict({k: v.float() for k, v in ours.items()}, strict=True)
    return model, official_inputs(src, config)
