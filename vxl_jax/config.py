"""Frozen, typed configs for every part of Video-XL, and HF `config.json` in/out.

A Video-XL checkpoint directory holds a `config.json` (model_type `llava_qwen`:
the Qwen2 fields, the `beacon_*` fields of the VST compression and the `mm_*`
fields of the vision side) and names its CLIP tower in `mm_vision_tower`, which
has its own `config.json` (model_type `clip_vision_model`). `VideoXLConfig`
composes one dataclass per part; `from_hf_config`/`to_hf_config` map both files
both ways. Keys we do not model are kept verbatim in `extra`, so a round trip
reproduces the original file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

# Fields of the llava_qwen config.json that each part owns (HF name -> our name).
_LLM_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
    "eos_token_id": "eos_token_id",
    "hidden_act": "hidden_act",
}
_VST_FIELDS = {
    "beacon_window": "window",
    "beacon_stride": "stride",
    "beacon_ratio": "ratios",
    "beacon_ratio_mix": "ratio_mix",
    "beacon_attn": "attn",
    "beacon_attend_prev": "attend_prev",
    "beacon_sink_size": "sink_size",
    "beacon_param": "param",
    "beacon_pos": "pos",
    "beacon_embed_init": "embed_init",
    "beacon_accum": "accum",
    "beacon_parallel_window": "parallel_window",
    "enable_beacon": "enabled",
}
_MM_FIELDS = {
    "mm_hidden_size": "mm_hidden_size",
    "mm_projector_type": "projector_type",
    "mm_vision_select_layer": "select_layer",
    "mm_vision_select_feature": "select_feature",
    "mm_spatial_pool_stride": "pool_stride",
    "mm_spatial_pool_mode": "pool_mode",
}
# How a still image is preprocessed and merged (data/unires.py); the original's defaults when absent.
_IMAGE_FIELDS = {
    "image_aspect_ratio": "aspect_ratio",
    "image_grid_pinpoints": "grid_pinpoints",
    "mm_patch_merge_type": "patch_merge_type",
}
_CLIP_FIELDS = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "image_size": "image_size",
    "patch_size": "patch_size",
    "num_channels": "num_channels",
    "layer_norm_eps": "layer_norm_eps",
    "hidden_act": "hidden_act",
    "projection_dim": "projection_dim",
}

# Vision towers named by hub id in published configs (no download: their shape).
KNOWN_VISION_TOWERS = {
    "openai/clip-vit-large-patch14-336": {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "num_channels": 3,
        "layer_norm_eps": 1e-5,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    },
}


class ConfigError(ValueError):
    """A config that cannot describe a Video-XL model."""


# The attention backends (model/attention.py describes each); Qwen2Config.attention is one of them.
ATTENTION_BACKENDS = ("auto", "xla", "cpu", "cudnn", "jax", "dense")


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    eos_token_id: int | None = None
    hidden_act: str = "silu"
    attention: str = "auto"     # attention backend (model/attention.py); a runtime choice, not in config.json

    def __post_init__(self):
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}; got {self.attention!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.hidden_act != "silu":
            raise ConfigError(f"Qwen2 hidden_act must be 'silu', got {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "Qwen2Config":
        """From a Qwen2 (or llava_qwen) config.json dict, transformers v4 or v5 style."""
        hf = _normalise_rope(hf)
        kw = _take(hf, _LLM_FIELDS, required=("vocab_size", "hidden_size", "intermediate_size",
                                              "num_hidden_layers", "num_attention_heads"))
        kw.setdefault("num_kv_heads", kw["num_heads"])
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        return cls(**kw)

    def to_hf_config(self) -> dict[str, Any]:
        return {hf_name: getattr(self, name) for hf_name, name in _LLM_FIELDS.items()}


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int | None = None

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"unsupported CLIP hidden_act {self.hidden_act!r}")

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "ClipVisionConfig":
        """From a `clip_vision_model` config.json dict, or a full `clip` one (its vision_config)."""
        if hf.get("model_type") == "clip" or "vision_config" in hf:
            hf = hf.get("vision_config", {})
        return cls(**_take(hf, _CLIP_FIELDS, required=(
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")))

    def to_hf_config(self) -> dict[str, Any]:
        return {hf_name: getattr(self, name) for hf_name, name in _CLIP_FIELDS.items()}

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    mm_hidden_size: int
    projector_type: str = "mlp2x_gelu"
    select_layer: int = -2
    select_feature: str = "patch"
    pool_stride: int = 2
    pool_mode: str = "average"

    def __post_init__(self):
        if self.projector_type != "mlp2x_gelu":
            raise ConfigError(f"only mm_projector_type 'mlp2x_gelu' is supported, got {self.projector_type!r}")
        if self.select_feature != "patch":
            raise ConfigError(f"only mm_vision_select_feature 'patch' is supported, got {self.select_feature!r}")
        if self.pool_mode != "average":
            raise ConfigError(f"only mm_spatial_pool_mode 'average' is supported, got {self.pool_mode!r}")


@dataclasses.dataclass(frozen=True)
class VSTConfig:
    """The visual summarization token ("beacon") settings of the checkpoint."""

    window: int = 1440
    stride: int = 1440
    ratios: tuple[int, ...] = (2, 4, 8)
    ratio_mix: str = "step-random"
    attn: str = "full-coverage"
    attend_prev: bool = True
    sink_size: int = 0
    param: tuple[str, ...] = ("q", "k", "v")
    pos: str = "interleave"
    embed_init: str = "eos"
    accum: bool = True
    parallel_window: int = 1
    enabled: bool = True


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """How a still image becomes frames (config.json: image_aspect_ratio, image_grid_pinpoints, mm_patch_merge_type).

    "anyres" (or "anyres_max_N") with "unires" and pinpoints: the image is cut into tiles that go through the
    model as frames (data/unires.py). Anything else: one frame ("pad": on a square of the CLIP mean colour).
    `grid_pinpoints` keeps config.json's form: a string, or ((w, h), ...) from a list of pairs; None: absent.
    """

    aspect_ratio: str = "square"
    grid_pinpoints: str | tuple[tuple[int, int], ...] | None = None
    patch_merge_type: str = "flat"

    def __post_init__(self):
        for name in ("aspect_ratio", "patch_merge_type"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"image {name} must be a string, got {getattr(self, name)!r}")
        pins = self.grid_pinpoints
        if isinstance(pins, (list, tuple)):
            bad = [p for p in pins if not isinstance(p, (list, tuple)) or len(p) != 2
                   or not all(isinstance(v, int) and not isinstance(v, bool) for v in p)]
            if bad:
                raise ConfigError(f"image_grid_pinpoints holds {bad[0]!r}, not a [width, height] pair of integers")
            # tuples: hashable, as the config is a static argument of compiled functions
            object.__setattr__(self, "grid_pinpoints", tuple((int(w), int(h)) for w, h in pins))
        elif pins is not None and not isinstance(pins, str):
            raise ConfigError(f"image_grid_pinpoints must be a list of [width, height] pairs or a string, got {pins!r}")

    @property
    def anyres(self) -> bool:
        return self.aspect_ratio == "anyres" or "anyres_max" in self.aspect_ratio

    @property
    def tiles(self) -> bool:
        """Whether an image is cut into tiles (anyres + unires, pinpoints given)."""
        return self.anyres and self.patch_merge_type == "unires" and self.grid_pinpoints is not None

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "ImageConfig":
        return cls(**_take(hf, _IMAGE_FIELDS))

    def to_hf_config(self) -> dict[str, Any]:
        out = {"image_aspect_ratio": self.aspect_ratio, "mm_patch_merge_type": self.patch_merge_type}
        if self.grid_pinpoints is not None:
            pins = self.grid_pinpoints
            out["image_grid_pinpoints"] = pins if isinstance(pins, str) else [list(p) for p in pins]
        return out


@dataclasses.dataclass(frozen=True)
class VideoXLConfig:
    llm: Qwen2Config
    vision: ClipVisionConfig
    projector: ProjectorConfig
    vst: VSTConfig = VSTConfig()
    image: ImageConfig = ImageConfig()
    # Name (or relative path) of the vision tower, as in `mm_vision_tower`.
    vision_tower_name: str = "vision_tower"
    # HF keys we do not model, kept verbatim for the round trip.
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)  # hashable: usable as a jit static arg
    vision_extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self):
        if self.projector.mm_hidden_size != self.vision.hidden_size:
            raise ConfigError(
                f"mm_hidden_size {self.projector.mm_hidden_size} != vision hidden_size {self.vision.hidden_size}")
        if self.vision.grid % self.projector.pool_stride:
            raise ConfigError(f"patch grid {self.vision.grid} is not divisible by pool stride {self.projector.pool_stride}")
        n = self.vision.num_layers
        if not -n <= self.projector.select_layer <= n:
            raise ConfigError(f"mm_vision_select_layer {self.projector.select_layer} out of range for {n} layers")
        doubled = sorted(set(self.extra) & set(_IMAGE_FIELDS))
        if doubled:
            raise ConfigError(f"{', '.join(doubled)} belong in `image` (ImageConfig), not in `extra`")

    @property
    def tokens_per_frame(self) -> int:
        """Visual tokens per frame after pooling (144 for 24x24 patches, stride 2)."""
        return (self.vision.grid // self.projector.pool_stride) ** 2

    @property
    def vision_layers_used(self) -> int:
        """Encoder layers whose output is the feature (hidden_states[select_layer])."""
        s = self.projector.select_layer
        return s if s >= 0 else self.vision.num_layers + 1 + s

    # ---------------------------------------------------------------- HF in/out

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], vision_hf: Mapping[str, Any] | None = None) -> "VideoXLConfig":
        """Builds the config from a llava_qwen `config.json` dict and the vision tower's."""
        hf = dict(hf)
        if hf.get("model_type") not in ("llava_qwen", None):
            raise ConfigError(f"expected model_type 'llava_qwen', got {hf.get('model_type')!r}")
        tower = hf.get("mm_vision_tower", "vision_tower")
        if vision_hf is None:
            if tower not in KNOWN_VISION_TOWERS:
                raise ConfigError(f"vision tower {tower!r} has no config: pass its config.json")
            vision_hf = KNOWN_VISION_TOWERS[tower]
        vision_hf = dict(vision_hf)
        llm = Qwen2Config.from_hf_config(hf)
        vst_kw = _take(hf, _VST_FIELDS)
        for k in ("ratios", "param"):
            if k in vst_kw:
                vst_kw[k] = tuple(vst_kw[k])
        mm = _take(hf, _MM_FIELDS, required=("mm_hidden_size",))
        vision = ClipVisionConfig.from_hf_config(vision_hf)
        used = set(_LLM_FIELDS) | set(_VST_FIELDS) | set(_MM_FIELDS) | set(_IMAGE_FIELDS) | {"mm_vision_tower"}
        extra = {k: v for k, v in hf.items() if k not in used}
        vision_extra = {k: v for k, v in vision_hf.items() if k not in _CLIP_FIELDS}
        return cls(llm=llm, vision=vision, projector=ProjectorConfig(**mm), vst=VSTConfig(**vst_kw),
                   image=ImageConfig.from_hf_config(hf), vision_tower_name=tower, extra=extra,
                   vision_extra=vision_extra)

    def to_hf_config(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Returns (llava_qwen config.json dict, vision tower config.json dict)."""
        out = {"model_type": "llava_qwen", "architectures": ["LlavaQwenForCausalLM"]}
        out.update(self.extra)
        out.update(self.llm.to_hf_config())
        for part, fields in ((self.vst, _VST_FIELDS), (self.projector, _MM_FIELDS)):
            for hf_name, name in fields.items():
                value = getattr(part, name)
                out[hf_name] = list(value) if isinstance(value, tuple) else value
        out.update(self.image.to_hf_config())
        out["mm_vision_tower"] = self.vision_tower_name
        vision = {"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"]}
        vision.update(self.vision_extra)
        vision.update(self.vision.to_hf_config())
        return dict(sorted(out.items())), dict(sorted(vision.items()))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "VideoXLConfig":
        """Reads `config.json` of an HF Video-XL checkpoint dir (and its vision tower's)."""
        path = os.fspath(path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path} is not an HF Video-XL checkpoint: no config.json")
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        tower = hf.get("mm_vision_tower", "vision_tower")
        vision_hf = None
        for candidate in (os.path.join(path, tower, "config.json"), os.path.join(tower, "config.json")):
            if os.path.isfile(candidate):
                with open(candidate) as f:
                    vision_hf = json.load(f)
                break
        return cls.from_hf_config(hf, vision_hf)

    # ------------------------------------------------------ our own JSON format

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VideoXLConfig":
        vst = dict(d.get("vst", {}))
        for k in ("ratios", "param"):
            if k in vst:
                vst[k] = tuple(vst[k])
        extra = dict(d.get("extra", {}))
        # Files written before `image` existed keep the image keys in `extra`.
        image = d.get("image") or {ours: extra.pop(theirs) for theirs, ours in _IMAGE_FIELDS.items() if theirs in extra}
        return cls(llm=Qwen2Config(**d["llm"]), vision=ClipVisionConfig(**d["vision"]),
                   projector=ProjectorConfig(**d["projector"]), vst=VSTConfig(**vst), image=ImageConfig(**image),
                   vision_tower_name=d.get("vision_tower_name", "vision_tower"),
                   extra=extra, vision_extra=dict(d.get("vision_extra", {})))

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "VideoXLConfig":
        """Loads our JSON format, or a name from `configs/` (e.g. 'videoxl_7b', 'tiny')."""
        path = os.fspath(path)
        if not os.path.exists(path):
            path = os.path.join(CONFIG_DIR, path if path.endswith(".json") else path + ".json")
        with open(path) as f:
            return cls.from_dict(json.load(f))


CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def _normalise_rope(hf: Mapping[str, Any]) -> dict[str, Any]:
    """transformers v5 writes `rope_parameters`; v4 `rope_theta` + `rope_scaling`. Only plain RoPE is supported."""
    hf = dict(hf)
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise ConfigError(f"rope type {kind!r} is not supported (only plain RoPE)")
    if "rope_theta" not in hf and "rope_theta" in params:
        hf["rope_theta"] = params["rope_theta"]
    return hf


def _take(src: Mapping[str, Any], fields: Mapping[str, str], required: tuple[str, ...] = ()) -> dict[str, Any]:
    missing = [k for k in required if k not in src]
    if missing:
        raise ConfigError(f"config.json lacks required field(s): {', '.join(missing)}")
    return {ours: src[theirs] for theirs, ours in fields.items() if theirs in src}
