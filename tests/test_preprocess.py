"""CLIP preprocessing: bit-exact with PIL's bicubic resize and transformers' CLIPImageProcessorPil."""

import numpy as np
import pytest

from vxl_jax.conversion.checkpoint import CLIP_MEAN, CLIP_STD
from vxl_jax.data.preprocess import center_crop, crop_frames_u8, preprocess_frames, resize_shortest_side


def _frames(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Moving coloured shapes on a gradient, plus noise: edges, flats and texture for the resampler."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    frames = []
    for t in range(n):
        f = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                      np.full_like(xx, 40 * t % 256)], -1).astype(np.float64)
        cy, cx = height * (0.3 + 0.08 * t), width * (0.2 + 0.1 * t)
        f[(yy - cy) ** 2 + (xx - cx) ** 2 < (0.2 * min(height, width)) ** 2] = (250, 30, 20)
        f[int(height * 0.6):int(height * 0.8), int(width * (0.5 - 0.05 * t)) % width:][:, :width // 5] = (10, 200, 240)
        f += rng.normal(0, 12, f.shape)
        frames.append(np.clip(f, 0, 255).astype(np.uint8))
    return np.stack(frames)


def _pil_resize_shortest(frame: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image
    h, w = frame.shape[:2]
    new_h, new_w = (int(size * h / w), size) if w <= h else (size, int(size * w / h))
    return np.asarray(Image.fromarray(frame).resize((new_w, new_h), Image.BICUBIC, reducing_gap=None))


@pytest.mark.parametrize("height, width", [
    (224, 224),    # upscale both sides
    (360, 640),    # downscale, 16:9
    (720, 1280),   # stronger downscale: wider (antialiasing) kernel
    (400, 224),    # portrait: the height is the long side
    (336, 336),    # already the size: identity
    (337, 501),    # odd sizes
    (336, 500),    # height kept: horizontal pass only
    (500, 336),    # width kept: vertical pass only
    (1, 3),        # a single row, extreme upscale
])
def test_resize_is_pil_bicubic_bit_exact(height, width):
    pytest.importorskip("PIL")
    frames = _frames(2, height, width, seed=height + width)
    frames[1] = np.random.default_rng(1).integers(0, 256, frames[1].shape, dtype=np.uint8)  # worst case: noise
    ours = resize_shortest_side(frames, 336)
    for frame, got in zip(frames, ours):
        np.testing.assert_array_equal(got, _pil_resize_shortest(frame, 336))
    np.testing.assert_array_equal(resize_shortest_side(frames[0], 336), ours[0])  # a single [H, W, 3] image


def _write_mp4(path, frames: np.ndarray) -> None:
    av = pytest.importorskip("av")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _processor(pil_clip, size: int = 336, crop: int = 336):
    """The Video-XL CLIP-L/336 preprocessor_config.json (size and crop overridable)."""
    return pil_clip.CLIPImageProcessorPil(
        do_resize=True, size={"shortest_edge": size}, resample=3, do_center_crop=True,
        crop_size={"height": crop, "width": crop}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)


@pytest.mark.parametrize("height, width", [(360, 640), (400, 224)])
def test_matches_clip_image_processor_on_decoded_video(tmp_path, height, width):
    pytest.importorskip("PIL")
    decord = pytest.importorskip("decord")
    pil_clip = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    path = tmp_path / f"clip_{height}x{width}.mp4"
    _write_mp4(path, _frames(6, height, width))
    frames = decord.VideoReader(str(path)).get_batch(list(range(6))).asnumpy()
    assert frames.shape == (6, height, width, 3) and frames.dtype == np.uint8

    expected = _processor(pil_clip)(list(frames), return_tensors="np")["pixel_values"]
    got = preprocess_frames(frames)
    assert got.shape == expected.shape == (6, 3, 336, 336) and got.dtype == np.float32
    diff = float(np.abs(got - expected).max())
    print(f"{height}x{width}: max |preprocess_frames - CLIPImageProcessorPil| = {diff:.3g}")
    assert diff <= 1e-5

    # uint8 for on-device normalisation: the same pixels.
    u8 = crop_frames_u8(frames)
    assert u8.shape == (6, 3, 336, 336) and u8.dtype == np.uint8
    mean, std = np.asarray(CLIP_MEAN)[:, None, None], np.asarray(CLIP_STD)[:, None, None]
    np.testing.assert_allclose((u8 / 255 - mean) / std, got, rtol=0, atol=1e-6)


def test_layouts_dtypes_and_single_image():
    frames = _frames(3, 240, 320)
    base = preprocess_frames(frames)
    np.testing.assert_array_equal(preprocess_frames(frames, channels_first=False), base.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(preprocess_frames(frames[1]), base[1])
    np.testing.assert_array_equal(crop_frames_u8(frames[1]), crop_frames_u8(frames)[1])
    half = preprocess_frames(frames, dtype=np.float16)
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, base.astype(np.float16))
    assert preprocess_frames(frames, size=224).shape == (3, 3, 224, 224)
    assert preprocess_frames(frames, size=256, crop=224).shape == (3, 3, 224, 224)


def test_center_crop_follows_transformers_offsets_and_padding():
    image_transforms = pytest.importorskip("transformers.image_transforms")
    rng = np.random.default_rng(0)
    for (h, w), (ch, cw) in [((7, 9), (4, 4)), ((7, 9), (7, 9)), ((5, 6), (8, 3)), ((4, 4), (9, 10))]:
        frames = rng.integers(1, 256, (2, h, w, 3), dtype=np.uint8)
        got = center_crop(frames, ch, cw)
        assert got.shape == (2, ch, cw, 3)
        for frame, crop in zip(frames, got):
            expected = image_transforms.center_crop(frame, (ch, cw), input_data_format="channels_last")
            np.testing.assert_array_equal(crop, expected)
    # A crop larger than the resized frame: zero pixels around it, as the processor gives.
    pytest.importorskip("PIL")
    pil_clip = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    frames = _frames(2, 40, 60)
    expected = _processor(pil_clip, size=32, crop=48)(list(frames), return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(preprocess_frames(frames, size=32, crop=48), expected, rtol=0, atol=1e-5)
    u8 = crop_frames_u8(frames, size=32)
    assert u8.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("frames, message", [
    (np.zeros((8, 8), np.uint8), "shape"),
    (np.zeros((1, 2, 8, 8, 3), np.uint8), "shape"),
    (np.zeros((2, 8, 8, 4), np.uint8), "channels"),
    (np.zeros((2, 3, 8, 8), np.uint8), "channels"),  # channels first is not accepted
    (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
    (np.zeros((0, 8, 8, 3), np.uint8), "empty"),
    (np.zeros((2, 0, 8, 3), np.uint8), "empty"),
])
def test_rejects_bad_frames(frames, message):
    for fn in (preprocess_frames, crop_frames_u8, lambda f: resize_shortest_side(f, 336)):
        with pytest.raises(ValueError, match=message):
            fn(frames)


def test_rejects_bad_settings():
    frames = np.zeros((1, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="positive"):
        resize_shortest_side(frames, 0)
    with pytest.raises(ValueError, match="3 values"):
        preprocess_frames(frames, mean=(0.5, 0.5))
