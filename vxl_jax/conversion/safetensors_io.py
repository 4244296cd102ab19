"""Streaming access to HF safetensors checkpoints (single file or sharded), no torch.

Reading goes tensor by tensor through `safetensors.safe_open`, so converting a
checkpoint never holds more than the tensors asked for. bfloat16 needs the
numpy dtype from `ml_dtypes`, which is imported here before any read.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy before safetensors reads it)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype codes -> numpy dtypes
_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(bool),
}


class CheckpointFileError(FileNotFoundError):
    pass


class CheckpointReader:
    """Keys, shapes and dtypes from the headers; tensors read one at a time on demand."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if os.path.isfile(path):
            files = {os.path.basename(path): path}
            self.dir = os.path.dirname(path)
        elif os.path.isfile(os.path.join(path, INDEX_FILE)):
            with open(os.path.join(path, INDEX_FILE)) as f:
                weight_map = json.load(f)["weight_map"]
            files = {name: os.path.join(path, name) for name in sorted(set(weight_map.values()))}
            self.dir = path
        elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
            files = {SINGLE_FILE: os.path.join(path, SINGLE_FILE)}
            self.dir = path
        else:
            raise CheckpointFileError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
        self._handles = {}
        self._where: dict[str, str] = {}
        for name, file in files.items():
            if not os.path.isfile(file):
                raise CheckpointFileError(f"shard {file} named in {INDEX_FILE} does not exist")
            handle = safe_open(file, framework="numpy")
            self._handles[name] = handle
            for key in handle.keys():
                self._where[key] = name

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> np.dtype:
        code = self._handles[self._where[key]].get_slice(key).get_dtype()
        if code not in _DTYPES:
            raise TypeError(f"{key}: unsupported safetensors dtype {code}")
        return _DTYPES[code]

    def nbytes(self, key: str) -> int:
        return int(np.prod(self.shape(key), dtype=np.int64)) * self.dtype(key).itemsize

    def get(self, key: str) -> np.ndarray:
        return self._handles[self._where[key]].get_tensor(key)


def write_checkpoint(tensors: Iterable[tuple[str, np.ndarray]], sizes: dict[str, int], out_dir: str, *,
                     max_shard_bytes: int = 5 * 2**30, filename: str = SINGLE_FILE) -> list[str]:
    """Writes (key, array) pairs, in the order given, to one file or to shards plus an index.

    `sizes` (key -> bytes) plans the shards up front so file names carry the
    shard count; only one shard's tensors are held at a time. Returns the files.
    """
    os.makedirs(out_dir, exist_ok=True)
    plan: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if plan[-1] and used + size > max_shard_bytes:
            plan.append([])
            used = 0
        plan[-1].append(key)
        used += size
    stem, ext = os.path.splitext(filename)
    names = [filename] if len(plan) == 1 else [f"{stem}-{i + 1:05d}-of-{len(plan):05d}{ext}" for i in range(len(plan))]
    shard_of = {key: i for i, keys in enumerate(plan) for key in keys}
    pending: dict[str, np.ndarray] = {}
    shard = 0
    for key, array in _in_plan_order(tensors, shard_of):
        if shard_of[key] != shard:
            save_file(pending, os.path.join(out_dir, names[shard]), metadata={"format": "pt"})
            pending, shard = {}, shard_of[key]
        pending[key] = np.ascontiguousarray(array)
    save_file(pending, os.path.join(out_dir, names[shard]), metadata={"format": "pt"})
    if len(plan) > 1:
        index = {"metadata": {"total_size": int(sum(sizes.values()))},
                 "weight_map": {key: names[shard_of[key]] for key in sorted(shard_of)}}
        with open(os.path.join(out_dir, stem + ".safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    return [os.path.join(out_dir, n) for n in names]


def _in_plan_order(tensors: Iterable[tuple[str, np.ndarray]], shard_of: dict[str, int]) -> Iterator:
    last = 0
    for key, array in tensors:
        if key not in shard_of:
            raise KeyError(f"tensor {key} was not planned")
        if shard_of[key] < last:
            raise ValueError(f"tensor {key} arrives after its shard was written")
        last = shard_of[key]
        yield key, array
