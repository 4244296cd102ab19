"""Checkpoint directories: HF Video-XL <-> vxl_jax (orbax), and import from Qwen2 + CLIP.

A vxl_jax checkpoint directory holds
  params/           orbax PyTree checkpoint of the params (numpy leaves, source dtype)
  vxl_config.json   the model config (our format; keeps unmodelled HF fields)
  + the HF side files found beside the source (tokenizer, generation config, ...)

An HF Video-XL directory holds config.json, generation_config.json,
model.safetensors (or shards + index) with the original key names, and the
vision tower's own folder (config.json, model.safetensors, preprocessor_config.json).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from typing import Optional

import jax
import numpy as np

from vxl_jax.config import (_LLM_FIELDS, KNOWN_VISION_TOWERS, ClipVisionConfig, ConfigError, ProjectorConfig,
                            Qwen2Config, VideoXLConfig, VSTConfig)
from vxl_jax.conversion import keymap
from vxl_jax.conversion.engine import (ConversionError, ConversionStats, set_path, hf_to_params, iter_targets,
                                       params_to_hf)
from vxl_jax.conversion.safetensors_io import CheckpointReader, write_checkpoint
from vxl_jax.model import projector as projector_model

PARAMS_DIR = "params"
CONFIG_FILE = "vxl_config.json"
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
              "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# (mean, std) per channel on raw uint8 pixel values: what the prefill's `pixel_norm` takes.
PIXEL_NORM_U8 = (tuple(m * 255 for m in CLIP_MEAN), tuple(s * 255 for s in CLIP_STD))


def is_jax_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, PARAMS_DIR))


def is_hf_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


# --------------------------------------------------------------------- reading

def read_hf(path: str, *, dtype=None, progress: bool = False) -> tuple[dict, VideoXLConfig, ConversionStats]:
    """Params (numpy) and config of an HF Video-XL checkpoint dir."""
    cfg = VideoXLConfig.from_pretrained(path)
    params, stats = hf_to_params(CheckpointReader(path), keymap.videoxl_rules(cfg), dtype=dtype, source=path,
                                 progress=progress)
    return params, cfg, stats


def load_jax(path: str) -> tuple[dict, VideoXLConfig]:
    """Params (numpy) and config of a vxl_jax checkpoint dir."""
    if not is_jax_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a vxl_jax checkpoint: it needs {CONFIG_FILE} and {PARAMS_DIR}/ "
                                f"(make one with `vxl convert hf-to-jax`)")
    cfg = VideoXLConfig.load(os.path.join(path, CONFIG_FILE))
    params = _orbax_v1().load(os.path.abspath(os.path.join(path, PARAMS_DIR)))
    return jax.tree.map(np.asarray, params), cfg


def _orbax_v1():
    """orbax's v1 API: its partial save writes one checkpoint target by target (bounded memory)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from orbax.checkpoint.experimental import v1
    return v1


def generation_eos_ids(path: str) -> tuple[int, ...]:
    """The eos id(s) of the checkpoint's generation_config.json (an int or a list there); () without one."""
    gen = os.path.join(path, "generation_config.json")
    eos = _read_json(gen).get("eos_token_id") if os.path.isfile(gen) else None
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)


def load_model(path: str, *, dtype=None, progress: bool = False) -> tuple[dict, VideoXLConfig]:
    """Params and config from either an HF Video-XL dir or a vxl_jax dir."""
    if is_jax_checkpoint(path):
        params, cfg = load_jax(path)
        if dtype is not None:
            params = jax.tree.map(lambda a: a.astype(dtype), params)
        return params, cfg
    if is_hf_checkpoint(path):
        params, cfg, _ = read_hf(path, dtype=dtype, progress=progress)
        return params, cfg
    raise FileNotFoundError(f"{path} is neither an HF Video-XL checkpoint (config.json) "
                            f"nor a vxl_jax checkpoint ({CONFIG_FILE} + {PARAMS_DIR}/)")


# --------------------------------------------------------------------- writing

