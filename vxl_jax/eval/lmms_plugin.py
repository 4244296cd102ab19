"""The `vxl_jax` model of lmms-eval (0.7.x): Video-XL / Video-X2L in JAX on lmms-eval's benchmarks.

    pip install -e ".[lmms]"
    python -m lmms_eval --model vxl_jax --model_args pretrained=CKPT,max_frames_num=128,ratio=8 \\
        --tasks videomme,mlvu_dev,longvideobench_val_v,lvbench --batch_size 1 --output_path results/

lmms-eval finds the model through the `lmms_eval.models` entry point this package declares
(`pyproject.toml`: `vxl_jax = "vxl_jax.eval.lmms_plugin:manifest"`); nothing in lmms-eval is patched.
This module imports only lmms-eval at import time (lmms-eval loads every entry point at start-up);
JAX and the checkpoint load when the model is built.

Model args (`--model_args k=v,...`):

    pretrained       checkpoint folder (HF Video-XL or converted vxl_jax, tokenizer files beside it); required
    max_frames_num   frames spread uniformly over a video (default 32); with `fps`, the cap
    fps              sample at this rate instead (capped at max_frames_num)
    ratio            compression ratio (default 8; `none` = uncompressed)
    schedule         a compression schedule by name, as `vxl infer --schedule`: `per-window:ratios=2/4/8`;
                     options after the colon are separated by `;` (lmms-eval splits model args at commas),
                     or quote the value: `schedule="dynamic:ratio=8,threshold=0.1"`
    x2l              `true` answers with Video-X2L (defaults), or its options as `vxl infer --x2l` takes
                     them, `;`-separated or quoted: `x2l="low=2,high=32,k=3,oracle=attention"`
    x2l_low, x2l_high, x2l_k, x2l_oracle, x2l_clip_dir, x2l_force_first, x2l_force_last, x2l_offload, x2l_seed
                     one X2L option each (and X2L on)
    dtype            float32 (default) or bfloat16
    max_new_tokens   when the task's generation_kwargs give none (default 64)
    seed             PRNG seed of sampling and random schedules (default 0)
    strict           `true`: a video that cannot be read stops the run; by default it is logged and that
                     request answers "" (scored wrong), so one broken file does not end a long benchmark
    compilation_cache  folder of the compilation caches, or `off`; by default the one `vxl` uses
                     ($VXL_COMPILATION_CACHE, else $JAX_COMPILATION_CACHE_DIR, else
                     ~/.cache/vxl_jax/jax_cache), so a second run neither traces nor compiles the model again

Requests (`generate_until`): each request's visual (a video path, an image path, a PIL image, or a list of
images / frame paths / a folder of frames, which become the frames of one clip) is encoded once, and every
question about the same file is answered on that encoding, several at a time (`--batch_size` questions per
batch, across videos too). gen_kwargs: `max_new_tokens`, `temperature` (0 or `do_sample: false`: greedy),
`top_p`, `until` (the text is cut at the first stop string); `num_beams` > 1 is not supported (greedy).
A single image (path or PIL) is read as `vxl infer` reads one: RGB, then tiled where the checkpoint's config
says anyres + unires with grid pinpoints (`vxl_jax/data/unires.py`), else one frame.
`loglikelihood` (tasks of output_type multiple_choice / loglikelihood) is not supported.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
from loguru import logger as eval_logger
from tqdm import tqdm

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

MODEL_ID = "vxl_jax"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
X2L_FIELDS = ("low", "high", "k", "oracle", "clip_dir", "force_first", "force_last", "offload", "seed")


def manifest():
    """The `lmms_eval.models` entry point: `--model vxl_jax` -> `VXLJax` (a `ModelManifest`).

    Imported here, not at the top: importing `lmms_eval.models` loads the entry points, this one included.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.VXLJax")


def _text_arg(value: Any) -> Optional[str]:
    """A model-arg string: quotes lmms-eval keeps are dropped, `;` stands for `,`; None/false/'' -> None."""
    if value is None or value is False:
        return None
    text = str(value).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1]
    text = text.replace(";", ",").strip()
    return text or None


def _x2l_text(x2l: Any, options: dict) -> Optional[str]:
    """The `vxl infer --x2l` option text from `x2l=` and `x2l_<field>=` model args; None: X2L off."""
    if isinstance(x2l, (int, float)) and not isinstance(x2l, bool):   # x2l=1 / x2l=0 arrive as numbers
        x2l = bool(x2l)
    if isinstance(x2l, str) and x2l.strip().lower() in ("false", "no", "0", "off", "none"):
        x2l = None
    if x2l is True or (isinstance(x2l, str) and x2l.strip().lower() in ("true", "yes", "1", "on")):
        text = ""
    else:
        text = _text_arg(x2l) if x2l is not None else None
    extra = [f"{k}={v}" for k, v in options.items()]
    if not extra:
        return text
    return ",".join(filter(None, [text, *extra]))


