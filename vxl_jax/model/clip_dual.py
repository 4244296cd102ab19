"""CLIP dual encoder (HF `CLIPModel`): projected text and image embeddings, and their cosine.

  params = {
    "text":              model/clip_text.py layout,
    "vision":            model/clip.py layout (all layers run; post_norm used),
    "text_projection":   [Dt, P]   (no bias),
    "visual_projection": [Dv, P]   (no bias),
    "logit_scale":       []        (log of the contrastive temperature's inverse),
  }

The embeddings are HF's `get_text_features` / `get_image_features`: projected,
not normalised; `similarity` normalises. Both encoders are pure functions of
(params, static cfg, arrays), so they jit as they are.

Axis legend: B texts, F frames, C channels, T tokens, Dt/Dv text/vision width,
P projection width.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from vxl_jax.config import ClipVisionConfig, ConfigError
from vxl_jax.model import clip, clip_text
from vxl_jax.model.clip_text import ClipTextConfig

# HF CLIPVisionConfig defaults, filled in before ClipVisionConfig (whose defaults are Video-XL's 336 px tower).
_HF_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "image_size": 224, "patch_size": 32, "num_channels": 3,
                       "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu", "projection_dim": 512}
_TOP_FIELDS = ("projection_dim", "logit_scale_init_value")
_SUB_CONFIGS = ("text_config", "vision_config")


@dataclasses.dataclass(frozen=True)
class ClipModelConfig:
    text: ClipTextConfig
    vision: ClipVisionConfig
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    # HF keys we do not model, verbatim: top-level ones, and under "text_config" /
    # "vision_config" those of each tower. Not hashed: the config stays a jit static arg.
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "ClipModelConfig":
        """From a `clip` config.json dict (missing fields take HF's defaults)."""
        if hf.get("model_type", "clip") != "clip":
            raise ConfigError(f"expected model_type 'clip', got {hf.get('model_type')!r}")
        text_hf, vision_hf = dict(hf.get("text_config") or {}), {**_HF_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
        text, vision = ClipTextConfig.from_hf_config(text_hf), ClipVisionConfig.from_hf_config(vision_hf)
        extra: dict[str, Any] = {k: v for k, v in hf.items() if k not in _TOP_FIELDS + _SUB_CONFIGS}
        for name, sub, modelled in (("text_config", text_hf, text.to_hf_config()),
                                    ("vision_config", vision_hf, vision.to_hf_config())):
            extra[name] = {k: v for k, v in sub.items() if k not in modelled and k != "projection_dim"}
        return cls(text=text, vision=vision, projection_dim=hf.get("projection_dim", 512),
                   logit_scale_init_value=hf.get("logit_scale_init_value", 2.6592), extra=extra)

    def to_hf_config(self) -> dict[str, Any]:
        """The `clip` config.json dict (unmodelled keys restored)."""
        out: dict[str, Any] = {"model_type": "clip", "architectures": ["CLIPModel"]}
        out.update({k: v for k, v in self.extra.items() if k not in _SUB_CONFIGS})
        out.update(projection_dim=self.projection_dim, logit_scale_init_value=self.logit_scale_init_value)
        for name, kind, tower in (("text_config", "clip_text_model", self.text),
                                  ("vision_config", "clip_vision_model", self.vision)):
            sub = {"model_type": kind, **self.extra.get(name, {})}
            sub.update({k: v for k, v in tower.to_hf_config().items() if v is not None})
            out[name] = dict(sorted(sub.items()))
        return dict(sorted(out.items()))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ClipModelConfig":
        file = os.path.join(os.fspath(path), "config.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path} is not an HF CLIPModel checkpoint: no config.json")
        with open(file) as f:
            return cls.from_hf_config(json.load(f))


def init_params(cfg: ClipModelConfig, key: jax.Array, param_dtype=jnp.float32) -> dict:
    k_text, k_vision, k_tp, k_vp = jax.random.split(key, 4)
    dt, dv, p = cfg.text.hidden_size, cfg.vision.hidden_size, cfg.projection_dim
    return {
        "text": clip_text.init_params(cfg.text, k_text, param_dtype),
        "vision": clip.init_params(cfg.vision, k_vision, param_dtype),
        "text_projection": jax.random.normal(k_tp, (dt, p), param_dtype) * dt ** -0.5,
        "visual_projection": jax.random.normal(k_vp, (dv, p), param_dtype) * dv ** -0.5,
        "logit_scale": jnp.asarray(cfg.logit_scale_init_value, param_dtype),
    }


def _project(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jnp.einsum("BD,DP->BP", x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)


def encode_text(params: dict, cfg: ClipModelConfig, ids: jax.Array, lengths: Optional[jax.Array] = None, *,
                dtype=jnp.float32) -> jax.Array:
    """ids [B, T] (right-padded; `lengths` [B] real tokens, None: all) -> [B, P] float32, not normalised."""
    pooled = clip_text.pooled_output(params["text"], cfg.text, ids, lengths=lengths, dtype=dtype)
    return _project(pooled, params["text_projection"])


def encode_images(params: dict, cfg: ClipModelConfig, pixels: jax.Array, *, dtype=jnp.float32) -> jax.Array:
    """pixels [F, C, H, W] (CLIP-normalised) -> [F, P] float32: CLS after every layer, post-normed, projected."""
    x = clip.hidden_state(params["vision"], cfg.vision, pixels, cfg.vision.num_layers, dtype=dtype)
    cls = clip_text.layer_norm(params["vision"]["post_norm"], x[:, 0], cfg.vision.layer_norm_eps)
    return _project(cls, params["visual_projection"])


def normalise(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def similarity(text_emb: jax.Array, image_emb: jax.Array) -> jax.Array:
    """[B, P] x [F, P] -> cosine similarity [B, F] (HF's logits_per_text before the logit scale)."""
    return jnp.einsum("BP,FP->BF", normalise(text_emb), normalise(image_emb), preferred_element_type=jnp.float32)
