"""Streaming HF safetensors I/O (single file or sharded), numpy only, no torch.

The format is an 8-byte little-endian header length, a JSON header (per tensor:
dtype, shape, byte offsets into the data section) and the raw little-endian
data. Reading uses plain positioned reads straight into the destination array
(no memory map), so a tensor's pages are not held once it is converted; writing
streams tensor by tensor into the shard file. Peak memory during a conversion
is therefore the converted output plus one tensor, not two copies of the model.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype(bool),
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


class CheckpointFileError(FileNotFoundError):
    pass


class _File:
    """One .safetensors file: its header, and positioned reads of its tensors."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointFileError(f"{path} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(f.read(n))
            except (ValueError, UnicodeDecodeError) as e:
                raise CheckpointFileError(f"{path} has a corrupt safetensors header: {e}") from e
        self.metadata = header.pop("__metadata__", {})
        self.entries = header
        self.data_start = 8 + n

    def read_into(self, key: str, out: np.ndarray) -> None:
        begin, end = self.entries[key]["data_offsets"]
        view = memoryview(out.reshape(-1).view(np.uint8))
        if end - begin != view.nbytes:
            raise ValueError(f"{self.path}: {key} holds {end - begin} bytes, expected {view.nbytes}")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + begin)
            got = f.readinto(view)
        if got != view.nbytes:
            raise CheckpointFileError(f"{self.path} is truncated: {key} has {got} of {view.nbytes} bytes")


class CheckpointReader:
    """Keys, shapes and dtypes from the headers; tensors read one at a time on demand."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if os.path.isfile(path):
            files = [path]
        elif os.path.isfile(os.path.join(path, INDEX_FILE)):
            with open(os.path.join(path, INDEX_FILE)) as f:
                weight_map = json.load(f)["weight_map"]
            files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
            files = [os.path.join(path, SINGLE_FILE)]
        else:
            raise CheckpointFileError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
        self._where: dict[str, _File] = {}
        for file in files:
            if not os.path.isfile(file):
                raise CheckpointFileError(f"shard {file} named in {INDEX_FILE} does not exist")
            handle = _File(file)
            for key in handle.entries:
                self._where[key] = handle

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key].entries[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        code = self._where[key].entries[key]["dtype"]
        if code not in _DTYPES:
            raise TypeError(f"{key}: unsupported safetensors dtype {code}")
        return _DTYPES[code]

    def nbytes(self, key: str) -> int:
        return int(np.prod(self.shape(key), dtype=np.int64)) * self.dtype(key).itemsize

    def get(self, key: str) -> np.ndarray:
        out = np.empty(self.shape(key), self.dtype(key))
        self._where[key].read_into(key, out)
        return out


def write_checkpoint(tensors: Iterable[tuple[str, np.ndarray]], specs: dict[str, tuple[tuple[int, ...], np.dtype]],
                     out_dir: str, *, max_shard_bytes: int = 5 * 2**30, filename: str = SINGLE_FILE) -> list[str]:
    """Writes (key, array) pairs, arriving in the order of `specs`, to one file or to shards plus an index.

    `specs` (key -> (shape, dtype)) lets every shard's header be written before
    its data, so each tensor goes to disk as it arrives and none is held after.
    """
    os.makedirs(out_dir, exist_ok=True)
    sizes = {key: int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for key, (shape, dtype) in specs.items()}
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
    stream = iter(tensors)
    for name, keys in zip(names, plan):
        _write_shard(os.path.join(out_dir, name), keys, specs, stream)
    if next(stream, None) is not None:
        raise ValueError("more tensors than planned")
    if len(plan) > 1:
        weight_map = {key: name for name, keys in zip(names, plan) for key in keys}
        index = {"metadata": {"total_size": int(sum(sizes.values()))}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out_dir, stem + ".safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    return [os.path.join(out_dir, n) for n in names]


def _write_shard(path: str, keys: list[str], specs: dict, stream: Iterator[tuple[str, np.ndarray]]) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in keys:
        shape, dtype = specs[key]
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": _CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for want in keys:
            key, array = next(stream, (None, None))
            if key != want:
                raise ValueError(f"expected tensor {want}, got {key}")
            shape, dtype = specs[key]
            if tuple(array.shape) != tuple(shape) or np.dtype(array.dtype) != np.dtype(dtype):
                raise ValueError(f"{key}: got {array.dtype}{list(array.shape)}, planned {np.dtype(dtype)}{list(shape)}")
            f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
