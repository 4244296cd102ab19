"""CLIP ViT vision tower (pre-layernorm, quick-GELU), as used by Video-XL.

  params = {
    "patch_embed": [P, P, C, D]   (conv kernel, no bias, stride P)
    "class_embed": [D],
    "pos_embed":   [1 + g*g, D],
    "pre_norm":    {"scale", "bias"},     (HF `pre_layrnorm`)
    "layers":      EncoderLayer params stacked on a leading L axis,
    "post_norm":   {"scale", "bias"},     (kept for conversion; Video-XL never uses it)
  }

The feature is `hidden_states[select_layer]` of HF CLIPVisionModel, where
hidden_states[0] is the pre-layernorm output, so only the first
`VideoXLConfig.vision_layers_used` layers are run (23 of 24 for the 7B model).

Axis legend: F frames, C channels, i/j patch grid rows/cols, P/Q pixel offsets
inside a patch, T tokens, D width, N heads, H head dim, I MLP width.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vxl_jax.config import ClipVisionConfig
from vxl_jax.model.attention import full_attention


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


class EncoderLayer(nn.Module):
    cfg: ClipVisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                                         use_fast_variance=False, name=name)
        proj = lambda name: nn.DenseGeneral((heads, head_dim), dtype=self.dtype, param_dtype=self.param_dtype,
                                            name=name)
        h = norm("layer_norm1")(x)
        q, k, v = proj("q_proj")(h), proj("k_proj")(h), proj("v_proj")(h)      # [F, T, N, H]
        out = full_attention(q, k, v)                                            # [F, T, N, H]
        x = x + nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                                name="out_proj")(out)
        h = norm("layer_norm2")(x)
        h = nn.Dense(cfg.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(h)
        h = _ACTIVATIONS[cfg.hidden_act](h)
        return x + nn.Dense(cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(h)


def _layer_norm(cfg: ClipVisionConfig, params: dict, x):
    return nn.LayerNorm(cfg.layer_norm_eps, use_fast_variance=False, dtype=x.dtype).apply({"params": params}, x)


def init_params(cfg: ClipVisionConfig, key: jax.Array, param_dtype=jnp.float32) -> dict:
    k_layers, k_patch, k_cls, k_pos = jax.random.split(key, 4)
    d, p = cfg.hidden_size, cfg.patch_size
    layer = EncoderLayer(cfg, param_dtype=param_dtype)
    x = jnp.zeros((1, 1, d), param_dtype)
    ln = {"scale": jnp.ones((d,), param_dtype), "bias": jnp.zeros((d,), param_dtype)}
    fan_in = p * p * cfg.num_channels
    return {
        "patch_embed": jax.random.normal(k_patch, (p, p, cfg.num_channels, d), param_dtype) * fan_in ** -0.5,
        "class_embed": jax.random.normal(k_cls, (d,), param_dtype),
        "pos_embed": jax.random.normal(k_pos, (1 + cfg.num_patches, d), param_dtype) * 0.02,
        "pre_norm": dict(ln),
        "layers": jax.vmap(lambda k: layer.init(k, x)["params"])(jax.random.split(k_layers, cfg.num_layers)),
        "post_norm": dict(ln),
    }


def embed_patches(params: dict, cfg: ClipVisionConfig, pixels: jax.Array, dtype=jnp.float32) -> jax.Array:
    """pixels [F, C, H, W] (preprocessed, float) -> pre-layernormed tokens [F, 1 + g*g, D]."""
    f, c, _, _ = pixels.shape
    g, p = cfg.grid, cfg.patch_size
    patches = pixels.astype(dtype).reshape(f, c, g, p, g, p)
    tokens = jnp.einsum("FCiPjQ,PQCD->FijD", patches, params["patch_embed"].astype(dtype),
                        preferred_element_type=jnp.float32).astype(dtype).reshape(f, g * g, -1)
    cls = jnp.broadcast_to(params["class_embed"].astype(dtype), (f, 1, tokens.shape[-1]))
    x = jnp.concatenate([cls, tokens], axis=1) + params["pos_embed"].astype(dtype)[None]
    return _layer_norm(cfg, params["pre_norm"], x)


def hidden_state(params: dict, cfg: ClipVisionConfig, pixels: jax.Array, num_layers: int, *,
                 dtype=jnp.float32, remat: bool = False) -> jax.Array:
    """HF `hidden_states[num_layers]`: the output of the first `num_layers` layers, [F, 1 + g*g, D]."""
    layer = EncoderLayer(cfg, dtype=dtype, param_dtype=params["class_embed"].dtype)
    body = lambda x, p: (layer.apply({"params": p}, x), None)
    if remat:
        body = jax.checkpoint(body, prevent_cse=False)
    used = jax.tree.map(lambda a: a[:num_layers], params["layers"])
    x, _ = jax.lax.scan(body, embed_patches(params, cfg, pixels, dtype), used)
    return x
