"""The optimizer: AdamW with warmup + cosine, per-parameter-group freezing, lr scales and weight decay.

Video-XL trains in stages that differ only in *which* parameters move and how fast
(projector-only pretraining, then full fine-tuning with a slower vision tower), so the
stage is data: an `OptimConfig` with an ordered list of `ParamGroup`s, each a regex over
a parameter's "/"-joined path ("projector/fc1/kernel", "llm/layers/vst_q_proj/bias").
The first matching group wins; unmatched parameters fall into a default group
(trainable, lr scale 1, the config's weight decay).

`build` returns one optax transformation:

    clip_and_zero   frozen gradients -> 0, then clip by global norm; the norm therefore
                    covers only the trainable gradients (frozen ones are zero by then)
    partition       label "g<i>" per trainable group: AdamW(lr = schedule * lr_scale)
                    label "frozen": set_to_zero, so frozen params get exactly 0 and no Adam state

Weight decay follows the HF Trainer convention of never decaying biases or norm weights.
HF decides by name, and so do we (`decay_mask`): a leaf called "bias" or "scale" is not
decayed, everything else (kernels, embeddings, lm_head, vst_embed, CLIP's class_embed) is.
An `ndim >= 2` rule would be wrong here: transformer layers are stacked on a leading
layer axis, so `llm/layers/input_norm/scale` is [L, D] and the biases are [L, H, Dh].

Config mistakes fail loudly before any step: a pattern that does not compile (or compiles
with a warning), a group that matches no parameter (almost always a typo), or a group
whose every match is taken by an earlier group (dead, order mistake) is a ValueError.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

# Leaf names never decayed (HF: "bias" and LayerNorm/RMSNorm weights, which we call "scale").
NO_DECAY_LEAVES = frozenset({"bias", "scale"})
FROZEN_LABEL = "frozen"


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    pattern: str                            # regex, re.search on the "/"-joined path
    trainable: bool = True                  # False: zero updates, no optimizer state
    lr_scale: float = 1.0                   # multiplies the schedule's learning rate
    weight_decay: Optional[float] = None    # None: OptimConfig.weight_decay


_DEFAULT_GROUP = ParamGroup("(default)")    # what unmatched parameters get; never matched by regex


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-5             # peak
    warmup_steps: int = 0                   # linear from 0 to peak
    decay_steps: Optional[int] = None       # cosine peak -> end after warmup; None: max_steps - warmup_steps
    end_lr_ratio: float = 0.0               # final lr = peak * end_lr_ratio
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: Optional[float] = 1.0        # global norm over the trainable gradients; None: off
    groups: tuple[ParamGroup, ...] = ()     # first matching pattern wins

    def __post_init__(self) -> None:
        # Accept any sequence (e.g. a list from code) but store a tuple so the config stays hashable.
        object.__setattr__(self, "groups", tuple(self.groups))
        problems = []
        if self.learning_rate < 0:
            problems.append(f"learning_rate must be >= 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_steps is not None and self.decay_steps < 1:
            problems.append(f"decay_steps must be >= 1, got {self.decay_steps}")
        if not 0.0 <= self.end_lr_ratio <= 1.0:
            problems.append(f"end_lr_ratio must be in [0, 1], got {self.end_lr_ratio}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            problems.append(f"clip_norm must be > 0 or None, got {self.clip_norm}")
        for i, g in enumerate(self.groups):
            if not isinstance(g, ParamGroup):
                problems.append(f"groups[{i}] is a {type(g).__name__}, not a ParamGroup")
            elif g.lr_scale < 0:
                problems.append(f"groups[{i}] ({g.pattern!r}): lr_scale must be >= 0, got {g.lr_scale}")
        if problems:
            raise ValueError("invalid OptimConfig: " + "; ".join(problems))
        _compile_patterns(self.groups)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OptimConfig:
        """From JSON-style data; `groups` is a list of dicts. Unknown keys are a ValueError."""
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown OptimConfig keys: {unknown}")
        kwargs = dict(d)
        group_keys = {f.name for f in dataclasses.fields(ParamGroup)}
        groups = []
        for i, g in enumerate(kwargs.get("groups", ())):
            if isinstance(g, ParamGroup):
                groups.append(g)
                continue
            bad = sorted(set(g) - group_keys)
            if bad:
                raise ValueError(f"unknown ParamGroup keys in groups[{i}]: {bad}")
            groups.append(ParamGroup(**g))
        kwargs["groups"] = tuple(groups)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready inverse of `from_dict`."""
        d = dataclasses.asdict(self)
        d["groups"] = [dataclasses.asdict(g) for g in self.groups]
        return d


