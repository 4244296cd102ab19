"""High-resolution images as tiles ("anyres" + "unires", `vxl_jax/data/unires.py`) against the ORIGINAL code.

The fixtures in tests/fixtures/unires/ were made once by `make_unires_fixtures.py`, which runs the original's
own `process_anyres_image`, `get_anyres_image_grid_shape`, `select_best_resolution` and the model's
`get_image_features` (unires merge) on a tiny random model; this test needs only the saved files.
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from vxl_jax.config import ConfigError, ImageConfig, VideoXLConfig
from vxl_jax.conversion.engine import hf_to_params
from vxl_jax.conversion.keymap import projector_rules, vision_rules
from vxl_jax.conversion.safetensors_io import CheckpointReader
from vxl_jax.data import unires, video
from vxl_jax.model import videoxl

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "unires")


def _cases():
    data = np.load(os.path.join(HERE, "cases.npz"))
    names = sorted({k.split("/")[0] for k in data.files})
    return {n: {k.split("/")[1]: data[k] for k in data.files if k.startswith(n + "/")} for n in names}


CASES = _cases()


def _pinpoints(case):
    p = case["pinpoints"]
    return str(p) if p.dtype.kind == "U" else p.tolist()


def _fixture_config() -> VideoXLConfig:
    with open(os.path.join(HERE, "config.json")) as f:
        hf = json.load(f)
    with open(os.path.join(HERE, "vision_tower", "config.json")) as f:
        vision = json.load(f)
    return VideoXLConfig.from_hf_config(hf, vision)


@pytest.mark.parametrize("name", sorted(CASES))
def test_tiles_equal_the_originals_bit_for_bit(name):
    case = CASES[name]
    pins = _pinpoints(case)
    tiles = unires.tile_image(case["image"], pins)
    assert tiles.grid == tuple(case["grid"]) == unires.grid_shape(case["image"].shape[1::-1], pins)
    assert tiles.resolution == tuple(case["resolution"])
    np.testing.assert_array_equal(tiles.channels_first(), case["tiles_u8"])
    pixels = unires.pixel_values(tiles.frames)
    assert pixels.shape == (len(tiles.frames), 3, 336, 336) and pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels[:, :, ::16, ::16], case["pixels_sub"])


def test_merged_features_equal_the_originals():
    """CLIP -> projector -> 2x2 average pool per tile, tiles in order == the original's unires merge."""
    cfg = _fixture_config()
    reader = CheckpointReader(os.path.join(HERE, "weights.safetensors"))
    params, _ = hf_to_params(reader, vision_rules(cfg.vision) + projector_rules(cfg.projector, cfg.llm.hidden_size),
                             progress=False)
    names = sorted(CASES)
    tiles = [unires.tile_image(CASES[n]["image"], _pinpoints(CASES[n])).frames for n in names]
    pixels = unires.pixel_values(np.concatenate(tiles))          # all 14 tiles in one call: one compilation
    feats = np.asarray(jax.jit(videoxl.frame_features, static_argnums=1)(params, cfg, pixels))
    start = 0
    for n, t in zip(names, tiles):
        got = feats[start:start + len(t)].reshape(-1, feats.shape[-1])
        start += len(t)
        want = CASES[n]["features"]
        assert got.shape == want.shape and unires.num_tokens(CASES[n]["image"].shape[1::-1], _image_cfg(cfg, n)) \
            == len(want)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=n)


def _image_cfg(cfg, name):
    return dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, grid_pinpoints=_pinpoints(CASES[name])))


