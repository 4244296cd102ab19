"""Applies a key map: HF tensors -> params pytree and back, checking everything first.

Before any tensor is read, every source key is matched to a rule (or to a known
ignorable buffer) and every rule's keys are checked for presence, shape and
dtype; all problems are collected and raised together in one
`ConversionError`. Targets are then filled one at a time, so peak memory is the
output plus one stacked target.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from vxl_jax.conversion.keymap import IGNORED_KEYS, Rule
from vxl_jax.conversion.safetensors_io import CheckpointReader

_FLOAT_KINDS = ("f",)


class ConversionError(ValueError):
    """All problems found in a checkpoint, one per line."""

    def __init__(self, problems: Sequence[str], source: str = ""):
        self.problems = list(problems)
        head = f"{len(self.problems)} problem(s) converting {source}".rstrip() + ":"
        super().__init__("\n".join([head] + [f"  - {p}" for p in self.problems]))


@dataclasses.dataclass
class ConversionStats:
    tensors: int = 0
    parameters: int = 0
    bytes: int = 0
    seconds: float = 0.0
    ignored: tuple[str, ...] = ()

    def summary(self) -> str:
        text = (f"{self.tensors} tensors, {self.parameters:,} parameters, "
                f"{self.bytes / 2**20:,.1f} MiB in {self.seconds:.2f} s")
        if self.ignored:
            shown = ", ".join(self.ignored[:3]) + (", ..." if len(self.ignored) > 3 else "")
            text += f"; {len(self.ignored)} key(s) ignored (no parameters we use): {shown}"
        return text


def ignored_keys(reader: CheckpointReader, ignore: Sequence[str] = ()) -> tuple[str, ...]:
    """Source keys that hold no parameters we use (known buffers, plus `ignore` regexes)."""
    patterns = list(IGNORED_KEYS) + [re.compile(p) for p in ignore]
    return tuple(k for k in reader.keys() if any(p.search(k) for p in patterns))


def check(reader: CheckpointReader, rules: Sequence[Rule], ignore: Sequence[str] = ()) -> list[str]:
    """Names every problem (unexpected / missing key, wrong shape or dtype) without reading data."""
    problems: list[str] = []
    skipped = set(ignored_keys(reader, ignore))
    expected: dict[str, Rule] = {}
    for rule in rules:
        for key in rule.hf_keys():
            expected[key] = rule
    for key in reader.keys():
        if key not in expected and key not in skipped:
            problems.append(f"unexpected key {key} {list(reader.shape(key))}")
    for rule in rules:
        dtypes = set()
        for key in rule.hf_keys():
            if key not in reader:
                problems.append(f"missing key {key} (expected shape {list(rule.hf_shape)})")
                continue
            shape = reader.shape(key)
            if shape != tuple(rule.hf_shape):
                problems.append(f"wrong shape for {key}: checkpoint has {list(shape)}, "
                                f"config expects {list(rule.hf_shape)}")
            try:
                dtype = reader.dtype(key)
            except TypeError as e:
                problems.append(f"wrong dtype: {e}")
                continue
            if dtype.kind not in _FLOAT_KINDS and dtype.name != "bfloat16":
                problems.append(f"wrong dtype for {key}: {dtype.name} (expected a floating type)")
            else:
                dtypes.add(dtype)
        if len(dtypes) > 1:
            problems.append(f"mixed dtypes across layers of {rule.hf}: {sorted(d.name for d in dtypes)}")
    return problems


def iter_targets(reader: CheckpointReader, rules: Sequence[Rule], stats: ConversionStats, *, dtype=None,
                 source: str = "", progress: bool = True, ignore: Sequence[str] = ()) -> Iterator[tuple[tuple, np.ndarray]]:
    """Yields (params path, array) one target at a time, after checking the whole checkpoint.

    Every source key is either consumed by a rule or reported: `ignore` regexes
    (and known buffers) are listed in `stats.ignored`, anything else is an error.
    Nothing is read before all problems are known; they are raised together.
    """
    problems = check(reader, rules, ignore)
    if problems:
        raise ConversionError(problems, source)
    start = time.perf_counter()
    stats.ignored += ignored_keys(reader, ignore)
    total = sum(reader.nbytes(k) for rule in rules for k in rule.hf_keys())
    with tqdm(total=total, unit="B", unit_scale=True, desc="hf -> jax", disable=not progress) as bar:
        for rule in rules:
            keys = rule.hf_keys()
            out_dtype = np.dtype(dtype) if dtype is not None else reader.dtype(keys[0])
            target = np.empty(rule.jax_shape(), out_dtype)
            for i, key in enumerate(keys):
                tensor = rule.transform.to_jax(reader.get(key))
                if rule.layers:
                    target[i] = tensor
                else:
                    target[...] = tensor
                del tensor
                stats.tensors += 1
                bar.update(reader.nbytes(key))
            stats.parameters += target.size
            stats.bytes += target.nbytes
            stats.seconds += time.perf_counter() - start
            yield rule.path, target
            start = time.perf_counter()


def hf_to_params(reader: CheckpointReader, rules: Sequence[Rule], **kwargs) -> tuple[dict, ConversionStats]:
    """Reads a checkpoint into a nested dict of numpy arrays (kwargs as `iter_targets`)."""
    stats = ConversionStats()
    params: dict = {}
    for path, target in iter_targets(reader, rules, stats, **kwargs):
        set_path(params, path, target)
    return params, stats


def params_to_hf(params: dict, rules: Sequence[Rule]) -> tuple[Iterator[tuple[str, np.ndarray]], dict]:
    """(generator of (HF key, tensor) in rule order, HF key -> (shape, dtype)). Checks shapes first."""
    problems = []
    for rule in rules:
        leaf = get_path(params, rule.path)
        if leaf is None:
            problems.append(f"params lack {'/'.join(rule.path)} (for {rule.hf})")
        elif tuple(leaf.shape) != rule.jax_shape():
            problems.append(f"wrong shape for {'/'.join(rule.path)}: params have {list(leaf.shape)}, "
                            f"config expects {list(rule.jax_shape())}")
    if problems:
        raise ConversionError(problems, "params")
    specs = {key: (tuple(rule.hf_shape), np.dtype(get_path(params, rule.path).dtype))
             for rule in rules for key in rule.hf_keys()}

    def generate():
        for rule in rules:
            leaf = np.asarray(get_path(params, rule.path))
            slices = [leaf[i] for i in range(rule.layers)] if rule.layers else [leaf]
            for key, part in zip(rule.hf_keys(), slices):
                yield key, np.ascontiguousarray(rule.transform.to_hf(part))
    return generate(), specs


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def get_path(tree: dict, path: tuple[str, ...]):
    for name in path:
        if not isinstance(tree, dict) or name not in tree:
            return None
        tree = tree[name]
    return tree
