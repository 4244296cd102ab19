"""The training loader: LLaVA annotations -> fixed-shape batches, on grain.

    cfg = LoaderConfig(annotations="train.jsonl", media_root="media/", tokenizer="ckpt/",
                       frames=40, batch_size=4, curriculum=curriculum.paper(stage1_steps=2000))
    it = iter(build_dataset(cfg))
    batch = next(it)            # dict of numpy arrays, see `collate`
    it.metrics()                # records seen, batches, skipped records by reason

The pipeline, per JAX process:

    source -> shuffle(seed) -> repeat(epochs) -> [process::processes] -> read + preprocess + tokenize
           -> (worker processes) -> skip and count bad records -> batch to a size bucket + ratios

Reading, preprocessing and tokenizing run in grain worker processes when
`num_workers > 0`. Bad records (unreadable media, a missing or extra `<image>`,
text longer than the largest bucket, nothing to learn, no reply text left
after truncation) come out of the
workers as `Skipped` values and are counted in the main process, so the
counts are exact whatever the worker count; nothing is swapped for another
record. The curriculum's ratios are assigned when a batch is formed, from
(seed, step, record index), and the step count and skip counts are part of
the iterator state, so a run restored from a checkpoint sees exactly the
batches, ratios and counts it would have seen.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
from typing import Any, Optional

import grain
import numpy as np

from vxl_jax.config import ImageConfig
from vxl_jax.data import curriculum as curriculum_lib
from vxl_jax.data import preprocess, prompts, records, unires, video

log = logging.getLogger(__name__)

SKIP_REASONS = ("unreadable_media", "placeholder", "too_long", "bad_conversation", "no_labels", "empty_text")


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    annotations: str                       # JSON list or JSONL of LLaVA records
    tokenizer: str                         # a checkpoint dir holding the tokenizer files
    media_root: str = ""
    frames: Optional[int] = 32             # uniform frames per video, or None to sample by fps
    fps: Optional[float] = None
    max_frames: Optional[int] = None       # cap for fps sampling (and for image lists)
    image_size: int = 336
    image: ImageConfig = ImageConfig()     # the model's image settings: anyres + unires tiles images
    tokens_per_frame: int = 144
    window: int = 1440                     # visual tokens per compression window
    frame_buckets: tuple[int, ...] = (10, 20, 40, 80, 160, 320)
    text_buckets: tuple[int, ...] = (128, 256, 512, 1024, 2048)
    batch_size: int = 1
    drop_remainder: bool = True
    seed: int = 0
    shuffle: bool = True
    group_by_modality_length: bool = False  # the authors' grouping of batches by modality and length
    num_epochs: Optional[int] = None       # None repeats forever
    num_workers: int = 0
    worker_buffer_size: int = 2
    label_mode: prompts.LabelMode = "original"
    placeholder_newline: prompts.PlaceholderNewline = "double"  # "double": the original's training ids (prompts.py)
    text_overflow: str = "skip"            # text over the largest bucket: "skip" the record, or "truncate" it
    system: str = prompts.SYSTEM_MESSAGE
    curriculum: curriculum_lib.Curriculum = curriculum_lib.fixed(8)
    shard_index: Optional[int] = None      # None: jax.process_index()
    shard_count: Optional[int] = None      # None: jax.process_count()

    def __post_init__(self):
        per_window = self.window / self.tokens_per_frame
        if per_window != int(per_window):
            raise ValueError(f"a window of {self.window} tokens is not whole frames of {self.tokens_per_frame}")
        bad = [b for b in self.frame_buckets if b < 1 or b % int(per_window)]
        if bad or list(self.frame_buckets) != sorted(set(self.frame_buckets)):
            raise ValueError(f"frame buckets must increase and be multiples of {int(per_window)} frames (one "
                             f"window), got {self.frame_buckets}")
        if not self.text_buckets or list(self.text_buckets) != sorted(set(self.text_buckets)):
            raise ValueError(f"text buckets must increase, got {self.text_buckets}")
        most = self.frames if self.frames is not None else self.max_frames
        if most is None or most > self.frame_buckets[-1]:
            raise ValueError(f"at most {most} frames per video but the largest frame bucket is "
                             f"{self.frame_buckets[-1]}")
        video.Sampling(frames=self.frames, fps=self.fps, max_frames=self.max_frames)  # validates the pair
        if self.text_overflow not in ("skip", "truncate"):
            raise ValueError(f"text_overflow is 'skip' or 'truncate', got {self.text_overflow!r}")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError(f"batch_size >= 1 and num_workers >= 0, got {self.batch_size}, {self.num_workers}")

    @property
    def sampling(self) -> video.Sampling:
        return video.Sampling(frames=self.frames, fps=self.fps, max_frames=self.max_frames)

    @property
    def max_images(self) -> int:
        return self.frames or self.max_frames


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A record the loader could not use, and why (travels from the workers to be counted)."""
    index: int
    reason: str      # one of SKIP_REASONS
    detail: str


