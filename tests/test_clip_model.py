"""The CLIP dual encoder (relevance oracle): parity with HF `CLIPModel`, conversion, tokenizer, CLI.

The tiny checkpoint of `write_tiny_clip` (seeded random weights at O(1) scales,
a tiny BPE tokenizer with eos id 1) is loaded both by us and by transformers'
CLIPModel (torch, CPU, float32, eager attention). Checked:

  * projected text / image features == HF `get_text_features` / `get_image_features`
    for a right-padded batch of texts and a few frames; cosine x exp(logit_scale)
    == HF `logits_per_text`; the legacy eos id 2 pooling too;
  * JAX -> HF -> JAX and HF -> JAX -> HF are bit-exact; bad keys are named;
  * the tokenizer loads offline and `embed_text` / `embed_frames` equal the encoders;
  * `vxl tiny-clip` writes the same bytes for the same seed.
"""

from __future__ import annotations

import json
import shutil

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vxl_jax.cli.main import main as vxl  # noqa: E402
from vxl_jax.conversion.clip_model import (clip_model_rules, load_clip_model, load_tokenizer,  # noqa: E402
                                           read_clip_model, save_clip_model, write_tiny_clip)
from vxl_jax.conversion.engine import ConversionError  # noqa: E402
from vxl_jax.conversion.safetensors_io import CheckpointReader  # noqa: E402
from vxl_jax.data.preprocess import preprocess_frames  # noqa: E402
from vxl_jax.model import clip_dual  # noqa: E402
from vxl_jax.model.clip_dual import ClipModelConfig  # noqa: E402

TOL = 1e-5
TEXTS = ["a dog", "A red car moves left in the street while a man walks", "what", "two people sitting at a table"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_clip")
    write_tiny_clip(path, seed=0)
    return path


@pytest.fixture(scope="module")
def model(tiny):
    return load_clip_model(tiny)


def _hf(path) -> "transformers.CLIPModel":
    hf, info = transformers.CLIPModel.from_pretrained(path, attn_implementation="eager", dtype=torch.float32,
                                                      output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return hf.eval()


@pytest.fixture(scope="module")
def hf_model(tiny):
    return _hf(tiny)


def _hf_text(hf, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                    attention_mask=torch.from_numpy(mask).long()).pooler_output.numpy()


def _hf_image(hf, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output.numpy()


def _batch(model):
    enc = model.tokenizer(TEXTS, padding=True, return_tensors="np")
    return enc["input_ids"], enc["attention_mask"]


# -------------------------------------------------------------------- parity

def test_features_match_hf_clip_model(model, hf_model):
    ids, mask = _batch(model)
    lengths = mask.sum(axis=1)
    assert len(set(lengths.tolist())) >= 3 and not mask.all()                      # right-padded, lengths differ
    ours = np.asarray(clip_dual.encode_text(model.params, model.cfg, ids, lengths))
    theirs = _hf_text(hf_model, ids, mask)
    text_err = np.abs(ours - theirs).max()
    assert ours.shape == (len(TEXTS), 16) and text_err < TOL, text_err

    pixels = np.random.default_rng(1).standard_normal((3, 3, 224, 224)).astype(np.float32)
    image = np.asarray(clip_dual.encode_images(model.params, model.cfg, pixels))
    image_err = np.abs(image - _hf_image(hf_model, pixels)).max()
    assert image.shape == (3, 16) and image_err < TOL, image_err

    with torch.no_grad():
        logits = hf_model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                          pixel_values=torch.from_numpy(pixels)).logits_per_text.numpy()
    cosine = np.asarray(clip_dual.similarity(ours, image))
    np.testing.assert_allclose(cosine * np.exp(float(model.params["logit_scale"])), logits, atol=1e-4)
    assert np.all(np.abs(cosine) <= 1 + 1e-6)


def test_legacy_eos_id_2_pools_at_the_largest_id(model, tiny, tmp_path):
    """Configs from before the eos id was stored say 2: HF then pools at argmax(ids), and so do we."""
    shutil.copytree(tiny, tmp_path / "legacy")
    config = json.loads((tmp_path / "legacy" / "config.json").read_text())
    config["text_config"]["eos_token_id"] = 2
    (tmp_path / "legacy" / "config.json").write_text(json.dumps(config))
    legacy = load_clip_model(tmp_path / "legacy")
    ids, mask = _batch(model)
    assert np.any(ids.argmax(axis=1) != (ids == 1).argmax(axis=1))                # the two rules pick other tokens
    ours = np.asarray(clip_dual.encode_text(legacy.params, legacy.cfg, ids, mask.sum(axis=1)))
    err = np.abs(ours - _hf_text(_hf(tmp_path / "legacy"), ids, mask)).max()
    assert err < TOL, err
    modern = np.asarray(clip_dual.encode_text(model.params, model.cfg, ids, mask.sum(axis=1)))
    assert np.abs(ours - modern).max() > 1e-2


# ---------------------------------------------------------------- conversion

def _same_files(a, b):
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert ra.keys() == rb.keys()
    for key in ra.keys():
        x, y = ra.get(key), rb.get(key)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), key


def test_round_trips_are_bit_exact(tiny, tmp_path):
    cfg = ClipModelConfig.from_pretrained(tiny)
    params = clip_dual.init_params(cfg, jax.random.key(3))
    save_clip_model(tmp_path / "from_jax", params, cfg)
    back, back_cfg, stats = read_clip_model(tmp_path / "from_jax")
    assert back_cfg == cfg and stats.tensors == len(CheckpointReader(tmp_path / "from_jax").keys())
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, back)
    assert jax.tree.structure(params) == jax.tree.structure(back)

    hf_params, hf_cfg, _ = read_clip_model(tiny)
    save_clip_model(tmp_path / "again", hf_params, hf_cfg)
    _same_files(tiny, tmp_path / "again")
    assert (json.loads((tmp_path / "again" / "config.json").read_text())
            == json.loads((tiny / "config.json").read_text()))


