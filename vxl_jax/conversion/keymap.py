"""The declarative map between HF key names and the vxl_jax params pytree.

A `Rule` pairs one HF key pattern (with `{L}` standing for a layer index) with a
path in the params tree and a `Transform` that maps the tensor both ways and
states the HF shape it expects. Layered rules fill one slice of a target
stacked on a leading layer axis. Three rule sets cover the sources we read:
a Video-XL checkpoint, a plain `Qwen2ForCausalLM`, a plain `CLIPVisionModel`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from vxl_jax.config import ClipVisionConfig, ProjectorConfig, Qwen2Config

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
    """to_jax/to_hf map one tensor; hf_shape gives the HF shape for a JAX shape."""

    name: str
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda a: a, lambda a: a)
# torch Linear [out, in] <-> kernel [in, out]
TRANSPOSE = Transform("transpose", lambda a: a.T, lambda a: a.T)


def heads_out(heads: int) -> Transform:
    """q/k/v weight [heads*H, D] <-> kernel [D, heads, H]; bias [heads*H] <-> [heads, H]."""
    def to_jax(a):
        return a.T.reshape(a.shape[1], heads, -1) if a.ndim == 2 else a.reshape(heads, -1)

    def to_hf(a):
        return a.reshape(a.shape[0], -1).T if a.ndim == 3 else a.reshape(-1)
    return Transform(f"heads_out({heads})", to_jax, to_hf)


def heads_in(heads: int) -> Transform:
    """o/out_proj weight [D, heads*H] <-> kernel [heads, H, D]."""
    return Transform(f"heads_in({heads})", lambda a: a.T.reshape(heads, -1, a.shape[0]),
                     lambda a: a.reshape(-1, a.shape[-1]).T)


# conv weight [D, C, P, P] <-> kernel [P, P, C, D]
PATCH_CONV = Transform("patch_conv", lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1))


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str                      # HF key; "{L}" is a layer index for layered rules
    path: tuple[str, ...]        # path in the params tree
    hf_shape: Shape              # shape of one HF tensor
    transform: Transform = IDENTITY
    layers: int = 0              # > 0: the target is stacked over this many layers

    @property
    def pattern(self) -> re.Pattern:
        return re.compile("^" + re.escape(self.hf).replace(r"\{L\}", r"(\d+)") + "$")

    def hf_keys(self) -> list[str]:
        return [self.hf.replace("{L}", str(i)) for i in range(self.layers)] if self.layers else [self.hf]

    def jax_shape(self) -> Shape:
        one = self.transform.to_jax(np.empty(self.hf_shape, np.uint8)).shape
        return (self.layers, *one) if self.layers else one


def llm_rules(cfg: Qwen2Config, prefix: str = "model.", with_vst: bool = True) -> list[Rule]:
    d, f, v, h = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    n, k, nl = cfg.num_heads, cfg.num_kv_heads, cfg.num_layers
    lay = f"{prefix}layers.{{L}}."
    rules = [
        Rule(f"{prefix}embed_tokens.weight", ("llm", "embed_tokens"), (v, d)),
        Rule(f"{prefix}norm.weight", ("llm", "norm", "scale"), (d,)),
        Rule(lay + "input_layernorm.weight", ("llm", "layers", "input_norm", "scale"), (d,), layers=nl),
        Rule(lay + "post_attention_layernorm.weight", ("llm", "layers", "post_attention_norm", "scale"), (d,),
             layers=nl),
        Rule(lay + "self_attn.o_proj.weight", ("llm", "layers", "o_proj", "kernel"), (d, n * h), heads_in(n), nl),
        Rule(lay + "mlp.gate_proj.weight", ("llm", "layers", "mlp", "gate_proj", "kernel"), (f, d), TRANSPOSE, nl),
        Rule(lay + "mlp.up_proj.weight", ("llm", "layers", "mlp", "up_proj", "kernel"), (f, d), TRANSPOSE, nl),
        Rule(lay + "mlp.down_proj.weight", ("llm", "layers", "mlp", "down_proj", "kernel"), (d, f), TRANSPOSE, nl),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", ("llm", "lm_head"), (v, d), TRANSPOSE))
    kinds = [("", "")] + ([("beacon_", "vst_")] if with_vst else [])
    for hf_kind, our_kind in kinds:
        for proj, heads in (("q", n), ("k", k), ("v", k)):
            name = f"{our_kind}{proj}_proj"
            src = lay + f"self_attn.{hf_kind}{proj}_proj."
            rules.append(Rule(src + "weight", ("llm", "layers", name, "kernel"), (heads * h, d), heads_out(heads), nl))
            rules.append(Rule(src + "bias", ("llm", "layers", name, "bias"), (heads * h,), heads_out(heads), nl))
    if with_vst:
        rules.append(Rule(f"{prefix}beacon_embed_tokens.weight", ("llm", "vst_embed"), (1, d)))
    return rules


def vision_rules(cfg: ClipVisionConfig, prefix: str = "model.vision_tower.vision_tower.vision_model.") -> list[Rule]:
    d, i, n, nl = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_layers
    p, c = cfg.patch_size, cfg.num_channels
    emb, lay = prefix + "embeddings.", prefix + "encoder.layers.{L}."
    rules = [
        Rule(emb + "class_embedding", ("vision", "class_embed"), (d,)),
        Rule(emb + "patch_embedding.weight", ("vision", "patch_embed"), (d, c, p, p), PATCH_CONV),
        Rule(emb + "position_embedding.weight", ("vision", "pos_embed"), (1 + cfg.num_patches, d)),
    ]
    for hf_name, ours in (("pre_layrnorm", "pre_norm"), ("post_layernorm", "post_norm")):
        rules.append(Rule(f"{prefix}{hf_name}.weight", ("vision", ours, "scale"), (d,)))
        rules.append(Rule(f"{prefix}{hf_name}.bias", ("vision", ours, "bias"), (d,)))
    for ln in ("layer_norm1", "layer_norm2"):
        rules.append(Rule(lay + ln + ".weight", ("vision", "layers", ln, "scale"), (d,), layers=nl))
        rules.append(Rule(lay + ln + ".bias", ("vision", "layers", ln, "bias"), (d,), layers=nl))
    for proj in ("q_proj", "k_proj", "v_proj"):
        rules.append(Rule(lay + f"self_attn.{proj}.weight", ("vision", "layers", proj, "kernel"), (d, d),
                          heads_out(n), nl))
        rules.append(Rule(lay + f"self_attn.{proj}.bias", ("vision", "layers", proj, "bias"), (d,), heads_out(n), nl))
    rules += [
        Rule(lay + "self_attn.out_proj.weight", ("vision", "layers", "out_proj", "kernel"), (d, d), heads_in(n), nl),
        Rule(lay + "self_attn.out_proj.bias", ("vision", "layers", "out_proj", "bias"), (d,), layers=nl),
        Rule(lay + "mlp.fc1.weight", ("vision", "layers", "fc1", "kernel"), (i, d), TRANSPOSE, nl),
        Rule(lay + "mlp.fc1.bias", ("vision", "layers", "fc1", "bias"), (i,), layers=nl),
        Rule(lay + "mlp.fc2.weight", ("vision", "layers", "fc2", "kernel"), (d, i), TRANSPOSE, nl),
        Rule(lay + "mlp.fc2.bias", ("vision", "layers", "fc2", "bias"), (d,), layers=nl),
    ]
    return rules


def projector_rules(cfg: ProjectorConfig, width: int, prefix: str = "model.mm_projector.") -> list[Rule]:
    m = cfg.mm_hidden_size
    return [
        Rule(prefix + "0.weight", ("projector", "fc1", "kernel"), (width, m), TRANSPOSE),
        Rule(prefix + "0.bias", ("projector", "fc1", "bias"), (width,)),
        Rule(prefix + "2.weight", ("projector", "fc2", "kernel"), (width, width), TRANSPOSE),
        Rule(prefix + "2.bias", ("projector", "fc2", "bias"), (width,)),
    ]


def videoxl_rules(cfg) -> list[Rule]:
    """Every key of a Video-XL (`LlavaQwenForCausalLM`) checkpoint."""
    return llm_rules(cfg.llm) + projector_rules(cfg.projector, cfg.llm.hidden_size) + vision_rules(cfg.vision)


# Buffers that some checkpoints carry and that hold no parameters.
IGNORED_KEYS = (
    re.compile(r"^(model\.vision_tower\.vision_tower\.)?vision_model\.embeddings\.position_ids$"),
    re.compile(r"^(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
)
