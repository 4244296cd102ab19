"""Video reading: which frames are sampled, their pixels and times, and the errors on bad files."""

import numpy as np
import pytest

from vxl_jax.data.synthetic import synthetic_video
from vxl_jax.data import records, video


@pytest.fixture(scope="module")
def clip30(tmp_path_factory):
    """A 30-frame 128x128 H.264 video at 10 fps and its source frames."""
    frames = synthetic_video(30, 128, seed=1)
    path = video.write_test_video(tmp_path_factory.mktemp("v") / "clip.mp4", frames, fps=10)
    return path, frames


def test_uniform_indices_are_linspace_rounded_down():
    assert video.uniform_indices(30, 8).tolist() == [0, 4, 8, 12, 16, 20, 24, 29]
    assert video.uniform_indices(100, 4).tolist() == [0, 33, 66, 99]
    assert video.uniform_indices(3, 5).tolist() == [0, 0, 1, 1, 2]   # repeats, as the original
    assert video.uniform_indices(7, 1).tolist() == [0]


def test_fps_indices_with_a_cap():
    assert video.fps_indices(30, 10.0, 2.0, 100).tolist() == [0, 5, 10, 15, 20, 25]
    assert video.fps_indices(30, 10.0, 3.0, 100).tolist() == [0, 3, 6, 10, 13, 16, 20, 23, 26]
    assert video.fps_indices(30, 10.0, 2.0, 4).tolist() == video.uniform_indices(30, 4).tolist()
    assert video.fps_indices(5, 10.0, 50.0, 100).tolist() == [0, 1, 2, 3, 4]  # never above the video's rate


def test_read_gives_the_sampled_frames_and_times(clip30):
    path, source = clip30
    clip = video.read(path, video.uniform(8))
    assert clip.frames.shape == (8, 128, 128, 3) and clip.frames.dtype == np.uint8
    assert clip.total_frames == 30 and clip.avg_fps == pytest.approx(10.0)
    np.testing.assert_allclose(clip.timestamps, clip.indices / 10.0, atol=1e-3)
    # H.264 at crf 18 is lossy: close to the source frames it was made from, far from the others.
    err = np.abs(clip.frames.astype(float) - source[clip.indices].astype(float)).mean(axis=(1, 2, 3))
    shifted = np.abs(clip.frames.astype(float) - source[(clip.indices + 3) % 30].astype(float)).mean(axis=(1, 2, 3))
    assert err.max() < 8 and (shifted > 2 * err).all()
    by_fps = video.read(path, video.by_fps(2.0, 64))
    assert by_fps.indices.tolist() == [0, 5, 10, 15, 20, 25]


@pytest.mark.parametrize("damage, reason", [
    ("missing", "no such file"), ("empty", "empty"), ("truncated", "neither a video decord can read nor an image"),
    ("junk", "neither a video decord can read nor an image"), ("directory", "is a directory")])
def test_bad_files_raise_naming_the_file(clip30, tmp_path, damage, reason):
    path = tmp_path / f"{damage}.mp4"
    data = open(clip30[0], "rb").read()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "junk":
        path.write_bytes(b"not a video at all " * 50)
    elif damage == "directory":
        path.mkdir()
    with pytest.raises(video.VideoError, match=reason) as info:
        video.read(path, video.uniform(4))
    assert str(path) in str(info.value) and info.value.path == str(path)


def test_bad_sampling_is_rejected():
    for kwargs in ({}, {"frames": 4, "fps": 1.0}, {"frames": 0}, {"fps": 1.0}, {"fps": -1.0, "max_frames": 3}):
        with pytest.raises(ValueError):
            video.Sampling(**kwargs)


def test_images_are_read_with_pillow(tmp_path):
    import av
    frame = synthetic_video(1, 64, seed=2)[0]
    path = tmp_path / "a.png"
    with av.open(str(path), "w") as out:  # PNG is lossless: the pixels come back exactly
        stream = out.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    np.testing.assert_array_equal(records.read_image(str(path)), frame)
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(video.VideoError, match="bad.png"):
        records.read_image(str(tmp_path / "bad.png"))


def _png(path, pixels, **save):
    from PIL import Image
    Image.fromarray(pixels).save(path, **save)
    return str(path)


def test_an_image_is_a_one_frame_clip(clip30, tmp_path):
    pixels = synthetic_video(1, 64, seed=5)[0][:48]               # 48 x 64, not square
    for sampling in (video.uniform(8), video.by_fps(2.0, 16)):   # one frame, whatever the sampling asks
        clip = video.read(_png(tmp_path / "photo.png", pixels), sampling)
        assert clip.is_image and clip.frames.dtype == np.uint8 and clip.frames.shape == (1, 48, 64, 3)
        np.testing.assert_array_equal(clip.frames[0], pixels)    # PNG is lossless
        assert clip.indices.tolist() == [0] and clip.timestamps.tolist() == [0.0]
        assert clip.total_frames == 1 and clip.avg_fps == 0.0 and clip.path == str(tmp_path / "photo.png")
    # grey and RGBA images become RGB; JPEG decodes as Pillow decodes it (the original's image loader)
    grey = video.read(_png(tmp_path / "grey.png", pixels[..., 0]), video.uniform(4)).frames[0]
    np.testing.assert_array_equal(grey, np.repeat(pixels[..., :1], 3, axis=-1))
    rgba = np.concatenate([pixels, np.full((48, 64, 1), 128, np.uint8)], axis=-1)
    np.testing.assert_array_equal(video.read(_png(tmp_path / "a.png", rgba), video.uniform(4)).frames[0], pixels)
    from PIL import Image
    jpg = video.read(_png(tmp_path / "photo.jpg", pixels, quality=95), video.uniform(4))
    assert jpg.is_image
    np.testing.assert_array_equal(jpg.frames[0], np.asarray(Image.open(tmp_path / "photo.jpg").convert("RGB")))
    assert not video.read(clip30[0], video.uniform(2)).is_image


def test_the_exif_orientation_is_applied(tmp_path):
    from PIL import Image
    pixels = synthetic_video(1, 64, seed=6)[0][:32]               # 32 x 64
    exif = Image.Exif()
    exif[0x0112] = 6                                              # "rotate 90 degrees clockwise to display"
    clip = video.read(_png(tmp_path / "phone.jpg", pixels, exif=exif, quality=95), video.uniform(1))
    assert clip.frames.shape == (1, 64, 32, 3)


@pytest.mark.parametrize("content, reason", [
    (b"What color is the square?\n" * 20, "neither a video decord can read nor an image"),
    (None, "neither a video decord can read nor a readable image: a PNG image whose decoding failed")])
def test_files_that_are_neither_a_video_nor_an_image_raise_naming_the_file(tmp_path, content, reason):
    path = tmp_path / ("notes.txt" if content else "cut.png")
    if content is None:                                           # a truncated PNG: Pillow knows it, cannot decode it
        data = open(_png(tmp_path / "full.png", synthetic_video(1, 64, seed=7)[0]), "rb").read()
        content = data[:len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(video.VideoError, match=reason) as info:
        video.read(path, video.uniform(4))
    assert str(info.value).startswith(f"cannot read video {path}: ") and info.value.path == str(path)