def test_position_id_buffers_are_accepted_and_reported(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file
    shutil.copytree(tiny, tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    tensors["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    tensors["vision_model.embeddings.position_ids"] = np.arange(50, dtype=np.int64)[None]
    save_file(tensors, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    _, _, stats = read_clip_model(tmp_path / "ckpt")
    assert set(stats.ignored) == {"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"}


def test_bad_keys_are_reported_by_name(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file
    shutil.copytree(tiny, tmp_path / "bad")
    tensors = load_file(tmp_path / "bad" / "model.safetensors")
    del tensors["text_model.final_layer_norm.bias"]
    tensors["visual_projection.weight"] = tensors["visual_projection.weight"][:, :-1]
    tensors["text_model.encoder.layers.2.mlp.fc1.weight"] = np.zeros((64, 32), np.float32)
    save_file(tensors, tmp_path / "bad" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError) as info:
        read_clip_model(tmp_path / "bad")
    text = str(info.value)
    assert len(info.value.problems) == 3
    assert "missing key text_model.final_layer_norm.bias" in text
    assert "wrong shape for visual_projection.weight: checkpoint has [16, 31]" in text
    assert "unexpected key text_model.encoder.layers.2.mlp.fc1.weight" in text

    cfg = ClipModelConfig.from_pretrained(tiny)
    params = read_clip_model(tiny)[0]
    params["text"]["pos_embed"] = params["text"]["pos_embed"][:10]
    with pytest.raises(ConversionError, match="wrong shape for text/pos_embed"):
        save_clip_model(tmp_path / "out", params, cfg)


def test_config_maps_hf_defaults_both_ways():
    hf = transformers.CLIPConfig().to_dict()
    cfg = ClipModelConfig.from_hf_config(hf)
    assert (cfg.text.eos_token_id, cfg.text.vocab_size, cfg.vision.image_size, cfg.vision.patch_size,
            cfg.projection_dim) == (49407, 49408, 224, 32, 512)
    assert ClipModelConfig.from_hf_config(cfg.to_hf_config()) == cfg
    again = transformers.CLIPConfig(**cfg.to_hf_config())
    assert again.text_config.num_hidden_layers == 12 and again.vision_config.hidden_size == 768
    # A sparse config.json (fields left at HF's defaults) means the same here.
    sparse = ClipModelConfig.from_hf_config({"model_type": "clip", "text_config": {}, "vision_config": {}})
    assert (sparse.text, sparse.vision) == (cfg.text, cfg.vision)


# ------------------------------------------------------- tokenizer, embedders

def test_tokenizer_loads_offline_and_embedders_equal_the_encoders(model, tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = load_tokenizer(tiny)
    ids = tok(["A dog"])["input_ids"][0]
    assert (ids[0], ids[-1]) == (0, 1) == (model.cfg.text.bos_token_id, model.cfg.text.eos_token_id)

    long_text = " ".join(["the red car"] * 40)
    padded, lengths = model.tokenize(TEXTS + [long_text])
    assert padded.shape == (5, 77) and lengths[-1] == 77 and padded[-1, -1] == 1       # truncated, eos kept
    got = model.embed_text(TEXTS + [long_text])
    want = jax.jit(clip_dual.encode_text, static_argnums=1)(model.params, model.cfg, padded, lengths)
    np.testing.assert_array_equal(got, np.asarray(want))
    # The right padding to 77 changes nothing: same as the tokenizer's own shortest batch.
    ids, mask = _batch(model)
    short = clip_dual.encode_text(model.params, model.cfg, ids, mask.sum(axis=1))
    np.testing.assert_allclose(got[:4], np.asarray(short), atol=1e-6)

    frames = np.random.default_rng(2).integers(0, 256, (3, 180, 240, 3), dtype=np.uint8)
    small_batches = load_clip_model(tiny, frame_batch=2)
    emb = small_batches.embed_frames(frames)                                           # batches of 2, last padded
    want = clip_dual.encode_images(model.params, model.cfg, preprocess_frames(frames, size=224))
    np.testing.assert_allclose(emb, np.asarray(want), atol=1e-6)
    assert emb.shape == (3, 16) and emb.dtype == np.float32


def test_tiny_clip_command(tmp_path, capsys):
    assert vxl(["tiny-clip", str(tmp_path / "a"), "--seed", "3"]) == 0
    assert "seed 3" in capsys.readouterr().out
    write_tiny_clip(tmp_path / "b", seed=3)
    _same_files(tmp_path / "a", tmp_path / "b")
    cfg = ClipModelConfig.from_pretrained(tmp_path / "a")
    assert len(CheckpointReader(tmp_path / "a").keys()) == sum(len(r.hf_keys()) for r in clip_model_rules(cfg))
    assert load_tokenizer(tmp_path / "a") is not None
    assert jnp.ndim(read_clip_model(tmp_path / "a")[0]["logit_scale"]) == 0