class RecordTransform:
    """record -> example dict (or Skipped): read + sample frames, crop to CLIP's size, tokenize with labels."""

    def __init__(self, cfg: LoaderConfig):
        self.cfg = cfg
        self._tokenizer = self._chat = None  # loaded lazily, once per worker process
        # grain maps with a thread pool; HF fast tokenizers are not safe to share across threads.
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"cfg": self.cfg}

    def __setstate__(self, state):
        self.__init__(state["cfg"])

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = prompts.load_tokenizer(self.cfg.tokenizer)
                self._chat = prompts.ChatTokens.of(self._tokenizer)
        return self._tokenizer

    def _encode(self, conversations):
        tokenizer = self.tokenizer
        with self._lock:
            return prompts.encode_conversation(tokenizer, conversations, system=self.cfg.system,
                                               label_mode=self.cfg.label_mode, chat=self._chat,
                                               placeholder_newline=self.cfg.placeholder_newline)

    def __call__(self, record: dict):
        index = int(record["index"])
        cfg = self.cfg
        try:
            encoded = self._encode(record.get("conversations") or [])
        except (prompts.PromptError, AttributeError, TypeError) as e:
            return Skipped(index, "bad_conversation", str(e))
        kind = records.media_kind(record)
        want = 0 if kind == "text" else 1
        if kind == "image" and encoded.num_images > 1:
            # One placeholder per image (LLaVA multi-image): adjacent ones are one visual span, the images'
            # tokens one after the other, as the original places them; text between them is not supported.
            n = len(record["image"]) if isinstance(record["image"], list) else 1
            merged = _merge_adjacent_placeholders(encoded)
            if merged is None or encoded.num_images != n:
                return Skipped(index, "placeholder", f"{encoded.num_images} <image> placeholders for {n} images: "
                                                     "one placeholder for all of them, or one each, adjacent (text "
                                                     "between images is not supported)")
            encoded = merged
        if encoded.num_images != want:
            return Skipped(index, "placeholder", f"{kind} record with {encoded.num_images} <image> placeholders, "
                                                 f"expected {want}")
        if len(encoded.input_ids) > cfg.text_buckets[-1]:
            if cfg.text_overflow == "skip":
                return Skipped(index, "too_long", f"{len(encoded.input_ids)} text tokens, the largest bucket holds "
                                                  f"{cfg.text_buckets[-1]}")
            encoded = encoded.truncated(cfg.text_buckets[-1])
            # What is left must still hold the video and some reply text to learn (an empty reply that was
            # written so is kept: the original trains on its <|im_end|>).
            if encoded.num_images != want or not encoded.reply.any() or (
                    want and encoded.input_ids[-1] == prompts.IMAGE_TOKEN_INDEX):
                return Skipped(index, "empty_text", f"no reply text left after truncation to "
                                                    f"{cfg.text_buckets[-1]} tokens")
        if not (encoded.labels != prompts.IGNORE_INDEX).any():
            return Skipped(index, "no_labels", "no token carries a label")
        try:
            frames = self._frames(record, kind)
        except (ValueError, OSError) as e:  # VideoError is a ValueError; its message names the file
            return Skipped(index, "unreadable_media", str(e))
        if len(frames) > cfg.max_images:
            return Skipped(index, "too_long", f"{len(frames)} frames (images or their tiles), at most "
                                              f"{cfg.max_images}")
        return {"input_ids": encoded.input_ids.astype(np.int32), "labels": encoded.labels.astype(np.int32),
                "frames": frames, "index": index}


    def _frames(self, record: dict, kind: str) -> np.ndarray:
        """uint8 [F, 3, S, S]: the video's sampled frames, or each image's frames (its tiles under anyres + unires,
        `unires.frames_for`) one image after the other; none for a text record."""
        cfg = self.cfg
        if kind == "text":
            return np.zeros((0, 3, cfg.image_size, cfg.image_size), np.uint8)
        if kind == "video":
            return preprocess.crop_frames_u8(records.read_video(record, cfg.media_root, cfg.sampling), cfg.image_size)
        frames = [preprocess.crop_frames_u8(unires.frames_for(image, cfg.image, cfg.image_size), cfg.image_size)
                  for image in records.read_images(record, cfg.media_root)]
        return np.concatenate(frames)


