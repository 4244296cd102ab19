"""CLIP text tower (HF `CLIPTextModel`): causal pre-LN transformer, pooled at the EOS token.

  params = {
    "token_embed": [V, D],
    "pos_embed":   [Tmax, D],               (absolute, learned; positions 0..T-1)
    "layers":      TextEncoderLayer params stacked on a leading L axis
                   (the names of model/clip.py's EncoderLayer: layer_norm1, q/k/v/out_proj,
                   layer_norm2, fc1, fc2),
    "final_norm":  {"scale", "bias"},       (HF `final_layer_norm`)
  }

A batch is right-padded: token t of row b is real when t < lengths[b] (or
attention_mask[b, t] == 1). A query sees keys that are both causal (s <= t) and
real. With right padding the padding cannot reach a real token through the
causal mask anyway; the key mask keeps padded rows equal to HF's too.

Pooling follows transformers 5.23: a config with the legacy `eos_token_id == 2`
(written before the tokenizer's eos was stored) pools at the largest id of each
row (the eot token is the top id of the original vocabulary); any other config
pools at the first position of `eos_token_id` (position 0 when absent).

Axis legend: B batch, T query tokens, S key tokens, D width, N heads, H head dim,
I MLP width, V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vxl_jax.config import ConfigError
from vxl_jax.model.clip import _ACTIVATIONS
from vxl_jax.model.attention import dense_attention

# HF CLIPTextConfig name -> ours.
_TEXT_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "max_position_embeddings": "max_position_embeddings",
    "layer_norm_eps": "layer_norm_eps",
    "hidden_act": "hidden_act",
    "eos_token_id": "eos_token_id",
    "bos_token_id": "bos_token_id",
    "pad_token_id": "pad_token_id",
    "projection_dim": "projection_dim",
}
LEGACY_EOS_ID = 2


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
    """Defaults are HF CLIPTextConfig's, so a config.json that omits a field means the same here."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_layers: int = 12
    num_heads: int = 8
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    eos_token_id: int = 49407
    bos_token_id: int = 49406
    pad_token_id: int = 1
    projection_dim: Optional[int] = 512

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"text hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(f"unsupported CLIP text hidden_act {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "ClipTextConfig":
        """From a `clip_text_model` config.json dict, or a full `clip` one (its text_config)."""
        if hf.get("model_type") == "clip" or "text_config" in hf:
            hf = hf.get("text_config") or {}
        return cls(**{ours: hf[theirs] for theirs, ours in _TEXT_FIELDS.items() if theirs in hf})

    def to_hf_config(self) -> dict[str, Any]:
        return {theirs: getattr(self, ours) for theirs, ours in _TEXT_FIELDS.items()
                if getattr(self, ours) is not None}


class TextEncoderLayer(nn.Module):
    """model/clip.py's EncoderLayer with a [B, T, S] attention mask (same parameter names)."""

    cfg: ClipTextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, use_fast_variance=False, name=name, **kw)
        proj = lambda name: nn.DenseGeneral((cfg.num_heads, cfg.head_dim), name=name, **kw)
        h = norm("layer_norm1")(x)
        q, k, v = proj("q_proj")(h), proj("k_proj")(h), proj("v_proj")(h)      # [B, T, N, H]
        out = dense_attention(q, k, v, mask)                                     # [B, T, N, H]
        x = x + nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), name="out_proj", **kw)(out)
        h = norm("layer_norm2")(x)
        h = _ACTIVATIONS[cfg.hidden_act](nn.Dense(cfg.intermediate_size, name="fc1", **kw)(h))
        return x + nn.Dense(cfg.hidden_size, name="fc2", **kw)(h)


def layer_norm(params: dict, x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm with a {"scale", "bias"} dict, exact variance (as torch)."""
    return nn.LayerNorm(eps, use_fast_variance=False, dtype=x.dtype).apply({"params": params}, x)


def init_params(cfg: ClipTextConfig, key: jax.Array, param_dtype=jnp.float32) -> dict:
    k_layers, k_tok, k_pos = jax.random.split(key, 3)
    d = cfg.hidden_size
    layer = TextEncoderLayer(cfg, param_dtype=param_dtype)
    x, mask = jnp.zeros((1, 1, d), param_dtype), jnp.ones((1, 1, 1), bool)
    return {
        "token_embed": jax.random.normal(k_tok, (cfg.vocab_size, d), param_dtype) * 0.02,
        "pos_embed": jax.random.normal(k_pos, (cfg.max_position_embeddings, d), param_dtype) * 0.01,
        "layers": jax.vmap(lambda k: layer.init(k, x, mask)["params"])(jax.random.split(k_layers, cfg.num_layers)),
        "final_norm": {"scale": jnp.ones((d,), param_dtype), "bias": jnp.zeros((d,), param_dtype)},
    }


def key_mask(t: int, lengths: Optional[jax.Array] = None, attention_mask: Optional[jax.Array] = None,
             batch: int = 1) -> jax.Array:
    """[B, T] True where a token is real: from `lengths` [B], from a 0/1 `attention_mask` [B, T], or all."""
    if attention_mask is not None:
        return jnp.asarray(attention_mask).astype(bool)
    if lengths is not None:
        return jnp.arange(t)[None, :] < jnp.asarray(lengths)[:, None]
    return jnp.ones((batch, t), bool)


def attention_mask_3d(real: jax.Array) -> jax.Array:
    """[B, T] real-token mask -> [B, T, S]: key s visible to query t when s <= t and s is real."""
    t = real.shape[-1]
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]                # [T, S]
    return causal[None] & real[:, None, :]


def eos_positions(cfg: ClipTextConfig, ids: jax.Array) -> jax.Array:
    """[B] pooling position of each row, transformers 5.23's rule (see the module docstring)."""
    if cfg.eos_token_id == LEGACY_EOS_ID:
        return jnp.argmax(ids, axis=-1)
    return jnp.argmax((ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)


def last_hidden_state(params: dict, cfg: ClipTextConfig, ids: jax.Array, *, lengths: Optional[jax.Array] = None,
                      attention_mask: Optional[jax.Array] = None, dtype=jnp.float32) -> jax.Array:
    """ids [B, T] -> final-layer-normed hidden states [B, T, D] (HF `last_hidden_state`)."""
    b, t = ids.shape
    if t > cfg.max_position_embeddings:
        raise ValueError(f"{t} tokens exceed max_position_embeddings {cfg.max_position_embeddings}")
    x = (jnp.take(params["token_embed"], ids, axis=0) + params["pos_embed"][:t][None]).astype(dtype)
    mask = attention_mask_3d(key_mask(t, lengths, attention_mask, b))
    layer = TextEncoderLayer(cfg, dtype=dtype, param_dtype=params["token_embed"].dtype)
    x, _ = jax.lax.scan(lambda h, p: (layer.apply({"params": p}, h, mask), None), x, params["layers"])
    return layer_norm(params["final_norm"], x, cfg.layer_norm_eps)


def pooled_output(params: dict, cfg: ClipTextConfig, ids: jax.Array, **kwargs) -> jax.Array:
    """ids [B, T] -> [B, D]: the final-normed state at each row's EOS (HF `pooler_output`)."""
    x = last_hidden_state(params, cfg, ids, **kwargs)
    return jnp.take_along_axis(x, eos_positions(cfg, ids)[:, None, None], axis=1)[:, 0]