def test_the_authors_pinpoints_and_the_string_forms():
    authors = unires.authors_pinpoints()
    assert list(authors) == [tuple(p) for p in CASES["wide_500x200"]["pinpoints"].tolist()]
    assert unires.parse_pinpoints(str(CASES["tall_200x700"]["pinpoints"])) == authors
    assert len(authors) == 200 and max(w * h for w, h in authors) == 49 * 336 * 336 and (336, 336) not in authors
    assert unires.parse_pinpoints("(1x1),(2x3)") == ((336, 336), (336, 672), (336, 1008), (672, 336), (672, 672),
                                                     (672, 1008))
    assert unires.parse_pinpoints("(1x1),...,(2x2)", tile=112) == ((112, 112), (112, 224), (224, 112), (224, 224))
    assert unires.parse_pinpoints([[336, 672]]) == ((336, 672),)


@pytest.mark.parametrize("pins, match", [
    ([], "empty"), ("[]", "empty"), ([[336, 500]], "multiple of the 336"), ([[0, 336]], "positive multiple"),
    ([[336]], "pair"), ([["336", 336]], "pair"), ("[(336, 672", "neither"), ("(axb)", "no '\\(WxH\\)'"),
    (None, "list of"), ("(2x2),(1x1)", "empty range")])
def test_bad_pinpoints_are_named(pins, match):
    with pytest.raises(ValueError, match=match):
        unires.parse_pinpoints(pins)


def test_config_reads_and_writes_the_image_keys():
    cfg = _fixture_config()
    assert cfg.image == ImageConfig("anyres", unires.authors_pinpoints(), "unires") and cfg.image.tiles
    with open(os.path.join(HERE, "config.json")) as f:
        hf = json.load(f)
    out, _ = cfg.to_hf_config()
    for key in ("image_aspect_ratio", "image_grid_pinpoints", "mm_patch_merge_type"):
        assert out[key] == hf[key] and key not in cfg.extra
    assert VideoXLConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg      # our own JSON format
    hash(cfg)                                                                        # a jit static argument
    # The range string is kept as written; absent pinpoints stay absent (the released config has none).
    ranged = dataclasses.replace(cfg, image=ImageConfig("anyres_max_9", "(1x1),...,(3x3)", "unires"))
    again = VideoXLConfig.from_hf_config(*ranged.to_hf_config())
    assert again.image == ranged.image and again.image.tiles
    plain = dataclasses.replace(cfg, image=ImageConfig("anyres", None, "unires"))
    assert "image_grid_pinpoints" not in plain.to_hf_config()[0] and not plain.image.tiles
    assert VideoXLConfig.from_hf_config({**hf, "image_grid_pinpoints": None}, ranged.to_hf_config()[1]).image == \
        plain.image
    # Defaults are the original's getattr defaults; older files keep the keys in `extra`.
    bare = {k: v for k, v in hf.items() if k not in ("image_aspect_ratio", "image_grid_pinpoints",
                                                      "mm_patch_merge_type")}
    assert VideoXLConfig.from_hf_config(bare, ranged.to_hf_config()[1]).image == ImageConfig("square", None, "flat")
    tiny = VideoXLConfig.load("tiny")
    assert tiny.image == ImageConfig("anyres", None, "unires") and "image_aspect_ratio" not in tiny.extra
    with pytest.raises(ConfigError, match="belong in `image`"):
        dataclasses.replace(cfg, extra={"mm_patch_merge_type": "flat"})
    with pytest.raises(ConfigError, match="pair of integers"):
        ImageConfig("anyres", ((336, "x"),), "unires")


def test_what_an_image_becomes_in_each_setting():
    cfg = _fixture_config()
    image = CASES["wide_500x200"]["image"]
    tiles = unires.image_frames(image, cfg)                        # the authors' list: 672x336, two tiles
    assert tiles.shape == (2, 336, 336, 3) and unires.num_tokens((500, 200), cfg) == 2 * 144
    np.testing.assert_array_equal(tiles.transpose(0, 3, 1, 2), CASES["wide_500x200"]["tiles_u8"])

    def frames(**image_cfg):
        return unires.image_frames(image, dataclasses.replace(cfg, image=ImageConfig(**image_cfg)))

    np.testing.assert_array_equal(frames(aspect_ratio="square"), image[None])
    np.testing.assert_array_equal(frames(aspect_ratio="anyres", patch_merge_type="unires"), image[None])  # no pins
    padded = frames(aspect_ratio="pad")                            # expand2square with int(mean * 255)
    assert padded.shape == (1, 500, 500, 3)
    np.testing.assert_array_equal(padded[0, 150:350], image)
    assert (padded[0, :150] == [122, 116, 104]).all() and (padded[0, 350:] == [122, 116, 104]).all()
    with pytest.raises(ValueError, match="only 'unires'"):
        frames(aspect_ratio="anyres", grid_pinpoints=((336, 672),), patch_merge_type="flat")
    with pytest.raises(ValueError, match="RGB image"):
        unires.image_frames(image[..., :2], cfg)


