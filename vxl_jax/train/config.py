"""The training run's config: one JSON file under `configs/` (or anywhere), overridable key by key.

    cfg = TrainConfig.load("tiny_synthetic", overrides=["max_steps=12", "optim.learning_rate=3e-4"])

Sections map to the dataclasses that use them, so nothing is a god-config:

    model      a model config name / path (`VideoXLConfig.load`) or an inline dict
    init       "random" (seeded) or a checkpoint dir (HF Video-XL or vxl_jax)
    data       `data.loader.LoaderConfig` fields; the image size, tokens per frame and
               window come from the model, `curriculum` is a name, a path or a dict
    synthetic  optional `data.synthetic.SyntheticSpec`: generate that set into
               WORKDIR/data (when absent) and train on it
    optim      `train.optim.OptimConfig`
    mesh       `parallel.MeshConfig`
    step       `train.step.StepSettings` (accumulation, dtype, remat policies, the
               cross entropy's vocabulary block `loss_chunk`)

plus the loop's own keys (max_steps, seed, save_every, ...). An override is
`dotted.key=value` with a JSON value (a bare word is a string).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any, Mapping, Optional, Sequence

from vxl_jax.config import CONFIG_DIR, VideoXLConfig
from vxl_jax.data import curriculum as curriculum_lib, unires
from vxl_jax.data.loader import LoaderConfig
from vxl_jax.data.synthetic import SyntheticSpec
from vxl_jax.parallel import MeshConfig
from vxl_jax.train.optim import OptimConfig
from vxl_jax.train.step import StepSettings

# Loader fields that the model decides.
_FROM_MODEL = ("image_size", "image", "tokens_per_frame", "window")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: Any = None               # None: the init checkpoint's own config
    init: Optional[str] = "random"  # None: must be set (--set init=DIR)
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    synthetic: Optional[Mapping[str, Any]] = None
    optim: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    mesh: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    step: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    max_steps: int = 1000
    seed: int = 0
    log_every: int = 1              # metrics.jsonl / TensorBoard every this many steps
    print_every: int = 1            # a metrics line on stdout every this many steps
    save_every: int = 500
    keep_checkpoints: int = 3
    export_hf: bool = True          # write WORKDIR/export_hf (HF Video-XL format) when the run ends
    debug_nan_steps: Sequence[int] = ()  # fault injection: these steps (1-based) get a NaN loss and gradients
    description: str = ""

    def __post_init__(self):
        bad = [f"{k} must be >= 1, got {getattr(self, k)}" for k in ("max_steps", "log_every", "print_every",
                                                                     "save_every", "keep_checkpoints") if getattr(self, k) < 1]
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.debug_nan_steps):
            bad.append(f"debug_nan_steps are step numbers >= 1, got {list(self.debug_nan_steps)}")
        if bad:
            raise ValueError("invalid TrainConfig: " + "; ".join(bad))

    # ------------------------------------------------------------ loading

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown training config keys: {unknown}")
        cfg = cls(**d)
        cfg.optim_config(), cfg.mesh_config(), cfg.step_settings(), cfg.curriculum()   # validate early
        if cfg.synthetic is not None:
            cfg.synthetic_spec()
        return cfg

    @classmethod
    def load(cls, name_or_path: str, overrides: Sequence[str] = ()) -> "TrainConfig":
        path = name_or_path
        if not os.path.isfile(path):
            path = os.path.join(CONFIG_DIR, name_or_path if name_or_path.endswith(".json") else name_or_path + ".json")
            if not os.path.isfile(path):
                names = sorted(n[:-5] for n in os.listdir(CONFIG_DIR) if n.endswith(".json"))
                raise FileNotFoundError(f"no training config {name_or_path!r}: not a file, and not one of "
                                        f"configs/: {names}")
        with open(path) as f:
            d = json.load(f)
        return cls.from_dict(apply_overrides(d, overrides))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------ sections

    def model_config(self) -> VideoXLConfig:
        if self.model is None:
            raise ValueError("random init needs a model config: set model to a name under configs/ or a path")
        if isinstance(self.model, Mapping):
            return VideoXLConfig.from_dict(self.model)
        return VideoXLConfig.load(self.model)

    def optim_config(self) -> OptimConfig:
        return OptimConfig.from_dict(self.optim)

    def mesh_config(self) -> MeshConfig:
        return _build(MeshConfig, self.mesh, "mesh")

    def step_settings(self) -> StepSettings:
        settings = _build(StepSettings, self.step, "step")
        from vxl_jax.model.qwen2 import REMAT_POLICIES
        from vxl_jax.train.step import DTYPES
        bad = [f"{k}={getattr(settings, k)!r}" for k in ("remat_layer", "remat_window")
               if getattr(settings, k) not in REMAT_POLICIES]
        chunk = settings.loss_chunk
        bad_chunk = chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1)
        if bad or bad_chunk or settings.dtype not in DTYPES or settings.accum_steps < 1 or settings.max_bad_steps < 1:
            raise ValueError(f"invalid step settings {bad or settings}: remat policies are {list(REMAT_POLICIES)}, "
                             f"dtypes {list(DTYPES)}, accum_steps >= 1, max_bad_steps >= 1, loss_chunk null or "
                             f">= 1")
        return settings

    def synthetic_spec(self) -> SyntheticSpec:
        return _build(SyntheticSpec, self.synthetic or {}, "synthetic")

    def curriculum(self) -> curriculum_lib.Curriculum:
        c = self.data.get("curriculum", 8)
        if isinstance(c, int):
            return curriculum_lib.fixed(c)
        if isinstance(c, Mapping):
            return curriculum_lib.from_dict(dict(c))
        return curriculum_lib.load(c)

    def loader_config(self, workdir: str, model: VideoXLConfig, *, batch_size: int, shard_index: int,
                      shard_count: int) -> LoaderConfig:
        """The loader of this process: paths resolved, model-decided fields filled in."""
        d = dict(self.data)
        clash = sorted(set(d) & set(_FROM_MODEL))
        if clash:
            raise ValueError(f"data.{clash} are decided by the model config; remove them")
        d.pop("batch_size", None)
        d["curriculum"] = self.curriculum()
        if self.synthetic is not None:
            root = os.path.join(workdir, "data")
            d.setdefault("annotations", os.path.join(root, "train.jsonl"))
            d.setdefault("tokenizer", os.path.join(root, "tokenizer"))
            d.setdefault("media_root", root)
        elif "tokenizer" not in d and self.init not in (None, "random"):
            d["tokenizer"] = self.init
        missing = [k for k in ("annotations", "tokenizer") if k not in d]
        if missing:
            raise ValueError(f"the data section needs {missing} (e.g. --set data.annotations=train.jsonl)")
        for key in ("frame_buckets", "text_buckets"):
            if key in d:
                d[key] = tuple(d[key])
        known = {f.name for f in dataclasses.fields(LoaderConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown data keys: {unknown}")
        unires.check_model(model)
        return LoaderConfig(**d, image_size=model.vision.image_size, image=model.image,
                            tokens_per_frame=model.tokens_per_frame,
                            window=model.vst.window, batch_size=batch_size, shard_index=shard_index,
                            shard_count=shard_count)

    @property
    def global_batch(self) -> int:
        return int(self.data.get("batch_size", 1))


def _build(cls, d: Mapping[str, Any], section: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {section} keys: {unknown} (known: {sorted(known)})")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def apply_overrides(d: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`a.b=value` items applied to a copy of d; the value is parsed as JSON, else kept as a string."""
    out = copy.deepcopy(dict(d))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"--set {item}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out
