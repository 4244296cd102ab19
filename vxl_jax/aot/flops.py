"""Model FLOPs counted from the shapes (XLA's `cost_analysis()` counts a loop body once, so a scan over
windows or layers would be undercounted by its trip count).

Matmuls count 2 FLOPs per multiply-add. Attention counts every (query, visible key) pair of each
step: the whole kept memory plus the step's own keys causally, which is what a fused kernel
computes. A train step is 3x its forward (backward = 2x forward), recomputation not counted.
"""

from __future__ import annotations

from vxl_jax.compress.plan import Plan
from vxl_jax.config import VideoXLConfig


def _llm_token(cfg: VideoXLConfig) -> float:
    """Matmul FLOPs of one token through one decoder layer (q, k, v, o projections and the MLP)."""
    llm = cfg.llm
    d, h, n, k, f = llm.hidden_size, llm.head_dim, llm.num_heads, llm.num_kv_heads, llm.intermediate_size
    return 2 * (d * (n + 2 * k) * h + n * h * d + 3 * d * f)


def _attention(cfg: VideoXLConfig, queries: int, memory: int) -> float:
    """One layer's attention FLOPs: `queries` new tokens over `memory` kept entries and themselves causally."""
    keys = memory * queries + queries * (queries + 1) / 2
    return 4 * cfg.llm.num_heads * cfg.llm.head_dim * keys


def prefill(cfg: VideoXLConfig, plan: Plan) -> float:
    """One row's compressed prefill through the LLM: prefix, every window (its fed tokens over the memory
    kept so far), suffix."""
    total, mem = 0.0, 0
    steps = [(plan.prefix, plan.prefix)] + [(w.length, w.kept) for w in plan.windows] + [(plan.suffix, plan.suffix)]
    for fed, kept in steps:
        total += fed * _llm_token(cfg) + _attention(cfg, fed, mem)
        mem += kept
    return total * cfg.llm.num_layers


def vision_per_frame(cfg: VideoXLConfig) -> float:
    """CLIP (patch embedding and the layers used), then the projector, for one frame."""
    v = cfg.vision
    t = v.num_patches + 1
    layer = 2 * t * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size) + 4 * t * t * v.hidden_size
    clip = cfg.vision_layers_used * layer + 2 * t * v.patch_size ** 2 * v.num_channels * v.hidden_size
    d = cfg.llm.hidden_size
    return clip + 2 * (t - 1) * (v.hidden_size * d + d * d)


def logits(cfg: VideoXLConfig, tokens: int) -> float:
    return 2 * tokens * cfg.llm.hidden_size * cfg.llm.vocab_size


def forward(cfg: VideoXLConfig, plans: list[Plan], frames: int, logit_tokens: int) -> float:
    """A batch's forward: vision for every frame, the compressed prefill of each row, `logit_tokens` logits a row."""
    return sum(prefill(cfg, p) for p in plans) + len(plans) * (frames * vision_per_frame(cfg)
                                                               + logits(cfg, logit_tokens))


def train_step(cfg: VideoXLConfig, plans: list[Plan], frames: int, logit_tokens: int) -> float:
    return 3 * forward(cfg, plans, frames, logit_tokens)


def decode(cfg: VideoXLConfig, memory: int, new_tokens: int, rows: int = 1) -> float:
    """Greedy decoding of `new_tokens` per row after a memory of `memory` entries (each token: every layer,
    attention over the memory and the tokens before it, the LM head)."""
    per_row = sum(cfg.llm.num_layers * (_llm_token(cfg) + _attention(cfg, 1, memory + i)) for i in range(new_tokens))
    return rows * (per_row + logits(cfg, new_tokens))
