"""The training loss: next-token cross entropy over the whole compressed sequence.

The forward is the compressed prefill itself (`compress.prefill`), so training
sees exactly what inference sees: every window compressed at its ratio, the
memory holding `[prefix | VSTs of earlier windows]`, the text after the video
attending to it. Gradients reach a window's visual tokens only through the
VST keys/values it leaves in memory, and from there the projector and the
vision tower, because the scan over windows is differentiated (TRAIN_FORMAT.md
4a). Unlike the original's training forward, a video that ends the sequence is
compressed as at inference (its 4d quirk is not copied; the loader's rows always
have text after the video anyway).

The loss is one token-level mean over every labelled token of the batch
(Σ CE / count, TRAIN_FORMAT.md 4c); `loss_terms` returns the sum and the count
separately so that gradient accumulation and data parallelism divide once by
the global count.

The cross entropy goes through the LM head in vocabulary blocks of `loss_chunk`
columns (`chunked_ce.lm_head_cross_entropy`, over the prefix and suffix hidden
states together): neither the forward nor the backward holds the [B, P + S, V]
float32 logits (V = 152,064 for the 7B), and the result and its gradients equal
the full path's (`loss_chunk=None`: `qwen2.logits` then `cross_entropy`) to
float32 rounding. `return_logits` (tests, fixtures) also returns the full
logits, computed beside the loss.

Axis legend: B batch, P prefix tokens, S suffix tokens, D width, V vocabulary.
"""

from __future__ import annotations

from typing import Optional

import flax
import jax
import jax.numpy as jnp

from vxl_jax.compress.packing import PrefillSpec
from vxl_jax.compress.prefill import prefill
from vxl_jax.config import VideoXLConfig
from vxl_jax.model import qwen2
from vxl_jax.train.batch import TrainInputs
from vxl_jax.train.chunked_ce import DEFAULT_BLOCK, lm_head_cross_entropy


@flax.struct.dataclass
class LossTerms:
    ce_sum: jax.Array                      # [] float32: Σ cross entropy over labelled tokens
    count: jax.Array                       # [] int32: labelled tokens
    prefix_logits: Optional[jax.Array] = None   # [B, P, V] with return_logits
    suffix_logits: Optional[jax.Array] = None   # [B, S, V]


def cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(Σ CE, count) of float32 logits [..., V] against targets [...] (negative: ignored)."""
    valid = targets >= 0
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, logz - picked, 0.0)), jnp.sum(valid, dtype=jnp.int32)


def loss_terms(params: dict, cfg: VideoXLConfig, inputs: TrainInputs, *, spec: PrefillSpec,
               pixel_norm: Optional[tuple[jax.Array, jax.Array]] = None, dtype=jnp.float32,
               remat: str = "none", remat_window: str = "none", loss_chunk: Optional[int] = DEFAULT_BLOCK,
               return_logits: bool = False) -> LossTerms:
    """Σ CE and count of one batch through the compressed forward (see the module docstring).

    loss_chunk: vocabulary block of the chunked cross entropy; None: full logits.
    """
    result = prefill(params, cfg, inputs.plan, inputs.visual, spec=spec, pixel_norm=pixel_norm, dtype=dtype,
                     remat=remat, remat_window=remat_window)
    llm = params["llm"]
    if loss_chunk is None or return_logits:
        prefix_logits = qwen2.logits(llm, cfg.llm, result.prefix_hidden)
        suffix_logits = qwen2.logits(llm, cfg.llm, result.suffix_hidden)
    if loss_chunk is None:
        p_sum, p_count = cross_entropy(prefix_logits, inputs.prefix_targets)
        s_sum, s_count = cross_entropy(suffix_logits, inputs.suffix_targets)
        out = LossTerms(p_sum + s_sum, p_count + s_count)
    else:
        hidden = jnp.concatenate([result.prefix_hidden, result.suffix_hidden], axis=1)         # [B, P + S, D]
        targets = jnp.concatenate([inputs.prefix_targets, inputs.suffix_targets], axis=1)
        out = LossTerms(*lm_head_cross_entropy(llm, cfg.llm, hidden, targets, block=loss_chunk))
    if return_logits:
        out = out.replace(prefix_logits=prefix_logits, suffix_logits=suffix_logits)
    return out


def mean_loss(params: dict, cfg: VideoXLConfig, inputs: TrainInputs, **kwargs) -> jax.Array:
    """The token-level mean loss of one batch (0 when nothing is labelled)."""
    terms = loss_terms(params, cfg, inputs, **kwargs)
    return terms.ce_sum / jnp.maximum(terms.count, 1)