def save_jax(out: str, params, cfg: VideoXLConfig, side_files_from: Optional[str] = None) -> None:
    """Writes a vxl_jax checkpoint dir. `params` is a tree, or an iterable of (path, array) targets.

    Targets go to orbax in partial saves of about `_SAVE_BATCH_BYTES`, so an
    iterable that produces them lazily keeps memory near one stacked target,
    whatever the model size.
    """
    orbax = _orbax_v1()
    os.makedirs(out, exist_ok=True)
    target = os.path.abspath(os.path.join(out, PARAMS_DIR))
    if os.path.exists(target) or os.path.exists(os.path.join(out, CONFIG_FILE)):
        raise FileExistsError(f"{out} already holds a checkpoint; choose an empty output directory")
    items = _leaves_with_paths(params) if isinstance(params, dict) else params
    batch: dict = {}
    held = 0
    for path, array in items:
        array = np.asarray(array)
        set_path(batch, tuple(path), array)
        held += array.nbytes
        if held >= _SAVE_BATCH_BYTES:
            orbax.partial.save(target, batch)
            batch, held = {}, 0
        del array
    if batch:
        orbax.partial.save(target, batch)
    orbax.partial.finalize(target)
    cfg.save(os.path.join(out, CONFIG_FILE))
    if side_files_from:
        _copy_side_files(side_files_from, out)


# Targets are handed to orbax in batches of about this size: small ones share a save,
# a large one goes alone, so memory stays near one stacked target.
_SAVE_BATCH_BYTES = 256 * 2**20


def _leaves_with_paths(tree: dict, prefix: tuple = ()):
    for name, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves_with_paths(value, prefix + (name,))
        else:
            yield prefix + (name,), value


def write_hf(out: str, params: dict, cfg: VideoXLConfig, *, max_shard_bytes: int = 5 * 2**30,
             side_files_from: Optional[str] = None) -> ConversionStats:
    """Writes an HF Video-XL checkpoint dir (original key names), streaming shard by shard."""
    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    tensors, specs = params_to_hf(params, keymap.videoxl_rules(cfg))
    write_checkpoint(tensors, specs, out, max_shard_bytes=max_shard_bytes)
    hf, vision_hf = cfg.to_hf_config()
    _write_json(os.path.join(out, "config.json"), hf)
    if side_files_from:
        _copy_side_files(side_files_from, out)
    if not os.path.exists(os.path.join(out, "generation_config.json")) and cfg.llm.eos_token_id is not None:
        _write_json(os.path.join(out, "generation_config.json"), {"eos_token_id": cfg.llm.eos_token_id})
    tower = cfg.vision_tower_name
    if not os.path.isabs(tower) and tower not in KNOWN_VISION_TOWERS:
        # The stand-alone CLIPVisionModel folder that `mm_vision_tower` names.
        tower_dir = os.path.join(out, tower)
        vision_tensors, vision_specs = params_to_hf(params, keymap.vision_rules(cfg.vision, prefix="vision_model."))
        write_checkpoint(vision_tensors, vision_specs, tower_dir, max_shard_bytes=max_shard_bytes)
        _write_json(os.path.join(tower_dir, "config.json"), vision_hf)
        _write_json(os.path.join(tower_dir, "preprocessor_config.json"), clip_preprocessor_config(cfg.vision))
    leaves = jax.tree.leaves(params)
    return ConversionStats(tensors=len(specs), parameters=sum(int(np.size(a)) for a in leaves),
                           bytes=sum(int(np.size(a)) * np.dtype(a.dtype).itemsize for a in leaves),
                           seconds=time.perf_counter() - start)


def clip_preprocessor_config(vision: ClipVisionConfig) -> dict:
    size = vision.image_size
    return {"crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_normalize": True,
            "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
            "image_processor_type": "CLIPImageProcessor", "resample": 3, "rescale_factor": 1 / 255,
            "size": {"shortest_edge": size}}


# ------------------------------------------------------------- the two commands

def hf_to_jax(src: str, out: str, *, dtype=None, progress: bool = True) -> ConversionStats:
    """HF Video-XL dir -> vxl_jax dir, streaming: one stacked target in memory at a time."""
    start = time.perf_counter()
    cfg = VideoXLConfig.from_pretrained(src)
    stats = ConversionStats()
    targets = iter_targets(CheckpointReader(src), keymap.videoxl_rules(cfg), stats, dtype=dtype, source=src,
                           progress=progress)
    first = next(targets)  # checks the whole checkpoint before anything is written
    save_jax(out, itertools.chain([first], targets), cfg, side_files_from=src)
    stats.seconds = time.perf_counter() - start
    return stats


def jax_to_hf(src: str, out: str, *, max_shard_bytes: int = 5 * 2**30) -> ConversionStats:
    params, cfg = load_jax(src)
    return write_hf(out, params, cfg, max_shard_bytes=max_shard_bytes, side_files_from=src)


# ----------------------------------------------- import from plain Qwen2 + CLIP

