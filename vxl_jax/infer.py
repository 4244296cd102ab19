"""Questions about video files, end to end: decode, preprocess, encode, compress, generate.

    answerer = Answerer.load("path/to/checkpoint")            # HF Video-XL dir or converted JAX dir
    result = answerer.ask("video.mp4", "What happens?", sampling=video.uniform(32), ratio=8)
    result.text

Encode once, ask many: a video's compressed memory does not depend on the question.

    encoded = answerer.encode("video.mp4", sampling=video.uniform(32), ratio=8)
    answers = answerer.answer([(encoded, "What happens?"), (encoded, "Who is there?")])   # one batch

`ask` reports its stages to a `progress(message)` callback (the CLI prints
them on stderr). Frames stay uint8 until the prefill, which normalises them
on device and streams them through CLIP window by window.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from vxl_jax import pipeline, program_cache
from vxl_jax.compress import schedules
from vxl_jax.compress.memory import Memory
from vxl_jax.config import VideoXLConfig
from vxl_jax.conversion.checkpoint import PIXEL_NORM_U8, generation_eos_ids, load_model
from vxl_jax.data import preprocess, prompts, unires, video
from vxl_jax.generate import GREEDY, Sampling
from vxl_jax.model import videoxl
from vxl_jax.model.videoxl import IMAGE_TOKEN_INDEX, split_prompt
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
        answer_keys = ("max_new_tokens", "decoding")
        encoded = self.encode(video_path, sampling=sampling, progress=progress,
                              **{k: v for k, v in options.items() if k not in answer_keys})
        return self.answer([(encoded, question)], progress=progress, seed=options.get("seed", 0),
                           **{k: v for k, v in options.items() if k in answer_keys})[0]

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
        One `encode` and one `answer`: to ask several questions about a video, call those directly.
        """
        encoded = self.encode(frames, ratio=ratio, schedule=schedule, x2l=x2l, seed=seed, system=system,
                              progress=progress)
        return self.answer([(encoded, question)], max_new_tokens=max_new_tokens, decoding=decoding, seed=seed,
                           progress=progress)[0]

    # ------------------------------------------------------------------------------------------------------
    # Encode once, ask many.

    def encode(self, source: Union[str, video.Clip, np.ndarray], *, sampling: video.Sampling = video.uniform(32),
               ratio: Optional[int] = DEFAULT_RATIO, schedule: Optional[schedules.Schedule] = None,
               x2l: Optional[X2LConfig] = None, seed: int = 0, system: Optional[str] = prompts.SYSTEM_MESSAGE,
               progress: Callable[[str], None] = _silent) -> "EncodedVideo":
        """One video (a file, read with `sampling`, a `video.Clip`, or uint8 frames [F, H, W, 3]) -> its compressed
        memory. An image file (or an image Clip) becomes the frames `unires.image_frames` makes of it."""
        return self.encode_many([source], sampling=sampling, ratio=ratio, schedule=schedule, x2l=x2l, seed=seed,
                                system=system, progress=progress)[0]

    def encode_many(self, sources: Sequence[Union[str, video.Clip, np.ndarray]], *,
                    sampling: video.Sampling = video.uniform(32),
                    ratio: Optional[int] = DEFAULT_RATIO, schedule: Optional[schedules.Schedule] = None,
                    x2l: Optional[X2LConfig] = None, seed: int = 0, system: Optional[str] = prompts.SYSTEM_MESSAGE,
                    progress: Callable[[str], None] = _silent) -> list["EncodedVideo"]:
        """Videos -> their compressed memories, in one batched prefill (Video-XL; Video-X2L encodes one at a time).

        The memory after the prompt's start (the system message and the user turn up to the video) and the
        video does not depend on the question: `answer` asks any number of questions about it. Videos of one
        size bucket share one compiled program; a batch pads to its longest video.
        """
        if not len(sources):
            raise ValueError("encode_many needs at least one video")
        t = time.perf_counter()
        clips, images = [], []
        for source in sources:
            if isinstance(source, (str, os.PathLike, video.Clip)):
                t0 = time.perf_counter()
                clip = source if isinstance(source, video.Clip) else video.read(source, sampling)
                progress(f"read {len(clip.indices)} of {clip.total_frames} frames ({clip.avg_fps:.1f} fps, "
                         f"{clip.frames.shape[2]}x{clip.frames.shape[1]}) from {clip.path} in "
                         f"{time.perf_counter() - t0:.2f} s")
                clips.append((clip.frames, clip.indices, clip.timestamps))
                images.append(clip.is_image)
            else:
                raw = np.asarray(source)
                clips.append((raw, np.arange(len(raw)), np.full(len(raw), np.nan)))
                images.append(False)
        read_s = time.perf_counter() - t
        t = time.perf_counter()
        clips = [self._image_frames(raw[0], progress) if image else (raw, indices, times)
                 for (raw, indices, times), image in zip(clips, images)]
        cropped = [preprocess.crop_frames_u8(raw, self.cfg.vision.image_size) for raw, _, _ in clips]
        prefix, _ = split_prompt(prompts.inference_prompt(self.tokenizer, "", system=system))
        prep_s = time.perf_counter() - t
        progress(f"resized and cropped {sum(len(c) for c in cropped)} frames of {len(cropped)} video(s) to "
                 f"{self.cfg.vision.image_size} px ({prep_s:.2f} s)")
        if schedule is None:
            schedule = schedules.fixed(ratio) if ratio else schedules.uncompressed()
        key = jax.random.key(seed)
        base = {"read": read_s / len(clips), "preprocess": prep_s / len(clips)}
        if x2l is not None:
            return [self._encode_x2l(raw, frames, indices, times, prefix, system, schedule, x2l, key, base, progress)
                    for (raw, indices, times), frames in zip(clips, cropped)]

        t = time.perf_counter()
        prompts_ = [np.append(prefix, IMAGE_TOKEN_INDEX) for _ in cropped]
        prepared = pipeline.prepare(self.cfg, prompts_, cropped, schedule, key=key, frame_features=self.frame_means,
                                    require_suffix=False)
        memory = pipeline.encode(self.params, self.cfg, prepared, pixel_norm=PIXEL_NORM_U8, dtype=self.dtype)
        entries = np.asarray(jax.device_get(memory.length))
        seconds = {**base, "encode": (time.perf_counter() - t) / len(clips)}
        out = []
        for b, ((_, indices, times), frames, plan) in enumerate(zip(clips, cropped, prepared.plans)):
            ratios = sorted({str(w.ratio) for w in plan.windows})
            progress(f"compressed {len(frames)} frames at ratio {'/'.join(ratios)} in {len(plan.windows)} "
                     f"window(s) into {int(entries[b])} KV entries per layer")
            details = {"window_frames": [w.raw // self.cfg.tokens_per_frame for w in plan.windows],
                       "ratios": [w.ratio for w in plan.windows]}
            out.append(EncodedVideo(prefix, system, len(frames), indices, times, int(entries[b]), seconds, details,
                                    memory=memory, row=b))
        progress(f"encoded {len(clips)} video(s) in {seconds['encode'] * len(clips):.2f} s (compile included)")
        return out

    def _image_frames(self, image: np.ndarray, progress) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """An image's (frames, indices, times) for this model: its tiles for anyres + unires (`unires.image_frames`)."""
        frames = unires.image_frames(image, self.cfg)
        if self.cfg.image.tiles:
            height, width = image.shape[:2]
            cols, rows = unires.grid_shape((width, height), self.cfg.image.grid_pinpoints, self.cfg.vision.image_size)
            progress(f"unires: the {width}x{height} image is {cols}x{rows} tiles of {self.cfg.vision.image_size} px "
                     f"({len(frames) * self.cfg.tokens_per_frame} visual tokens)")
        return frames, np.zeros(len(frames), np.int64), np.zeros(len(frames), np.float64)

    def answer(self, pairs: Sequence[tuple["EncodedVideo", str]], *, max_new_tokens: int = 64,
               decoding: Sampling = GREEDY, seed: int = 0, progress: Callable[[str], None] = _silent) -> list[Answer]:
        """Answers each (encoded video, question) pair; the questions about videos encoded together run as one batch.

        Only the question is prefilled (on a copy of its video's memory) and decoded; the encodings are reused
        as they are, so any number of questions can follow.
        """
        key = jax.random.key(seed)
        answers: list[Optional[Answer]] = [None] * len(pairs)
        groups: dict[int, list[int]] = {}
        for i, (encoded, question) in enumerate(pairs):
            if encoded.x2l is not None:
                answers[i] = self._answer_x2l(encoded, question, max_new_tokens, decoding, key, progress)
            else:
                groups.setdefault(id(encoded.memory), []).append(i)
        for members in groups.values():
            t = time.perf_counter()
            first = pairs[members[0]][0]
            suffixes = [self._suffix(pairs[i][0], pairs[i][1]) for i in members]
            _, gen = pipeline.ask(self.params, self.cfg, first.memory, [pairs[i][0].row for i in members], suffixes,
                                  max_new_tokens=max_new_tokens, sampling=decoding, key=key, eos_ids=self.eos,
                                  pad_id=self.eos[0] if self.eos else 0, dtype=self.dtype)
            counts = np.asarray(jax.device_get(gen.num_tokens))
            tokens = np.asarray(jax.device_get(gen.tokens))
            seconds = (time.perf_counter() - t) / len(members)
            progress(f"answered {len(members)} question(s) in {seconds * len(members):.2f} s "
                     f"({int(counts.sum())} tokens generated; compile included)")
            for j, i in enumerate(members):
                enc = pairs[i][0]
                ids = tokens[j, :counts[j]]
                answers[i] = Answer(self._text(ids), ids, enc.frame_indices, enc.timestamps,
                                    enc.memory_entries + len(suffixes[j]), {**enc.seconds, "generate": seconds},
                                    dict(enc.details))
        return answers

    def _suffix(self, encoded: "EncodedVideo", question: str) -> np.ndarray:
        """The question's ids after the video; its prompt must start as the encoded one did."""
        prefix, suffix = split_prompt(prompts.inference_prompt(self.tokenizer, question, system=encoded.system))
        if not np.array_equal(prefix, encoded.prefix):
            raise ValueError("the question's prompt does not start like the encoded video's (a question with "
                             "'<image>' inside puts text before the video: encode the video with that prompt start)")
        return suffix

    def _text(self, tokens: np.ndarray) -> str:
        return self.tokenizer.decode([int(i) for i in tokens if int(i) not in self.eos], skip_special_tokens=True)

    def _encode_x2l(self, raw, frames, indices, times, prefix, system, schedule, x2l, key, base,
                    progress) -> "EncodedVideo":
        t = time.perf_counter()
        info = schedules.VideoInfo(len(frames) * self.cfg.tokens_per_frame, self.cfg.tokens_per_frame,
                                   self.cfg.vst.window, features_fn=lambda: self.frame_means(frames))
        lengths = schedule(info, key).lengths
        enc = x2l_runner.encode_video(self.params, self.cfg, [prefix], [frames], x2l, lengths=[lengths],
                                      pixel_norm=PIXEL_NORM_U8, dtype=self.dtype)
        seconds = {**base, "encode": time.perf_counter() - t}
        chunks = enc.num_chunks[0]
        progress(f"X2L: {chunks} chunk(s) at ratios {x2l.low}/{x2l.high} (encode {seconds['encode']:.2f} s)")
        return EncodedVideo(prefix, system, len(frames), indices, times, enc.entries(0, [False] * chunks), seconds,
                            {}, x2l=x2l, x2l_encoding=enc, raw_frames=raw)

    def _answer_x2l(self, encoded: "EncodedVideo", question: str, max_new_tokens, decoding, key,
                    progress) -> Answer:
        x2l, enc = encoded.x2l, encoded.x2l_encoding
        seconds = dict(encoded.seconds)
        suffix = self._suffix(encoded, question)
        t = time.perf_counter()
        oracle_key = (x2l.oracle, x2l.clip_dir, x2l.k)
        if oracle_key not in self._oracles:
            self._oracles[oracle_key] = x2l_runner.build_oracle(x2l, self.params)
        question_ids = np.asarray(self.tokenizer(question, add_special_tokens=False)["input_ids"])
        query = Query(question, question_ids, enc.chunk_frames[0], enc.frame_features[0], frames=encoded.raw_frames,
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
        progress(f"X2L: the {x2l.oracle} oracle re-loads chunks {details['selected']}: {sizes['merged']} KV "
                 f"entries per layer (all-L {sizes['all_low']}, all-H {sizes['all_high']}); generated {n} tokens "
                 f"in {seconds['generate']:.2f} s")
        return Answer(self._text(tokens), tokens, encoded.frame_indices, encoded.timestamps,
                      sizes["merged"] + len(suffix), seconds, details)


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedVideo:
    """A video's compressed memory, question independent: `Answerer.answer` asks any number of questions about it.

    Videos encoded together share one device memory (`memory`, this video's row `row`); a Video-X2L encoding
    keeps both compression levels (`x2l_encoding`) and re-selects its chunks per question.
    """

    prefix: np.ndarray               # prompt ids before the video (system message, start of the user turn)
    system: Optional[str]
    num_frames: int
    frame_indices: np.ndarray        # frame numbers in the file (positions for frames given directly)
    timestamps: np.ndarray           # seconds (NaN for frames given directly)
    memory_entries: int              # KV entries per layer after the video (X2L: all chunks at the high ratio)
    seconds: dict                    # per video: read, preprocess, encode
    details: dict
    memory: Optional[Memory] = None
    row: int = 0
    x2l: Optional[X2LConfig] = None
    x2l_encoding: Optional[x2l_runner.Encoding] = None
    raw_frames: Optional[np.ndarray] = None


def _frame_means(params, cfg: VideoXLConfig, frames_u8, dtype):
    pixels = videoxl.normalise_pixels(frames_u8, *PIXEL_NORM_U8, dtype)
    return videoxl.frame_features(params, cfg, pixels, dtype=dtype).astype(jnp.float32).mean(axis=1)


_frame_means_jit = program_cache.jit(_frame_means, static_argnames=("cfg", "dtype"))