def _merge_adjacent_placeholders(encoded: prompts.Encoded) -> Optional[prompts.Encoded]:
    """The encoding with a run of adjacent placeholders as one (None when text separates them)."""
    where = np.flatnonzero(encoded.input_ids == prompts.IMAGE_TOKEN_INDEX)
    if (np.diff(where) != 1).any():
        return None
    keep = np.ones(len(encoded.input_ids), bool)
    keep[where[1:]] = False
    return prompts.Encoded(encoded.input_ids[keep], encoded.labels[keep],
                           None if encoded.reply is None else encoded.reply[keep])


def _bucket(n: int, buckets) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def collate(rows: list[dict], cfg: LoaderConfig, step: int, pad_id: int) -> dict:
    """Pads examples to the batch's size bucket and assigns the curriculum's ratios.

    input_ids / labels int32 [B, T] (aligned, labels not shifted; -200 marks the video; pad_id / -100
    after the text), text_mask bool [B, T]; frames uint8 [B, F, 3, S, S], frame_mask bool [B, F],
    num_frames int32 [B]; ratios int32 [B, F * tokens_per_frame / window] (0 for windows past a row's
    video); index int64 [B] (the record); step int64 [].
    """
    size = cfg.image_size
    t = _bucket(max(len(r["input_ids"]) for r in rows), cfg.text_buckets)
    most = max(len(r["frames"]) for r in rows)
    f = _bucket(most, cfg.frame_buckets) if most else 0
    w = math.ceil(f * cfg.tokens_per_frame / cfg.window)
    b = len(rows)
    out = {"input_ids": np.full((b, t), pad_id, np.int32), "labels": np.full((b, t), prompts.IGNORE_INDEX, np.int32),
           "text_mask": np.zeros((b, t), bool), "frames": np.zeros((b, f, 3, size, size), np.uint8),
           "frame_mask": np.zeros((b, f), bool), "num_frames": np.zeros((b,), np.int32),
           "ratios": np.zeros((b, w), np.int32), "index": np.zeros((b,), np.int64),
           "step": np.asarray(step, np.int64)}
    for i, r in enumerate(rows):
        n, m = len(r["input_ids"]), len(r["frames"])
        out["input_ids"][i, :n], out["labels"][i, :n], out["text_mask"][i, :n] = r["input_ids"], r["labels"], True
        out["frames"][i, :m], out["frame_mask"][i, :m], out["num_frames"][i] = r["frames"], True, m
        windows = math.ceil(m * cfg.tokens_per_frame / cfg.window)
        out["ratios"][i, :windows] = cfg.curriculum.ratios(step, r["index"], windows)
        out["index"][i] = r["index"]
    return out


class BatchIterator(grain.DatasetIterator):
    """Pulls examples, counts and drops Skipped ones, and batches the rest (state: parent, step, counts)."""

    def __init__(self, parent, cfg: LoaderConfig, pad_id: int):
        super().__init__(parent)
        self.cfg, self.pad_id = cfg, pad_id
        self.step = 0
        self.records_seen = 0
        self.skipped = collections.Counter()
        self.skipped_records: list[Skipped] = []   # this session's skips, in order (not checkpointed)

    def __next__(self) -> dict:
        rows = []
        while len(rows) < self.cfg.batch_size:
            try:
                element = next(self._parent)
            except StopIteration:
                if rows and not self.cfg.drop_remainder:
                    break
                raise
            self.records_seen += 1
            if isinstance(element, Skipped):
                self.skipped[element.reason] += 1
                self.skipped_records.append(element)
                log.warning("skipped record %d (%s): %s", element.index, element.reason, element.detail)
                continue
            rows.append(element)
        batch = collate(rows, self.cfg, self.step, self.pad_id)
        self.step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "step": self.step, "records_seen": self.records_seen,
                "skipped": {k: int(self.skipped.get(k, 0)) for k in SKIP_REASONS}}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.step, self.records_seen = int(state["step"]), int(state["records_seen"])
        self.skipped = collections.Counter({k: int(v) for k, v in state["skipped"].items() if v})
        self.skipped_records = []

    def metrics(self) -> dict[str, int]:
        """Counters to log: batches, records seen, records skipped (total and by reason)."""
        out = {"data/batches": self.step, "data/records_seen": self.records_seen,
               "data/records_skipped": sum(self.skipped.values())}
        out.update({f"data/skipped_{k}": int(self.skipped.get(k, 0)) for k in SKIP_REASONS})
        return out


class Batches(grain.IterDataset):
    """The batching stage on top of the per-record pipeline (see the module docstring)."""

    def __init__(self, parent, cfg: LoaderConfig, pad_id: int):
        super().__init__(parent)
        self.cfg, self.pad_id = cfg, pad_id

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self._parent.__iter__(), self.cfg, self.pad_id)

    def __str__(self) -> str:
        return f"Batches(batch_size={self.cfg.batch_size})"