def import_parts(llm_dir: str, vision_dir: str, *, seed: int = 0, vst: VSTConfig = VSTConfig(),
                 projector_cfg: Optional[ProjectorConfig] = None, dtype=None,
                 progress: bool = True) -> tuple[dict, VideoXLConfig, ConversionStats]:
    """A fresh Video-XL model from a `Qwen2ForCausalLM` dir and a `CLIPVisionModel` (or `CLIPModel`) dir.

    VST parameters are initialised as the authors do: beacon q/k/v copied from
    q/k/v, the VST embedding copied from the eos embedding (`beacon_embed_init`
    'eos'). The projector is freshly initialised (torch Linear default) from `seed`.
    """
    llm_hf, vision_hf = _read_json(os.path.join(llm_dir, "config.json")), _read_json(
        os.path.join(vision_dir, "config.json"))
    if llm_hf.get("model_type") != "qwen2":
        raise ConfigError(f"{llm_dir}: expected a Qwen2 config (model_type 'qwen2'), got {llm_hf.get('model_type')!r}")
    llm_cfg = Qwen2Config.from_hf_config(llm_hf)
    vision_cfg = ClipVisionConfig.from_hf_config(vision_hf)
    if llm_cfg.eos_token_id is None:
        raise ConfigError(f"{llm_dir}: config has no eos_token_id, needed to initialise the VST embedding")
    projector_cfg = projector_cfg or ProjectorConfig(mm_hidden_size=vision_cfg.hidden_size)
    skip = {"model_type", "architectures", "transformers_version", "dtype", "torch_dtype", "rope_parameters",
            "rope_scaling", "layer_types"}
    extra = {k: v for k, v in llm_hf.items() if k not in skip and k not in _LLM_FIELDS}
    extra["tokenizer_model_max_length"] = llm_cfg.max_position_embeddings
    source_dtype = llm_hf.get("dtype", llm_hf.get("torch_dtype"))
    if dtype is not None or source_dtype is not None:
        extra["torch_dtype"] = str(np.dtype(dtype)) if dtype is not None else source_dtype
    vision_fields = vision_hf.get("vision_config", vision_hf)
    vision_extra = {k: v for k, v in vision_fields.items() if k not in skip and k not in vision_cfg.to_hf_config()}
    cfg = VideoXLConfig(llm=llm_cfg, vision=vision_cfg, projector=projector_cfg, vst=vst,
                        vision_tower_name="vision_tower", extra=extra, vision_extra=vision_extra)

    start = time.perf_counter()
    llm_reader = CheckpointReader(llm_dir)
    vision_reader = CheckpointReader(vision_dir)
    llm_params, llm_stats = hf_to_params(llm_reader, keymap.llm_rules(llm_cfg, with_vst=False), dtype=dtype,
                                         source=llm_dir, progress=progress)
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in vision_reader.keys()) else ""
    ignore = () if vision_hf.get("model_type") == "clip_vision_model" else _CLIP_NON_VISION
    vision_params, vision_stats = hf_to_params(vision_reader, keymap.vision_rules(vision_cfg, prefix=prefix),
                                               dtype=dtype, source=vision_dir, progress=progress, ignore=ignore)
    layers = llm_params["llm"]["layers"]
    for proj in ("q_proj", "k_proj", "v_proj"):
        layers["vst_" + proj] = {name: leaf.copy() for name, leaf in layers[proj].items()}
    embed_table = llm_params["llm"]["embed_tokens"]
    llm_params["llm"]["vst_embed"] = embed_table[llm_cfg.eos_token_id][None].copy()
    proj_params = projector_model.init_params(vision_cfg.hidden_size, llm_cfg.hidden_size,
                                              jax.random.key(seed))
    params = {**llm_params, **vision_params,
              "projector": jax.tree.map(lambda a: np.asarray(a, embed_table.dtype), proj_params)}
    stats = ConversionStats(tensors=llm_stats.tensors + vision_stats.tensors,
                            parameters=sum(int(np.size(a)) for a in jax.tree.leaves(params)),
                            bytes=sum(int(np.asarray(a).nbytes) for a in jax.tree.leaves(params)),
                            seconds=time.perf_counter() - start,
                            ignored=llm_stats.ignored + vision_stats.ignored)
    return params, cfg, stats


_CLIP_NON_VISION = (r"^text_model\.", r"^text_projection\.", r"^visual_projection\.", r"^logit_scale$")


# ------------------------------------------------------------------- helpers

def _copy_side_files(src: str, out: str) -> None:
    for name in SIDE_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(out, name))


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


__all__ = ["ConversionError", "hf_to_jax", "jax_to_hf", "import_parts", "load_model", "read_hf", "load_jax",
           "save_jax", "write_hf"]
