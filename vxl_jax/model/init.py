"""Fresh random parameters that are cheap to compile.

Drawing every leaf with its own Flax initializer makes `jax.jit(init)` a
program of ~50 threefry + truncated-normal fusions: 3-6 s of XLA compilation
for `bench_small` on a 2-core CPU, paid by every cold process that starts from
random weights (benchmarks, `init=random` training). Here the leaves come from
one normal draw, sliced and scaled per leaf (about 1 s to compile); leaves
bigger than `SINGLE_DRAW_MAX` elements (a real-size embedding or layer stack)
get a draw of their own, so a sharded 7B init never materialises one vector of
every parameter.

Values: N(0, 1/fan_in) for kernels and the LM head (LeCun's variance, as the
Flax defaults, but not truncated), zero biases, unit norm scales, N(0, 1)
embeddings, N(0, 0.02^2) CLIP position embeddings.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

SINGLE_DRAW_MAX = 1 << 24      # elements; bigger leaves are drawn on their own


def _std(path: tuple[str, ...], shape: tuple[int, ...]):
    """'zeros', 'ones' or the standard deviation of one leaf, from its path (names) and shape."""
    name, parent = path[-1], path[-2] if len(path) > 1 else ""
    own = shape[1:] if "layers" in path else shape               # stacked layers: a leading L axis
    if name == "bias":
        return "zeros"
    if name == "scale":
        return "ones"
    if name == "kernel":
        # Attention output projections contract (heads, head dim); every other kernel its first axis.
        fan_in = math.prod(own[:-1]) if parent in ("o_proj", "out_proj") else own[0]
        return fan_in ** -0.5
    if name == "lm_head":
        return own[0] ** -0.5
    if name == "patch_embed":                                     # [P, P, C, D]: a convolution's fan-in
        return math.prod(own[:-1]) ** -0.5
    if name in ("embed_tokens", "vst_embed", "class_embed"):
        return 1.0
    if name == "pos_embed":
        return 0.02
    raise ValueError(f"no initialiser rule for parameter {'/'.join(path)} {shape}")


def fill(structure_fn: Callable[[], dict], key: jax.Array, dtype=jnp.float32) -> dict:
    """Parameters with the structure `jax.eval_shape(structure_fn)` gives, drawn as the module docstring says."""
    abstract = jax.eval_shape(structure_fn)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    specs = []
    for path, leaf in flat:
        names = tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
        specs.append((_std(names, leaf.shape), leaf.shape))
    random = [(i, s) for i, (std, s) in enumerate(specs) if not isinstance(std, str)]
    shared = [(i, s) for i, s in random if math.prod(s) <= SINGLE_DRAW_MAX]
    own_key, shared_key = jax.random.split(key)
    draws = {}
    if shared:
        flat_draw = jax.random.normal(shared_key, (sum(math.prod(s) for _, s in shared),), jnp.float32)
        at = 0
        for i, s in shared:
            draws[i] = flat_draw[at:at + math.prod(s)].reshape(s)
            at += math.prod(s)
    for i, s in random:
        if i not in draws:
            draws[i] = jax.random.normal(jax.random.fold_in(own_key, i), s, jnp.float32)
    leaves = []
    for i, (std, s) in enumerate(specs):
        if std == "zeros":
            leaves.append(jnp.zeros(s, dtype))
        elif std == "ones":
            leaves.append(jnp.ones(s, dtype))
        else:
            leaves.append((draws[i] * std).astype(dtype))
    return jax.tree.unflatten(treedef, leaves)