def parse_until(gen_kwargs: dict) -> list[str]:
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
        raise ValueError(f"gen_kwargs['until'] is a string or a list of strings, got {until!r}")
    return [u for u in until if u]


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = min((i for i in (text.find(u) for u in until) if i >= 0), default=len(text))
    return text[:cut]


def _flatten(visuals) -> list:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [v for item in visuals for v in _flatten(item)]
    return [visuals]


def _is_image_path(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _rgb_u8(image) -> np.ndarray:
    """uint8 [H, W, 3] of a PIL image or an array ([H, W], [H, W, 3|4], float in 0..1 or 0..255)."""
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"), np.uint8)
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"an image array is [H, W] or [H, W, 3|4], got {a.shape}")
    a = a[..., :3]
    if a.dtype != np.uint8:
        a = np.clip(a * 255.0 if a.max() <= 1.0 else a, 0, 255).astype(np.uint8)
    return a


def stack_images(images: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 [N, H, W, 3]: images of another size than the first are resized to it (bilinear)."""
    h, w = images[0].shape[:2]
    out = []
    for im in images:
        if im.shape[:2] != (h, w):
            from PIL import Image
            im = np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR))
        out.append(im)
    return np.stack(out)


def _load_answerer(pretrained: str, dtype: str, progress):
    import jax.numpy as jnp

    from vxl_jax.infer import Answerer

    return Answerer.load(pretrained, dtype=getattr(jnp, dtype), progress=progress)


class VXLJax(lmms):
    """lmms-eval's `vxl_jax` model: `vxl_jax.infer.Answerer` behind `generate_until`."""

    is_simple = True

    def __init__(self, pretrained: Optional[str] = None, max_frames_num: int = 32, fps: Optional[float] = None,
                 ratio: Any = 8, schedule: Optional[str] = None, x2l: Any = None, dtype: str = "float32",
                 max_new_tokens: int = 64, seed: int = 0, strict: bool = False, compilation_cache: Any = None,
                 batch_size: Any = 1, max_batch_size: Any = None, device: Optional[str] = None, **kwargs) -> None:
        super().__init__()
        x2l_options = {k[4:]: kwargs.pop(k) for k in list(kwargs) if k.startswith("x2l_") and k[4:] in X2L_FIELDS}
        if kwargs:
            raise ValueError(f"vxl_jax: unknown model args {sorted(kwargs)}; it takes pretrained, max_frames_num, "
                             f"fps, ratio, schedule, x2l, {', '.join('x2l_' + f for f in X2L_FIELDS)}, dtype, "
                             "max_new_tokens, seed, strict, compilation_cache")
        if not pretrained:
            raise ValueError("vxl_jax needs pretrained=<checkpoint folder> in --model_args")
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"vxl_jax: dtype is float32 or bfloat16, got {dtype!r}")
        if str(batch_size).startswith("auto"):
            raise ValueError("vxl_jax: give --batch_size as a number of questions per batch (no 'auto')")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"vxl_jax: --batch_size must be >= 1, got {batch_size}")
        if device is not None and str(device).startswith("cpu"):
            import jax
            jax.config.update("jax_platforms", "cpu")

        import argparse

        from vxl_jax.cli.infer import _ratio, answer_options
        from vxl_jax.cli.util import resolve_compilation_cache, use_compilation_cache
        from vxl_jax.data import video

        if int(max_frames_num) < 1:
            raise ValueError(f"vxl_jax: max_frames_num must be >= 1, got {max_frames_num}")
        self.max_frames_num = int(max_frames_num)
        self.sampling = video.by_fps(float(fps), self.max_frames_num) if fps else video.uniform(self.max_frames_num)
        # The same flags -> options path as `vxl infer` (validation and messages included).
        options = answer_options(argparse.Namespace(
            ratio=_ratio(str(ratio)), schedule=_text_arg(schedule), x2l=_x2l_text(x2l, x2l_options),
            max_new_tokens=int(max_new_tokens), temperature=0.0, top_p=1.0, seed=int(seed)))
        self.max_new_tokens = options.pop("max_new_tokens")
        options.pop("decoding")
        self.seed = options["seed"]
        self.encode_options = options            # ratio, schedule, x2l, seed
        self.strict = bool(strict)
        self._failures = 0
        self.model_args = dict(pretrained=pretrained, max_frames_num=self.max_frames_num, fps=fps, ratio=ratio,
                               schedule=_text_arg(schedule), x2l=_x2l_text(x2l, x2l_options), dtype=dtype)

        # As the CLI does, for as long as the process runs (`restore_compilation_cache()` puts the settings back).
        self.compilation_cache, self.restore_compilation_cache = use_compilation_cache(
            resolve_compilation_cache("off" if compilation_cache is False else _text_arg(compilation_cache)))
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.answerer = _load_answerer(pretrained, dtype, self._progress)
        eval_logger.info(f"vxl_jax: {pretrained} ({dtype}), {self.sampling}, options {self.model_args}")

    # -- lmms interface ------------------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def loglikelihood(self, requests: List[Instance]) -> List[Tuple[float, bool]]:
        raise NotImplementedError("vxl_jax only generates text (generate_until); tasks scored by loglikelihood "
                                  "(output_type: multiple_choice or loglikelihood) are not supported")

    def generate_until_multi_round(self, requests) -> List[str]:
        raise NotImplementedError("vxl_jax does not support multi-round generation (generate_until_multi_round)")

    def generate_until(self, requests: List[Instance]) -> List[str]:
        start = time.perf_counter()
        results: list[Optional[str]] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=(self.rank != 0), desc="Model Responding")
        # Requests by visual, in first-seen order: a file is keyed by its path (every question about it shares
        # one encoding); in-memory images by their document.
        groups: "OrderedDict[tuple, dict]" = OrderedDict()
        for i, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen_kwargs = dict(gen_kwargs or {})
            try:
                visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))
            except Exception as e:
                self._failed(f"{task}/{split}/{doc_id}: doc_to_visual failed", e)
                self._done(results, pbar, [(i, context, gen_kwargs, "")], failed=True)
                continue
            if visuals and all(isinstance(v, (str, os.PathLike)) for v in visuals):
                key = ("paths", *(os.path.abspath(os.fspath(v)) for v in visuals))
            else:
                key = ("doc", task, split, doc_id)
            group = groups.setdefault(key, {"visuals": visuals, "items": []})
            group["items"].append((i, context, gen_kwargs))

        # `batch_size` visuals are encoded together, then their questions answered `batch_size` at a time
        # (questions about visuals encoded together decode as one batch).
        ordered, encoded_count = list(groups.values()), 0
        for c in range(0, len(ordered), self.batch_size):
            chunk = ordered[c:c + self.batch_size]
            encodings = self._encode_chunk(chunk)
            pending: dict[tuple, list] = {}   # decoding settings -> [(index, encoding, question, gen_kwargs)]
            for group, encoded in zip(chunk, encodings):
                if encoded is None:
                    self._done(results, pbar, [(i, q, g, "") for i, q, g in group["items"]], failed=True)
                    continue
                encoded_count += 1
                for i, context, gen_kwargs in group["items"]:
                    pending.setdefault(self._settings(gen_kwargs), []).append((i, encoded, context, gen_kwargs))
            for settings, items in pending.items():
                for b in range(0, len(items), self.batch_size):
                    self._answer_batch(settings, items[b:b + self.batch_size], results, pbar)
        pbar.close()
        eval_logger.info(f"vxl_jax: {len(requests)} requests about {len(groups)} visuals ({encoded_count} encoded) "
                         f"in {time.perf_counter() - start:.1f} s")
        if self._failures:
            eval_logger.warning(f"vxl_jax: {self._failures} of {len(requests)} requests answered '' after errors "
                                "(logged above; strict=true stops at the first)")
            self._failures = 0
        return [r if r is not None else "" for r in results]

    # -- internals -----------------------------------------------------------------------------------------------

    def _progress(self, message: str) -> None:
        eval_logger.debug(f"[vxl_jax] {message}")

    def _failed(self, what: str, error: Exception) -> None:
        if self.strict:
            raise error
        eval_logger.error(f"vxl_jax: {what}: {type(error).__name__}: {error}; answering '' (strict=true stops here)")

    @staticmethod
    def _describe(visuals: list) -> str:
        if visuals and all(isinstance(v, (str, os.PathLike)) for v in visuals):
            return ", ".join(map(os.fspath, visuals[:3])) + (" ..." if len(visuals) > 3 else "")
        return f"{len(visuals)} in-memory visual(s)"

    def _settings(self, gen_kwargs: dict) -> tuple:
        """(max_new_tokens, temperature, top_p) of a request; temperature 0 is greedy."""
        max_new = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        if gen_kwargs.get("do_sample") is False:
            temperature = 0.0
        top_p = float(gen_kwargs.get("top_p") or 1.0) if temperature > 0 else 1.0
        if int(gen_kwargs.get("num_beams") or 1) > 1:
            eval_logger.warning("vxl_jax: num_beams > 1 is not supported; decoding without beams")
        if max_new < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
        return max_new, temperature, top_p

    def _frames(self, visuals: list):
        """A video path (read by the answerer with the sampling), one image (a `video.Clip` marked as an image:
        the answerer tiles it where the checkpoint says anyres + unires, as `vxl infer` does), or uint8 frames
        [F, H, W, 3] (several images, a folder of frames)."""
        from vxl_jax.data import records, video

        if not visuals:
            raise ValueError("the request has no video or image (vxl_jax answers about visual inputs only)")
        if len(visuals) == 1 and isinstance(visuals[0], (str, os.PathLike)):
            path = os.fspath(visuals[0])
            if os.path.isdir(path):   # a folder of frames
                names = sorted(n for n in os.listdir(path) if _is_image_path(n))
                if not names:
                    raise video.VideoError(path, "a folder without image files")
                visuals = [os.path.join(path, n) for n in names]
            elif not _is_image_path(path):
                return path
            else:   # decoded as `vxl infer` decodes an image (Pillow, RGB)
                clip = video.read_image(path) if os.path.isfile(path) else None
                if clip is None:
                    raise video.VideoError(path, "no such file" if not os.path.exists(path) else "not an image")
                return clip
        if len(visuals) == 1 and not isinstance(visuals[0], dict):   # an in-memory image (PIL or array)
            return video.image_clip(_rgb_u8(visuals[0]), "<in-memory image>")
        images = []
        for v in visuals:
            if isinstance(v, (str, os.PathLike)):
                if not _is_image_path(os.fspath(v)):
                    raise ValueError(f"one video per request, not a list with {os.fspath(v)} among "
                                     f"{len(visuals)} visuals")
                images.append(records.read_image(os.fspath(v)))
            elif isinstance(v, dict):
                raise ValueError(f"unsupported visual (a dict with keys {sorted(v)[:5]}; audio?)")
            else:
                images.append(_rgb_u8(v))
        if len(images) > self.max_frames_num:   # a long list of frames: spread max_frames_num over it
            images = [images[j] for j in video.uniform_indices(len(images), self.max_frames_num)]
        return stack_images(images)

    def _encode_chunk(self, groups: list) -> list:
        """One encoding per group (None where its visual cannot be read or encoded), in one batched encode."""
        sources: list = [None] * len(groups)
        for j, group in enumerate(groups):
            try:
                sources[j] = self._frames(group["visuals"])
            except Exception as e:
                self._failed(f"cannot read {self._describe(group['visuals'])}", e)
        live = [j for j, s in enumerate(sources) if s is not None]
        out: list = [None] * len(groups)
        if not live:
            return out
        try:
            for j, enc in zip(live, self._encode_many([sources[j] for j in live])):
                out[j] = enc
        except Exception as e:
            if len(live) == 1:
                self._failed(f"cannot encode {self._describe(groups[live[0]]['visuals'])}", e)
                return out
            for j in live:   # one at a time, so one bad video loses only its own questions
                try:
                    out[j] = self._encode_many([sources[j]])[0]
                except Exception as e1:
                    self._failed(f"cannot encode {self._describe(groups[j]['visuals'])}", e1)
        return out

    def _encode_many(self, sources: list) -> list:
        return self.answerer.encode_many(sources, sampling=self.sampling, progress=self._progress,
                                         **self.encode_options)

    def _answer_batch(self, settings: tuple, batch: list, results: list, pbar) -> None:
        from vxl_jax.generate import Sampling

        max_new, temperature, top_p = settings
        try:
            answers = self.answerer.answer([(enc, q) for _, enc, q, _ in batch], max_new_tokens=max_new,
                                           decoding=Sampling(temperature=temperature, top_p=top_p), seed=self.seed,
                                           progress=self._progress)
            texts = [cut_at_stop(a.text, parse_until(g)) for a, (_, _, _, g) in zip(answers, batch)]
        except Exception as e:
            self._failed(f"answering {len(batch)} question(s) failed", e)
            self._done(results, pbar, [(i, q, g, "") for i, _, q, g in batch], failed=True)
            return
        self._done(results, pbar, [(i, q, g, t) for (i, _, q, g), t in zip(batch, texts)])

    def _done(self, results: list, pbar, items: list, failed: bool = False) -> None:
        self._failures += len(items) if failed else 0
        for i, question, gen_kwargs, text in items:
            results[i] = text
            self.cache_hook.add_partial("generate_until", (question, gen_kwargs), text)
        pbar.update(len(items))
