"""Random inputs for the compression tests: a tiny model with short windows, prompts, visual features."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vxl_jax.tiny import random_params, tiny_config


def windowed_model(window: int, seed: int = 7):
    """(params, cfg) of the tiny model with windows of `window` visual tokens."""
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, vst=dataclasses.replace(cfg.vst, window=window))
    return jax.tree.map(jnp.asarray, random_params(cfg, seed=seed)), cfg


def random_prompt(rng, prefix: int, suffix: int) -> np.ndarray:
    """`prefix` text ids, the <image> placeholder, `suffix` text ids."""
    return np.concatenate([rng.integers(11, 490, prefix), [-200], rng.integers(11, 490, suffix)])


def random_features(rng, n: int, cfg) -> np.ndarray:
    """n visual tokens [n, D] of O(1) scale."""
    return (0.6 * rng.standard_normal((n, cfg.llm.hidden_size))).astype(np.float32)
