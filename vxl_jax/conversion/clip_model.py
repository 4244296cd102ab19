"""HF `CLIPModel` checkpoints <-> the dual-encoder params of model/clip_dual.py.

The key map reuses keymap.py: the vision tower's rules under `vision_model.`,
and the same per-layer rules re-rooted at `text_model.` for the text encoder
(its layers have the vision layers' names and shapes). Every source key is
consumed by a rule or reported; `*.position_ids` buffers are accepted and
listed as ignored. `write_tiny_clip` makes a seeded random checkpoint with a
tiny BPE tokenizer beside it, so the whole path (tokenizer included) runs offline.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vxl_jax.config import ClipVisionConfig
from vxl_jax.conversion import keymap
from vxl_jax.conversion.checkpoint import clip_preprocessor_config
from vxl_jax.conversion.engine import ConversionStats, hf_to_params, params_to_hf, set_path
from vxl_jax.conversion.keymap import TRANSPOSE, Rule
from vxl_jax.conversion.safetensors_io import CheckpointReader, write_checkpoint
from vxl_jax.model import clip_dual
from vxl_jax.model.clip_dual import ClipModelConfig
from vxl_jax.model.clip_text import ClipTextConfig

# Non-persistent buffers that older exports still carry.
POSITION_IDS = (r"^text_model\.embeddings\.position_ids$", r"^vision_model\.embeddings\.position_ids$")


# -------------------------------------------------------------------- key map

def text_rules(cfg: ClipTextConfig, prefix: str = "text_model.") -> list[Rule]:
    d, v = cfg.hidden_size, cfg.vocab_size
    # The encoder layers share the vision tower's names and shapes: take its layer rules, re-rooted.
    shaped = ClipVisionConfig(hidden_size=d, intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers,
                              num_heads=cfg.num_heads, image_size=14, patch_size=14)
    layers = [dataclasses.replace(r, path=("text",) + r.path[1:])
              for r in keymap.vision_rules(shaped, prefix=prefix) if r.layers]
    return [
        Rule(prefix + "embeddings.token_embedding.weight", ("text", "token_embed"), (v, d)),
        Rule(prefix + "embeddings.position_embedding.weight", ("text", "pos_embed"), (cfg.max_position_embeddings, d)),
        *layers,
        Rule(prefix + "final_layer_norm.weight", ("text", "final_norm", "scale"), (d,)),
        Rule(prefix + "final_layer_norm.bias", ("text", "final_norm", "bias"), (d,)),
    ]


def clip_model_rules(cfg: ClipModelConfig) -> list[Rule]:
    """Every key of an HF `CLIPModel` checkpoint."""
    p = cfg.projection_dim
    return text_rules(cfg.text) + keymap.vision_rules(cfg.vision, prefix="vision_model.") + [
        Rule("text_projection.weight", ("text_projection",), (p, cfg.text.hidden_size), TRANSPOSE),
        Rule("visual_projection.weight", ("visual_projection",), (p, cfg.vision.hidden_size), TRANSPOSE),
        Rule("logit_scale", ("logit_scale",), ()),
    ]


# ------------------------------------------------------------------ read/write

def read_clip_model(path: str | os.PathLike, *, dtype=None,
                    progress: bool = False) -> tuple[dict, ClipModelConfig, ConversionStats]:
    """Params (numpy) and config of an HF CLIPModel dir; all key problems raised together."""
    path = os.fspath(path)
    cfg = ClipModelConfig.from_pretrained(path)
    params, stats = hf_to_params(CheckpointReader(path), clip_model_rules(cfg), dtype=dtype, source=path,
                                 progress=progress, ignore=POSITION_IDS)
    return params, cfg, stats


def save_clip_model(path: str | os.PathLike, params: dict, cfg: ClipModelConfig) -> list[str]:
    """Writes model.safetensors (HF key names) and config.json; returns the files written."""
    path = os.fspath(path)
    tensors, specs = params_to_hf(jax.tree.map(np.asarray, params), clip_model_rules(cfg))
    # The engine's np.ascontiguousarray turns the 0-d logit_scale into [1]: give it back its HF shape.
    tensors = ((key, array.reshape(specs[key][0])) for key, array in tensors)
    files = write_checkpoint(tensors, specs, path)
    _write_json(os.path.join(path, "config.json"), cfg.to_hf_config())
    return files + [os.path.join(path, "config.json")]


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# ------------------------------------------------------------------ the model

_encode_text = jax.jit(clip_dual.encode_text, static_argnums=1)
_encode_images = jax.jit(clip_dual.encode_images, static_argnums=1)


@dataclasses.dataclass
class ClipModel:
    """A loaded CLIPModel: embeds texts (with the checkpoint's tokenizer) and uint8 frames."""

    params: dict
    cfg: ClipModelConfig
    tokenizer: Optional[Any] = None
    frame_batch: int = 32

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> (ids [B, Tmax] right-padded with the pad id, lengths [B]); truncated to the position table."""
        if self.tokenizer is None:
            raise ValueError("this CLIP checkpoint has no tokenizer files: pass token ids to encode_text")
        t = self.cfg.text.max_position_embeddings
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=t, return_tensors="np")
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].sum(axis=1).astype(np.int32)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """[B, P] float32 text embeddings (not normalised). Padded to the full table: one compile per B."""
        ids, lengths = self.tokenize(texts)
        return np.asarray(_encode_text(self.params, self.cfg, ids, lengths))

    def embed_frames(self, frames_u8: np.ndarray) -> np.ndarray:
        """uint8 [F, H, W, 3] -> [F, P] float32 image embeddings (not normalised), in batches.

        Frames are preprocessed per batch (memory stays one batch of pixels); the last
        batch is zero-padded to the batch size, so one compile serves a whole video.
        """
        from vxl_jax.data.preprocess import preprocess_frames
        frames_u8 = np.asarray(frames_u8)
        if frames_u8.ndim != 4:
            raise ValueError(f"expected frames [F, H, W, 3], got shape {frames_u8.shape}")
        n = frames_u8.shape[0]
        batch = max(1, min(self.frame_batch, n))
        out = []
        for start in range(0, n, batch):
            pixels = preprocess_frames(frames_u8[start:start + batch], size=self.cfg.vision.image_size)
            real = pixels.shape[0]
            if real < batch:
                pixels = np.concatenate([pixels, np.zeros((batch - real, *pixels.shape[1:]), pixels.dtype)])
            out.append(np.asarray(_encode_images(self.params, self.cfg, pixels))[:real])
        return np.concatenate(out) if out else np.zeros((0, self.cfg.projection_dim), np.float32)


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's tokenizer via AutoTokenizer (local files only); None when it has none."""
    path = os.fspath(path)
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:  # batches are right-padded; what fills the padding is never attended
        tok.pad_token = tok.eos_token
    return tok


def load_clip_model(path: str | os.PathLike, dtype=jnp.float32, *, frame_batch: int = 32) -> ClipModel:
    """An HF CLIPModel dir -> ClipModel (params on the default device as `dtype`, tokenizer if present)."""
    params, cfg, _ = read_clip_model(path, dtype=dtype)
    return ClipModel(params=jax.tree.map(jnp.asarray, params), cfg=cfg, tokenizer=load_tokenizer(path),
                     frame_batch=frame_batch)


# ------------------------------------------------------------- tiny checkpoint

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def tiny_clip_config(vocab_size: int = 1000) -> ClipModelConfig:
    """Text hidden 32, 2 layers, 4 heads, 77 positions; vision hidden 32, 2 layers, 224 px / 32; projection 16.

    eos/pad id 1, bos 0 (where the tiny tokenizer puts them): not the legacy id 2, so
    pooling takes the first eos, and not the top id, so an argmax pooling would differ.
    """
    text = ClipTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          max_position_embeddings=77, eos_token_id=1, bos_token_id=0, pad_token_id=1,
                          projection_dim=16)
    vision = ClipVisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=224,
                              patch_size=32, projection_dim=16)
    return ClipModelConfig(text=text, vision=vision, projection_dim=16)