def _compile_patterns(groups: Sequence[ParamGroup]) -> list[re.Pattern]:
    """Compiles every pattern, reporting all bad ones at once; a compile warning counts as bad
    (e.g. FutureWarning "possible nested set" for "[[": the regex likely does not mean what it says)."""
    compiled, bad = [], []
    for i, g in enumerate(groups):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                compiled.append(re.compile(g.pattern))
        except (re.error, TypeError, Warning) as e:
            bad.append(f"groups[{i}] {g.pattern!r}: {e}")
    if bad:
        raise ValueError("bad ParamGroup patterns:\n  " + "\n  ".join(bad))
    return compiled


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):            # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_names(params: PyTree) -> PyTree:
    """The "/"-joined path of every leaf, same structure as `params`."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "/".join(_key_name(k) for k in path), params)


def group_of(cfg: OptimConfig, params: PyTree) -> PyTree:
    """Index into `cfg.groups` of each leaf's group (first match), `len(cfg.groups)` for the default.

    ValueError if a group matches no parameter, or only parameters that earlier groups already took.
    """
    patterns = _compile_patterns(cfg.groups)
    names, treedef = jax.tree_util.tree_flatten(param_names(params))
    matched, won = [0] * len(patterns), [0] * len(patterns)
    index = []
    for name in names:
        hits = [i for i, p in enumerate(patterns) if p.search(name)]
        for i in hits:
            matched[i] += 1
        if hits:
            won[hits[0]] += 1
        index.append(hits[0] if hits else len(patterns))
    unmatched = [g.pattern for g, m in zip(cfg.groups, matched) if not m]
    shadowed = [g.pattern for g, m, w in zip(cfg.groups, matched, won) if m and not w]
    problems = []
    if unmatched:
        problems.append(f"ParamGroup patterns matching no parameter (typo?): {unmatched}")
    if shadowed:
        problems.append(f"ParamGroup patterns whose every match is taken by an earlier group: {shadowed}")
    if problems:
        raise ValueError("; ".join(problems))
    return jax.tree_util.tree_unflatten(treedef, index)


def _group(cfg: OptimConfig, index: int) -> ParamGroup:
    return cfg.groups[index] if index < len(cfg.groups) else _DEFAULT_GROUP


def _labels(cfg: OptimConfig, groups: PyTree) -> PyTree:
    # optax.partition needs hashable labels with one transform each; all frozen groups share one.
    return jax.tree.map(lambda i: f"g{i}" if _group(cfg, i).trainable else FROZEN_LABEL, groups)


def trainable_mask(cfg: OptimConfig, params: PyTree) -> PyTree:
    """True where the leaf's group is trainable."""
    return jax.tree.map(lambda i: _group(cfg, i).trainable, group_of(cfg, params))


def decay_mask(params: PyTree) -> PyTree:
    """True where weight decay applies: every leaf except biases and norm scales (by name, see module doc)."""
    return jax.tree.map(lambda name: name.rsplit("/", 1)[-1] not in NO_DECAY_LEAVES, param_names(params))


