"""Tiny seeded random Video-XL checkpoints in the HF format, for demos and tests.

The shape is the fixtures' (`configs/tiny.json`: Qwen2 hidden 64, 2 layers, 4
heads, 2 KV heads, vocab 512; CLIP hidden 32, 2 layers, 336 px). Tensors are
drawn in HF key space with the fixtures' scales, so activations are O(1) and
attention is not uniform: >=2-D weights N(0, 1/fan_in), embedding tables
N(0, 1), biases N(0, 0.1^2), norm weights 1 + N(0, 0.1^2).
"""

from __future__ import annotations

import numpy as np

from vxl_jax.config import VideoXLConfig
from vxl_jax.conversion import keymap
from vxl_jax.conversion.checkpoint import write_hf
from vxl_jax.conversion.engine import set_path

_EMBEDDINGS = ("embed_tokens", "position_embedding", "class_embedding")
_NORMS = ("norm", "layrnorm", "layer_norm")


def tiny_config() -> VideoXLConfig:
    return VideoXLConfig.load("tiny")


def _draw(rng: np.random.Generator, key: str, shape: tuple[int, ...]) -> np.ndarray:
    name = key.rsplit(".", 1)[0]
    if any(e in key for e in _EMBEDDINGS):
        out = rng.standard_normal(shape)
    elif key.endswith(".bias"):
        out = 0.1 * rng.standard_normal(shape)
    elif any(n in name.rsplit(".", 1)[-1] for n in _NORMS):
        out = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
        fan_in = int(np.prod(shape[1:]))
        out = rng.standard_normal(shape) / np.sqrt(fan_in)
    return out.astype(np.float32)


def random_params(cfg: VideoXLConfig, seed: int = 0) -> dict:
    """Params (numpy float32) drawn key by key in sorted HF-name order."""
    rng = np.random.default_rng(seed)
    rules = {key: rule for rule in keymap.videoxl_rules(cfg) for key in rule.hf_keys()}
    params: dict = {}
    staged: dict = {}
    for key in sorted(rules):
        rule = rules[key]
        tensor = rule.transform.to_jax(_draw(rng, key, rule.hf_shape))
        if rule.layers:
            target = staged.setdefault(rule.path, np.empty(rule.jax_shape(), np.float32))
            target[int(rule.pattern.match(key).group(1))] = tensor
        else:
            set_path(params, rule.path, tensor)
    for path, target in staged.items():
        set_path(params, path, target)
    return params


def write_tiny_checkpoint(out_dir: str, seed: int = 0, cfg: VideoXLConfig | None = None,
                          tokenizer: bool = True) -> VideoXLConfig:
    """Writes a seeded random Video-XL checkpoint (HF format) to out_dir; returns its config.

    With `tokenizer`, the project's tiny BPE tokenizer (Qwen2 special tokens and
    chat template, `data/tiny_tokenizer.py`) is saved beside the weights, sized
    to the config's vocabulary (up to 65536 ids), so `vxl infer` can run on it.
    """
    cfg = cfg or tiny_config()
    write_hf(out_dir, random_params(cfg, seed), cfg)
    if tokenizer and cfg.llm.vocab_size <= 65536:
        from vxl_jax.data import tiny_tokenizer
        tiny_tokenizer.save(out_dir, cfg.llm.vocab_size)
    return cfg
