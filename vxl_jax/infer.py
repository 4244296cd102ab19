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
from vxl_jax.conversion.checkpoint import PIXEL_NORM_U8, generation_eos_ids, load_model
from vxl_jax.data import preprocess, prompts, video
from vxl_jax.generate import GREEDY, Sampling
from vxl_jax.model import videoxl
from vxl_jax.model.videoxl import split_prompt
from vxl_jax.x2l import runner as x2l_runner
from vxl_jax.x2l.oracles import Query
from vxl_jax.x2l.runner import X2LConfig

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
    details: dict = dataclasses.field(default_factory=dict)   # windows, and with X2L its selection and sizes


@dataclasses.dataclass
class Answerer:
    params: dict
    cfg: VideoXLConfig
    tokenizer: object
    eos: tuple[int, ...]
    dtype: object = jnp.float32
    _oracles: dict = dataclasses.field(default_factory=dict, repr=False)   # built once per X2L oracle setting

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

    def frame_means(self, frames: np.ndarray) -> np.ndarray:
        """Cropped uint8 frames [F, 3, S, S] -> [F, D]: each frame's mean visual token (what the LLM reads).

        The features content-aware schedules look at; run a window of frames at a time (one compilation).
        """
        chunk = max(1, self.cfg.vst.window // self.cfg.tokens_per_frame)
        out = []
        for i in range(0, len(frames), chunk):
            part = frames[i:i + chunk]
            padded = np.concatenate([part, np.zeros((chunk - len(part), *part.shape[1:]), part.dtype)])
            out.append(np.asarray(_frame_means_jit(self.params, self.cfg, jnp.asarray(padded), self.dtype))[:len(part)])
        return np.concatenate(out)

    def ask_frames(self, frames: np.ndarray, question: str, *, ratio: Optional[int] = DEFAULT_RATIO,
                   schedule: Optional[schedules.Schedule] = None, x2l: Optional[X2LConfig] = None,
                   max_new_tokens: int = 64, decoding: Sampling = GREEDY, seed: int = 0,
                   system: Optional[str] = prompts.SYSTEM_MESSAGE,
                   progress: Callable[[str], None] = _silent) -> Answer:
        """Answers `question` about uint8 RGB frames [F, H, W, 3] (any size: resized and cropped here).

        schedule: the windows and ratios (default `fixed(ratio)`; `None` ratio: uncompressed); its PRNG key
        comes from `seed`. x2l: answer with Video-X2L instead (the schedule, if given, only sets the chunks).
        """
        seconds = {}
        t = time.perf_counter()
        raw = np.asarray(frames)
        frames = preprocess.crop_frames_u8(raw, self.cfg.vision.image_size)
        ids = prompts.inference_prompt(self.tokenizer, question, system=system)
        seconds["preprocess"] = time.perf_counter() - t
        progress(f"resized and cropped to {frames.shape[-1]} px, prompt of {len(ids) - 1} text tokens "
                 f"+ {len(frames)} x {self.cfg.tokens_per_frame} visual tokens ({seconds['preprocess']:.2f} s)")
        if schedule is None:
            schedule = schedules.fixed(ratio) if ratio else schedules.uncompressed()
        key = jax.random.key(seed)
        if x2l is not None:
            return self._ask_x2l(raw, frames, question, ids, schedule, x2l, key, max_new_tokens, decoding,
                                 seconds, progress)

        t = time.perf_counter()
        prepared = pipeline.prepare(self.cfg, [ids], [frames], schedule, key=key, frame_features=self.frame_means,
                                    max_new_tokens=max_new_tokens)
        result, gen = pipeline.run(self.params, self.cfg, prepared, max_new_tokens=max_new_tokens,
                                   sampling=decoding, key=key, eos_ids=self.eos,
                                   pad_id=self.eos[0] if self.eos else 0, pixel_norm=PIXEL_NORM_U8, dtype=self.dtype)
        n = int(jax.device_get(gen.num_tokens)[0])
        tokens = np.asarray(jax.device_get(gen.tokens))[0, :n]
        seconds["generate"] = time.perf_counter() - t
        plan = prepared.plans[0]
        memory = plan.memory_after_prefill
        ratios = sorted({str(w.ratio) for w in plan.windows})
        progress(f"compressed {len(frames)} frames at ratio {'/'.join(ratios)} in {len(plan.windows)} window(s) "
                 f"into {memory} KV entries per layer and generated {n} tokens in {seconds['generate']:.2f} s "
                 "(compile included)")
        details = {"window_frames": [w.raw // self.cfg.tokens_per_frame for w in plan.windows],
                   "ratios": [w.ratio for w in plan.windows]}
        # Frame numbers and times are the caller's (`ask` fills them from the file); here: positions, times unknown.
        return Answer(self._text(tokens), tokens, np.arange(len(frames)), np.full(len(frames), np.nan), memory,
                      seconds, details)

    def _text(self, tokens: np.ndarray) -> str:
        return self.tokenizer.decode([int(i) for i in tokens if int(i) not in self.eos], skip_special_tokens=True)

    def _ask_x2l(self, raw, frames, question, ids, schedule, x2l, key, max_new_tokens, decoding, seconds,
                 progress) -> Answer:
        t = time.perf_counter()
        prefix, suffix = split_prompt(ids)
        info = schedules.VideoInfo(len(frames) * self.cfg.tokens_per_frame, self.cfg.tokens_per_frame,
                                   self.cfg.vst.window, features_fn=lambda: self.frame_means(frames))
        lengths = schedule(info, key).lengths
        enc = x2l_runner.encode_video(self.params, self.cfg, [prefix], [frames], x2l, lengths=[lengths],
                                      pixel_norm=PIXEL_NORM_U8, dtype=self.dtype)
        seconds["encode"] = time.perf_counter() - t
        t = time.perf_counter()
        oracle_key = (x2l.oracle, x2l.clip_dir, x2l.k)
        if oracle_key not in self._oracles:
            self._oracles[oracle_key] = x2l_runner.build_oracle(x2l, self.params)
        question_ids = np.asarray(self.tokenizer(question, add_special_tokens=False)["input_ids"])
        query = Query(question, question_ids, enc.chunk_frames[0], enc.frame_features[0], frames=raw,
                      key=jax.random.key(x2l.seed))
        scores, chosen = x2l_runner.choose(x2l, self._oracles[oracle_key], query)
        seconds["select"] = time.perf_counter() - t
        t = time.perf_counter()
        out = x2l_runner.answer(self.params, self.cfg, enc, [chosen], [suffix], max_new_tokens=max_new_tokens,
                                sampling=decoding, key=key, eos_ids=self.eos, pad_id=self.eos[0] if self.eos else 0,
                                dtype=self.dtype)
        n = int(jax.device_get(out.generation.num_tokens)[0])
        tokens = np.asarray(jax.device_get(out.generation.tokens))[0, :n]
        seconds["generate"] = time.perf_counter() - t
        seconds["ttft"] = out.ttft_s
        chunks = enc.num_chunks[0]
        sizes = {"merged": enc.entries(0, chosen), "all_low": enc.entries(0, [True] * chunks),
                 "all_high": enc.entries(0, [False] * chunks)}
        details = {"chunk_frames": [list(c) for c in enc.chunk_frames[0]], "scores": scores.tolist(),
                   "selected": np.flatnonzero(chosen).tolist(), "entries": sizes,
                   "reduction_vs_all_low": 1.0 - sizes["merged"] / sizes["all_low"]}
        progress(f"X2L: {chunks} chunk(s) at ratios {x2l.low}/{x2l.high} (encode {seconds['encode']:.2f} s), "
                 f"{x2l.oracle} oracle re-loads chunks {details['selected']}: {sizes['merged']} KV entries per layer "
                 f"(all-L {sizes['all_low']}, all-H {sizes['all_high']}); generated {n} tokens in "
                 f"{seconds['generate']:.2f} s")
        return Answer(self._text(tokens), tokens, np.arange(len(frames)), np.full(len(frames), np.nan),
                      sizes["merged"] + len(suffix), seconds, details)


def _frame_means(params, cfg: VideoXLConfig, frames_u8, dtype):
    pixels = videoxl.normalise_pixels(frames_u8, *PIXEL_NORM_U8, dtype)
    return videoxl.frame_features(params, cfg, pixels, dtype=dtype).astype(jnp.float32).mean(axis=1)


_frame_means_jit = jax.jit(_frame_means, static_argnames=("cfg", "dtype"))