def test_images_with_alpha_or_a_palette_are_tiled_from_their_rgb(tmp_path):
    from PIL import Image

    rgba = np.dstack([CASES["small_120x90"]["image"], np.arange(90 * 120).reshape(90, 120) % 256]).astype(np.uint8)
    for mode, im in (("RGBA", Image.fromarray(rgba)), ("P", Image.fromarray(rgba[..., :3]).quantize(16))):
        path = tmp_path / f"{mode}.png"
        im.save(path)
        clip = video.read_image(path)
        want = np.asarray(Image.open(path).convert("RGB"))
        np.testing.assert_array_equal(clip.frames[0], want)
        assert clip.is_image and unires.tile_image(clip.frames[0], unires.authors_pinpoints()).grid == (1, 2)


def test_the_answerer_encodes_an_image_file_as_its_tiles(tmp_path):
    """`vxl infer --video photo.png` with an anyres + unires checkpoint: the tiles are the frames."""
    from PIL import Image

    from vxl_jax.infer import Answerer
    from vxl_jax.tiny import tiny_config, write_tiny_checkpoint

    cfg = dataclasses.replace(tiny_config(), image=ImageConfig("anyres", unires.authors_pinpoints(), "unires"))
    write_tiny_checkpoint(str(tmp_path / "m"), seed=3, cfg=cfg)
    answerer = Answerer.load(str(tmp_path / "m"))
    assert answerer.cfg.image == cfg.image
    image = CASES["wide_500x200"]["image"]
    Image.fromarray(image).save(tmp_path / "photo.png")
    messages = []
    enc = answerer.encode(str(tmp_path / "photo.png"), ratio=4, progress=messages.append)
    assert any("500x200 image is 2x1 tiles of 336 px (288 visual tokens)" in m for m in messages)
    by_hand = answerer.encode(CASES["wide_500x200"]["tiles_u8"].transpose(0, 2, 3, 1), ratio=4)
    in_memory = answerer.encode(video.image_clip(image), ratio=4)      # what the lmms-eval plug-in passes
    for other in (by_hand, in_memory):
        assert enc.num_frames == other.num_frames == 2 and enc.memory_entries == other.memory_entries
        for a, b in zip(jax.tree.leaves(enc.memory), jax.tree.leaves(other.memory)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_lmms_plugin_hands_single_images_over_as_image_clips(monkeypatch, tmp_path):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (its own venv: .venv-lmms)")
    from PIL import Image

    from vxl_jax.eval import lmms_plugin

    monkeypatch.setattr(lmms_plugin, "_load_answerer", lambda pretrained, dtype, progress: object())
    model = lmms_plugin.VXLJax(pretrained="ckpt")
    image = CASES["small_120x90"]["image"]
    rgba = Image.fromarray(np.dstack([image, np.full(image.shape[:2], 9, np.uint8)]))
    rgba.save(tmp_path / "a.png")
    for visual in (rgba, str(tmp_path / "a.png")):
        clip = model._frames([visual])
        assert isinstance(clip, video.Clip) and clip.is_image
        np.testing.assert_array_equal(clip.frames[0], np.asarray(rgba.convert("RGB")))
    assert model._frames([rgba, rgba]).shape == (2, 90, 120, 3)          # several images: frames of one clip
