"""Training parity with the original: loss, logits and every gradient of `train_r4_25f` (TRAIN_FORMAT.md).

The case runs through the library's training path (`train.batch.prepare` ->
`train.loss.loss_terms`, the compressed prefill differentiated end to end:
frames streamed through CLIP window by window). `grad_image_features` is
taken with the features as the input instead, which separates LLM backward
errors from vision/projector ones. Tolerances are section 6's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vxl_jax.conversion import keymap
from vxl_jax.conversion.checkpoint import read_hf
from vxl_jax.conversion.engine import params_to_hf
from vxl_jax.model import videoxl
from vxl_jax.train import batch as train_batch
from vxl_jax.train import loss as train_loss

# Section 4a: no gradient at all (CLIP layer 1 is computed by the original but unused; post_layernorm unused).
CLIP = "model.vision_tower.vision_tower.vision_model."
NO_GRAD = {f"{CLIP}post_layernorm.{w}" for w in ("weight", "bias")} | {
    f"{CLIP}encoder.layers.1.{name}.{w}" for w in ("weight", "bias")
    for name in ("layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                 "self_attn.out_proj", "mlp.fc1", "mlp.fc2")}
# ... and present but structurally zero: the last layer's VST queries feed only unlabelled VST logits.
STRUCTURAL_ZERO = {"model.layers.1.self_attn.beacon_q_proj.weight", "model.layers.1.self_attn.beacon_q_proj.bias"}
PIXEL_NORM = (jnp.full(3, 128.0), jnp.full(3, 64.0))   # pixel_values = (u8 - 128) / 64


@pytest.fixture(scope="module")
def case(fixtures):
    params, cfg, _ = read_hf(str(fixtures / "ckpt_A"))          # no resize rows: train.py keeps vocab 512
    assert cfg.llm.vocab_size == 512
    params = jax.tree.map(jnp.asarray, params)
    inputs = dict(np.load(fixtures / "train_r4_25f" / "inputs.npz"))
    expected = dict(np.load(fixtures / "train_r4_25f" / "expected.npz"))
    u8 = inputs["pixel_u8"]
    per_window = cfg.vst.window // cfg.tokens_per_frame
    windows = -(-len(u8) // per_window)
    frames = np.zeros((1, windows * per_window, *u8.shape[1:]), np.uint8)
    frames[0, :len(u8)] = u8
    ids = inputs["input_ids"].astype(np.int32)

    def batch(labels):
        return {"input_ids": ids, "labels": labels.astype(np.int32), "text_mask": np.ones(ids.shape, bool),
                "frames": frames, "num_frames": np.array([len(u8)], np.int32),
                "ratios": np.full((1, windows), 4, np.int32)}

    return params, cfg, inputs, expected, batch


def _hf_grads(grads, cfg) -> dict:
    tensors, _ = params_to_hf(jax.tree.map(np.asarray, grads), keymap.videoxl_rules(cfg))
    return dict(tensors)


def _check_grads(ours: dict, expected: dict, prefix: str):
    ref = {k[len(prefix):]: v for k, v in expected.items() if k.startswith(prefix)}
    assert len(ref) == 65
    assert set(ref) | NO_GRAD == set(ours)
    for name, want in ref.items():
        got = ours[name]
        if name in STRUCTURAL_ZERO:
            assert np.all(got == 0) and np.all(want == 0), name
            continue
        tol = 1e-4 * np.abs(want).max() + 1e-7
        assert np.abs(got - want).max() <= tol, (name, np.abs(got - want).max(), tol)
    for name in NO_GRAD:
        assert np.all(ours[name] == 0), name
    zero = {n for n, g in ours.items() if not np.any(g)}
    assert zero == NO_GRAD | STRUCTURAL_ZERO


def test_train_loss_logits_and_every_gradient(case):
    params, cfg, inputs, expected, batch = case
    prepared = train_batch.prepare(batch(inputs["labels"]), cfg, (4,))
    assert prepared.targets == int(expected["valid_token_num_total"]) == 14

    def loss(p):
        terms = train_loss.loss_terms(p, cfg, prepared.inputs, spec=prepared.spec, pixel_norm=PIXEL_NORM,
                                      return_logits=True)
        return terms.ce_sum / terms.count, terms

    (value, terms), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert abs(float(value) - float(expected["loss"])) <= 1e-5
    np.testing.assert_allclose(terms.prefix_logits[0, :14], expected["sink_step_logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(terms.suffix_logits[0, :24], expected["text_step_logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(terms.suffix_logits[0, 15:22], expected["answer_logits"], atol=1e-4, rtol=0)
    ours = _hf_grads(grads, cfg)
    _check_grads(ours, expected, "grad:")
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in ours.values()))
    assert abs(norm - float(expected["global_grad_norm"])) <= 1e-4 * float(expected["global_grad_norm"])
    rows = np.flatnonzero(np.any(ours["model.embed_tokens.weight"] != 0, axis=1))
    np.testing.assert_array_equal(rows, expected["embed_tokens_grad_rows"])


@pytest.mark.parametrize("labels,prefix", [("labels", ""), ("labels_answer_only", "ao_")])
def test_grad_image_features_and_answer_only(case, labels, prefix):
    """Both label sets with the features as input: loss, logits, d loss / d image_features."""
    params, cfg, inputs, expected, batch = case
    feats = videoxl.frame_features(params, cfg, (inputs["pixel_u8"].astype(np.float32) - 128.0) / 64.0)
    np.testing.assert_allclose(feats, expected["image_features"], atol=1e-5, rtol=0)
    b = batch(inputs[labels])
    prepared = train_batch.prepare(b, cfg, (4,))
    n = feats.shape[0] * feats.shape[1]
    visual = jnp.zeros((1, b["ratios"].shape[1] * cfg.vst.window, feats.shape[-1])).at[0, :n].set(
        feats.reshape(n, -1))

    def loss(v, p):
        terms = train_loss.loss_terms(p, cfg, prepared.inputs.replace(visual=v), spec=prepared.spec,
                                      return_logits=True)
        return terms.ce_sum / terms.count, terms

    (value, terms), (g_feats, g_params) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        visual, params)
    assert abs(float(value) - float(expected[f"{prefix}loss"])) <= 1e-5
    np.testing.assert_allclose(terms.suffix_logits[0, :24], expected[f"{prefix}text_step_logits"], atol=1e-4,
                               rtol=0)
    want = expected[f"{prefix}grad_image_features"]
    got = np.asarray(g_feats[0, :n]).reshape(want.shape)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max() + 1e-7
    assert np.all(np.any(got != 0, axis=-1)), "every visual row reaches the loss through the VST K/V"
    if prefix:   # the answer-only gradients of the LLM (vision params are not on this path)
        ours = _hf_grads(g_params, cfg)
        for name in ours:
            if name.startswith(("model.layers", "model.embed", "model.norm", "lm_head", "model.beacon")) \
                    and name not in STRUCTURAL_ZERO:
                ref = expected[f"ao_grad:{name}"]
                assert np.abs(ours[name] - ref).max() <= 1e-4 * np.abs(ref).max() + 1e-7, name