def _draw(rng: np.random.Generator, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """O(1) activations and non-uniform attention: token/position/class embeddings N(0, 1), biases
    N(0, 0.1^2), norm weights 1 + N(0, 0.1^2), other weights N(0, 1/fan_in), logit_scale log(1/0.07)."""
    module = key.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    if key == "logit_scale":
        return np.asarray(np.log(1 / 0.07), np.float32)
    if key.endswith(_EMBEDDINGS):
        out = rng.standard_normal(shape)
    elif key.endswith(".bias"):
        out = 0.1 * rng.standard_normal(shape)
    elif "norm" in module or "layrnorm" in module:
        out = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
        out = rng.standard_normal(shape) / np.sqrt(int(np.prod(shape[1:])))
    return out.astype(np.float32)


_EMBEDDINGS = ("token_embedding.weight", "position_embedding.weight", "class_embedding")


def random_params(cfg: ClipModelConfig, seed: int = 0) -> dict:
    """Params (numpy float32) drawn key by key in sorted HF-name order: same seed, same bytes."""
    rng = np.random.default_rng(seed)
    rules = {key: rule for rule in clip_model_rules(cfg) for key in rule.hf_keys()}
    params: dict = {}
    for key in sorted(rules):
        rule = rules[key]
        tensor = rule.transform.to_jax(_draw(rng, key, rule.hf_shape))
        if rule.layers:
            stacked = _get_or_make(params, rule.path, rule.jax_shape())
            stacked[int(rule.pattern.match(key).group(1))] = tensor
        else:
            set_path(params, rule.path, np.asarray(tensor))
    return params


def _get_or_make(tree: dict, path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    return tree.setdefault(path[-1], np.empty(shape, np.float32))


def tiny_tokenizer(vocab_size: int = 1000):
    """A byte-level BPE trained offline on the project's tiny corpus, CLIP-style specials.

    `<|startoftext|>` is id 0 and `<|endoftext|>` id 1 (also the pad token); the post-processor
    wraps every text in them; lowercased like CLIP's. The corpus yields ~720 ids, below `vocab_size`.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from vxl_jax.data.tiny_tokenizer import _corpus

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[BOS, EOS], show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}",
                                                       special_tokens=[(BOS, 0), (EOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   model_max_length=77, clean_up_tokenization_spaces=False)


def write_tiny_clip(path: str | os.PathLike, seed: int = 0) -> ClipModelConfig:
    """A seeded random HF CLIPModel dir: weights, config.json, preprocessor config and a tokenizer."""
    path = os.fspath(path)
    cfg = tiny_clip_config()
    save_clip_model(path, random_params(cfg, seed), cfg)
    tok = tiny_tokenizer(cfg.text.vocab_size)
    assert tok.eos_token_id == cfg.text.eos_token_id and tok.bos_token_id == cfg.text.bos_token_id
    tok.save_pretrained(path)
    _write_json(os.path.join(path, "preprocessor_config.json"), clip_preprocessor_config(cfg.vision))
    return cfg


__all__ = ["ClipModel", "clip_model_rules", "load_clip_model", "read_clip_model", "save_clip_model",
           "text_rules", "write_tiny_clip"]