def lr_schedule(cfg: OptimConfig, max_steps: int) -> optax.Schedule:
    """0 -> peak linearly over `warmup_steps`, then cosine peak -> peak * end_lr_ratio over the
    decay steps, then constant. Same curve as HF's `get_cosine_schedule_with_warmup` (+ a floor)."""
    decay = cfg.decay_steps if cfg.decay_steps is not None else max_steps - cfg.warmup_steps
    if decay < 1:
        raise ValueError(f"no steps left to decay over: max_steps={max_steps}, "
                         f"warmup_steps={cfg.warmup_steps}, decay_steps={cfg.decay_steps}")
    cosine = optax.cosine_decay_schedule(cfg.learning_rate, decay, alpha=cfg.end_lr_ratio)
    if cfg.warmup_steps == 0:
        return cosine
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warmup, cosine], [cfg.warmup_steps])


def _scaled(schedule: optax.Schedule, scale: float) -> optax.Schedule:
    if scale == 1.0:
        return schedule
    return lambda step: schedule(step) * scale


def global_norm(tree: PyTree) -> jax.Array:
    """float32 2-norm over all leaves (bf16 leaves are upcast before squaring)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in leaves))


def clip_and_zero(cfg: OptimConfig, params: PyTree) -> optax.GradientTransformation:
    """Steps (1)+(2) of `build`: zero the frozen gradients, then clip by global norm.

    Zeroing first is what makes the clipping norm the trainable gradients' norm alone.
    """
    frozen = jax.tree.map(lambda t: not t, trainable_mask(cfg, params))
    parts = [optax.masked(optax.set_to_zero(), frozen)]
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    return optax.chain(*parts)


def build(cfg: OptimConfig, params: PyTree, max_steps: int) -> optax.GradientTransformation:
    """The training optimizer for `params` (used only for its structure, names and groups)."""
    groups = group_of(cfg, params)
    schedule = lr_schedule(cfg, max_steps)
    decay = decay_mask(params)
    transforms: dict[str, optax.GradientTransformation] = {}
    for i in sorted(set(jax.tree.leaves(groups))):
        g = _group(cfg, i)
        if not g.trainable:
            transforms[FROZEN_LABEL] = optax.set_to_zero()
            continue
        wd = cfg.weight_decay if g.weight_decay is None else g.weight_decay
        # Decoupled decay, multiplied by the (scaled) lr as in torch.optim.AdamW / HF.
        transforms[f"g{i}"] = optax.adamw(_scaled(schedule, g.lr_scale), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                          weight_decay=wd, mask=decay)
    return optax.chain(clip_and_zero(cfg, params), optax.partition(transforms, _labels(cfg, groups)))


def describe(cfg: OptimConfig, params: PyTree) -> str:
    """A table of the groups (pattern, trainable, lr scale, weight decay, #tensors, #parameters)."""
    groups = jax.tree.leaves(group_of(cfg, params))
    sizes = [int(np.prod(np.shape(x))) for x in jax.tree.leaves(params)]
    rows = []
    for i in range(len(cfg.groups) + 1):
        tensors = [s for g, s in zip(groups, sizes) if g == i]
        if i == len(cfg.groups) and not tensors:
            continue                                # no default row when every parameter is claimed
        g = _group(cfg, i)
        wd = cfg.weight_decay if g.weight_decay is None else g.weight_decay
        rows.append((g.pattern, "yes" if g.trainable else "no",
                     f"{g.lr_scale:g}" if g.trainable else "-", f"{wd:g}" if g.trainable else "-",
                     str(len(tensors)), f"{sum(tensors):,}"))
    header = ("group", "trainable", "lr_scale", "wd", "tensors", "params")
    widths = [max(len(r[c]) for r in rows + [header]) for c in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(row, widths)))

    trainable = sum(s for g, s in zip(groups, sizes) if _group(cfg, g).trainable)
    lines = [fmt(header)] + [fmt(r) for r in rows]
    lines.append(f"trainable: {trainable:,} of {sum(sizes):,} parameters")
    return "\n".join(lines)