def modality_length(record: dict) -> tuple[str, int]:
    """(media kind, words in the conversation): what the authors' grouping sorts by (their `modality_lengths`)."""
    words = sum(len(str(turn.get("value") or "").split()) for turn in record.get("conversations") or []
                if isinstance(turn, dict))
    return records.media_kind(record), words


class GroupedByModalityLength(grain.MapDataset):
    """The record order of the authors' `group_by_modality_length`, per epoch, over a repeated source.

    Each epoch: the records of each media kind (video, image, text; the authors split media from text only,
    and the kinds also differ in frame counts here) are shuffled and cut into megabatches of a global batch,
    each sorted by conversation length, longest first; the full megabatches of every kind are shuffled
    together and the partial ones go last, as one. A global batch is then one kind of similar lengths (up to
    skipped records), so it pads less and keeps to fewer buckets. Pure function of (seed, epoch).
    """

    def __init__(self, parent: grain.MapDataset, source: records.AnnotationSource, *, megabatch: int, seed: int,
                 shuffle: bool = True):
        super().__init__(parent)
        self._n = len(source)
        info = [modality_length(source[i]) for i in range(self._n)]
        self._kinds = np.asarray([("video", "image", "text").index(k) for k, _ in info])
        self._lengths = np.asarray([n for _, n in info])
        self._megabatch, self._seed, self._shuffle = max(1, megabatch), seed, shuffle
        self._cached: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return "GroupedByModalityLength"

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's record indices, in order."""
        if self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.Generator(np.random.Philox(key=curriculum_lib._key128([self._seed, 3, epoch, 0])))
        full, partial = [], []
        for kind in range(3):
            idx = np.flatnonzero(self._kinds == kind)
            idx = rng.permutation(idx) if self._shuffle else idx
            for start in range(0, len(idx), self._megabatch):
                chunk = idx[start:start + self._megabatch]
                chunk = chunk[np.argsort(-self._lengths[chunk], kind="stable")]
                (full if len(chunk) == self._megabatch else partial).append(chunk)
        if self._shuffle and full:
            full = [full[i] for i in rng.permutation(len(full))]
        out = np.concatenate(full + partial) if full or partial else np.zeros(0, np.int64)
        self._cached = (epoch, out)
        return out

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, j = divmod(int(index), self._n)
        return self._parent[epoch * self._n + int(self.order(epoch)[j])]


def build_dataset(cfg: LoaderConfig):
    """The grain IterDataset of training batches for this JAX process (iterate it for batches)."""
    index, count = cfg.shard_index, cfg.shard_count
    if index is None or count is None:
        import jax
        index, count = jax.process_index(), jax.process_count()
    if not 0 <= index < count:
        raise ValueError(f"shard {index} of {count}")
    source = records.AnnotationSource(cfg.annotations)
    if len(source) == 0:
        raise ValueError(f"{cfg.annotations} holds no records")
    ds = grain.MapDataset.source(source)
    if cfg.group_by_modality_length:
        ds = GroupedByModalityLength(ds.repeat(cfg.num_epochs), source, megabatch=cfg.batch_size * count,
                                     seed=cfg.seed, shuffle=cfg.shuffle)
    else:
        if cfg.shuffle:
            ds = ds.shuffle(seed=cfg.seed)
        ds = ds.repeat(cfg.num_epochs)
    ds = ds[index::count]
    transform = RecordTransform(cfg)
    ds = ds.map(transform).to_iter_dataset()
    if cfg.num_workers > 0:
        _absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                         per_worker_buffer_size=cfg.worker_buffer_size))
    pad_id = transform.tokenizer.pad_token_id
    return Batches(ds, cfg, 0 if pad_id is None else int(pad_id))


def _absl_flags_parsed() -> None:
    # grain's worker processes read absl flags; unparsed flags make them fail (grain issue 1355).
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# ------------------------------------------------------------------ checkpoints

def checkpoint_manager(directory: str, **options):
    """An orbax CheckpointManager with a "data" item saved by grain's handler (one JSON per process)."""
    import orbax.checkpoint as ocp
    return ocp.CheckpointManager(directory, item_names=("data",),
                                 item_handlers={"data": grain.checkpoint.CheckpointHandler()},
                                 options=ocp.CheckpointManagerOptions(**options))


def save_state(manager, step: int, iterator) -> None:
    import orbax.checkpoint as ocp
    manager.save(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()


def restore_state(manager, iterator, step: Optional[int] = None):
    """Restores `iterator` (a fresh one from the same config) to `step` (default: the latest saved)."""
    import orbax.checkpoint as ocp
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no data checkpoint in {manager.directory}")
    manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator)))
    return iterator
