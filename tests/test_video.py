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
    ("missing", "no such file"), ("empty", "empty"), ("truncated", "not a readable video"),
    ("junk", "not a readable video"), ("directory", "is a directory")])
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


def test_images_are_read_with_pyav(tmp_path):
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
