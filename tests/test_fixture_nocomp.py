"""Parity with the original PyTorch Video-XL on the `nocomp_4f` golden fixture (uncompressed path)."""

import jax.numpy as jnp
import numpy as np
import pytest

from vxl_jax import golden
from vxl_jax.compress.memory import pre_rope_keys
from vxl_jax.model import projector, qwen2, videoxl


@pytest.fixture(scope="module")
def case(fixtures):
    params, cfg, _ = golden.load_checkpoint(fixtures / "ckpt_A")      # + resize_rows.npz: 513 columns
    inputs = dict(np.load(fixtures / "nocomp_4f" / "inputs.npz"))
    expected = dict(np.load(fixtures / "nocomp_4f" / "expected.npz"))
    pixels = (inputs["pixel_u8"].astype(np.float32) - 128.0) / 64.0
    return params, cfg, inputs, expected, pixels


def _max_diff(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def test_vision_path(case):
    params, cfg, _, expected, pixels = case
    clip_out = videoxl.clip_features(params, cfg, pixels)
    assert _max_diff(clip_out[:2], expected["clip_select_layer_patch_first2"]) < 1e-5
    prepool = projector.project(params["projector"], clip_out[:2])
    assert _max_diff(prepool, expected["projector_out_prepool_first2"]) < 1e-5
    assert _max_diff(videoxl.frame_features(params, cfg, pixels), expected["image_features"]) < 1e-5


def test_uncompressed_forward(case):
    params, cfg, inputs, expected, pixels = case
    prompt = inputs["input_ids"][0]
    ids, mask = videoxl.expand_placeholder(prompt, pixels.shape[0] * cfg.tokens_per_frame)
    # Placeholder rows carry id 512 in the fixture; we never look them up, any id works.
    assert np.array_equal(np.where(mask, 512, ids), inputs["expanded_input_ids"][0])
    feats = videoxl.frame_features(params, cfg, pixels)
    hidden, cache = videoxl.forward(params, cfg, jnp.asarray(ids)[None], visual_mask=jnp.asarray(mask)[None],
                                    features=feats.reshape(1, -1, feats.shape[-1]))
    logits = qwen2.logits(params["llm"], cfg.llm, hidden[0])
    assert logits.shape[-1] == 513
    assert _max_diff(logits[-1:], expected["last_logits"]) < 1e-4
    assert _max_diff(logits[-16:], expected["all_logits_suffix"]) < 1e-4
    # KV buffer [L, B, S, K, H], keys rotated to their slot -> the original's pre-RoPE keys [L, K, S, H]
    keys = pre_rope_keys(cache.k[:, 0], cfg.llm.rope_theta)
    assert _max_diff(keys.transpose(0, 2, 1, 3), expected["keys"]) < 1e-4
    assert _max_diff(cache.v[:, 0].transpose(0, 2, 1, 3), expected["values"]) < 1e-4


def test_placeholder_count_is_checked():
    with pytest.raises(ValueError, match="exactly one <image>"):
        videoxl.expand_placeholder(np.array([1, 2, 3]), 10)
    with pytest.raises(ValueError, match="found 2"):
        videoxl.expand_placeholder(np.array([1, -200, 3, -200]), 10)
