"""One question about one video file, end to end: decode, preprocess, encode, compress, generate.

    answerer = Answerer.load("path/to/checkpoint")            # HF Video-XL dir or converted JAX dir
    result = answerer.ask("video.mp4", "What happens?", sampling=video.uniform(32), ratio=8)
    result.text

`ask` reports its stages to a `progress(message)` callback (the CLI prints
them on stderr). Frames stay uint8 until the prefill, which normalises them
on device and streams them through CLIP window by window.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vxl_jax import pipeline
from vxl_jax.compress import schedules
from vxl_jax.config import VideoXLConfig
from vxl_jax.conversion.checkpoint import CLIP_MEAN, CLIP_STD, generation_eos_ids, load_model
from vxl_jax.data import preprocess, prompts, video
from vxl_jax.generate import GREEDY, Sampling

DEFAULT_RATIO = 8


def _silent(message: str) -> None:
    del message


def eos_ids(checkpoint_dir: str, tokenizer) -> tuple[int, ...]:
    """Stop ids: generation_config.json's eos plus the tokenizer's eos and `<|im_end|>`."""
    ids = list(generation_eos_ids(checkpoint_dir))
    for token in (getattr(tokenizer, "eos_token", None), "<|im_end|>"):
        if token is not None:
            i = tokenizer.convert_tokens_to_ids(token)
            if i is not None and i != getattr(tokenizer, "unk_token_id", None):
                ids.append(i)
    return tuple(dict.fromkeys(int(i) for i in ids))


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str
    token_ids: np.ndarray            # the generated ids, up to and including eos when it came
    frame_indices: np.ndarray
    timestamps: np.ndarray
    memory_entries: int              # KV entries per layer after the prefill
    seconds: dict                    # stage -> seconds


@dataclasses.dataclass
class Answerer:
    params: dict
    cfg: VideoXLConfig
    tokenizer: object
    eos: tuple[int, ...]
    dtype: object = jnp.float32

    @classmethod
    def load(cls, checkpoint_dir: str, *, dtype=jnp.float32, progress: Callable[[str], None] = _silent) -> "Answerer":
        if not os.path.isdir(checkpoint_dir):
            raise FileNotFoundError(f"checkpoint folder {checkpoint_dir} does not exist")
        t0 = time.perf_counter()
        tokenizer = prompts.load_tokenizer(checkpoint_dir)  # first: a missing tokenizer fails before the weights load
        params, cfg = load_model(checkpoint_dir, dtype=None)
        params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
        progress(f"loaded {checkpoint_dir}: {cfg.llm.num_layers}-layer LLM, hidden {cfg.llm.hidden_size}, "
                 f"vocab {cfg.llm.vocab_size} ({time.perf_counter() - t0:.1f} s)")
        return cls(params, cfg, tokenizer, eos_ids(checkpoint_dir, tokenizer), dtype)

    def ask(self, video_path: str, question: str, *, sampling: video.Sampling = video.uniform(32),
            progress: Callable[[str], None] = _silent, **options) -> Answer:
        """Reads `sampling`'s frames of the file, then `ask_frames` (same options)."""
        t = time.perf_counter()
        clip = video.read(video_path, sampling)
        read_s = time.perf_counter() - t
        progress(f"read {len(clip.indices)} of {clip.total_frames} frames ({clip.avg_fps:.1f} fps, "
                 f"{clip.frames.shape[2]}x{clip.frames.shape[1]}) from {video_path} in {read_s:.2f} s")
        answer = self.ask_frames(clip.frames, question, progress=progress, **options)
        return dataclasses.replace(answer, frame_indices=clip.indices, timestamps=clip.timestamps,
                                   seconds={"read": read_s, **answer.seconds})

    def ask_frames(self, frames: np.ndarray, question: str, *, ratio: Optional[int] = DEFAULT_RATIO,
                   max_new_tokens: int = 64, decoding: Sampling = GREEDY, seed: int = 0,
                   system: Optional[str] = prompts.SYSTEM_MESSAGE,
                   progress: Callable[[str], None] = _silent) -> Answer:
        """Answers `question` about uint8 RGB frames [F, H, W, 3] (any size: resized and cropped here)."""
        seconds = {}
        t = time.perf_counter()
        frames = preprocess.crop_frames_u8(np.asarray(frames), self.cfg.vision.image_size)
        ids = prompts.inference_prompt(self.tokenizer, question, system=system)
        seconds["preprocess"] = time.perf_counter() - t
        progress(f"resized and cropped to {frames.shape[-1]} px, prompt of {len(ids) - 1} text tokens "
                 f"+ {len(frames)} x {self.cfg.tokens_per_frame} visual tokens ({seconds['preprocess']:.2f} s)")

        t = time.perf_counter()
        schedule = schedules.fixed(ratio) if ratio else schedules.uncompressed()
        prepared = pipeline.prepare(self.cfg, [ids], [frames], schedule, max_new_tokens=max_new_tokens)
        norm = (np.asarray(CLIP_MEAN) * 255.0, np.asarray(CLIP_STD) * 255.0)
        result, gen = pipeline.run(self.params, self.cfg, prepared, max_new_tokens=max_new_tokens,
                                   sampling=decoding, key=jax.random.key(seed), eos_ids=self.eos,
                                   pad_id=self.eos[0] if self.eos else 0, pixel_norm=norm, dtype=self.dtype)
        n = int(jax.device_get(gen.num_tokens)[0])
        tokens = np.asarray(jax.device_get(gen.tokens))[0, :n]
        seconds["generate"] = time.perf_counter() - t
        memory = prepared.plans[0].memory_after_prefill
        progress(f"compressed {len(frames)} frames at ratio {ratio or 'none'} into {memory} KV entries per layer "
                 f"and generated {n} tokens in {seconds['generate']:.2f} s (compile included)")
        text_ids = [int(i) for i in tokens if int(i) not in self.eos]
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        # Frame numbers and times are the caller's (`ask` fills them from the file); here: positions, times unknown.
        return Answer(text, tokens, np.arange(len(frames)), np.full(len(frames), np.nan), memory, seconds)

