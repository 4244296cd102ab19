"""LLaVA-format annotation files as a random-access source, and reading a record's media.

An annotation file is a JSON list or JSONL of records such as

    {"id": "v1", "video": "clips/v1.mp4", "conversations": [{"from": "human", "value": "<image>\\nQ?"},
                                                             {"from": "gpt", "value": "A."}]}

with `video`, `image` (a path or a list of paths) or neither (text only);
media paths are relative to a media root. The source returns the record
dict with its position added as `"index"`; parsing problems of the file
itself (bad JSON) are errors, while problems of one record are found later,
per record, and reported by the loader.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from vxl_jax.data import video


class JsonLineError(ValueError):
    """A line of a JSON Lines text that is not JSON: its 1-based number and the decoder's error."""

    def __init__(self, line: int, error: json.JSONDecodeError):
        super().__init__(f"line {line}: not JSON ({error.msg})")
        self.line, self.error = line, error


def json_lines(text: str) -> list:
    """The values of a JSON Lines text (blank lines skipped); the first bad line raises JsonLineError."""
    values = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise JsonLineError(n, e) from None
    return values


def load_annotations(path: str) -> list[dict]:
    """Reads a JSON list or a JSONL file; every record must be an object."""
    with open(path) as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = json.loads(text)
    else:
        try:
            records = json_lines(text)
        except JsonLineError as e:
            raise ValueError(f"{path}, line {e.line}: not JSON ({e.error.msg})") from None
    bad = [i for i, r in enumerate(records) if not isinstance(r, dict)]
    if bad:
        raise ValueError(f"{path}: records {bad[:5]} are not JSON objects")
    return records


class AnnotationSource:
    """grain random-access source over an annotation file's records."""

    def __init__(self, annotations: str | Sequence[dict]):
        self.path = annotations if isinstance(annotations, str) else None
        self._records = load_annotations(annotations) if isinstance(annotations, str) else list(annotations)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return {**self._records[index], "index": int(index)}

    def __repr__(self) -> str:
        return f"AnnotationSource({self.path or 'in memory'}, {len(self)} records)"


def media_kind(record: dict) -> str:
    if record.get("video") is not None:
        return "video"
    if record.get("image") is not None:
        return "image"
    return "text"


def read_image(path: str) -> np.ndarray:
    """uint8 [H, W, 3] of an image file, decoded as `vxl infer` decodes one (Pillow, RGB; `video.read_image`)."""
    if not os.path.isfile(path):
        raise video.VideoError(path, "no such file")
    clip = video.read_image(path)
    if clip is None:
        raise video.VideoError(path, "not a readable image (Pillow does not recognise it)")
    return clip.frames[0]


def read_images(record: dict, media_root: str) -> list[np.ndarray]:
    """uint8 [H, W, 3] of each of the record's images (`image`: a path or a list of paths)."""
    paths = record["image"] if isinstance(record["image"], list) else [record["image"]]
    if not paths:
        raise ValueError("the record's image list is empty")
    return [read_image(os.path.join(media_root, p)) for p in paths]


def read_video(record: dict, media_root: str, sampling: video.Sampling) -> np.ndarray:
    """uint8 frames [N, H, W, 3] sampled from the record's `video`."""
    return video.read(os.path.join(media_root, record["video"]), sampling).frames
