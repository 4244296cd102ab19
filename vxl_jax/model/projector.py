"""The `mlp2x_gelu` projector and the 2x2 average pooling of video frames.

  params = {"fc1": {"kernel": [Dv, D], "bias": [D]}, "fc2": {"kernel": [D, D], "bias": [D]}}

The projector runs on all patches of a frame, then the patch grid is average
pooled (stride 2 for 24x24 -> 12x12 = 144 tokens), as the original does it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def _torch_linear_bias_init(fan_in: int):
    """torch.nn.Linear's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = fan_in ** -0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Projector(nn.Module):
    """Linear -> GELU (exact erf) -> Linear, initialised like torch.nn.Linear (fresh projectors)."""

    width: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
        dense = lambda fan_in, name: nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                                              kernel_init=kernel_init, bias_init=_torch_linear_bias_init(fan_in),
                                              name=name)
        h = dense(x.shape[-1], "fc1")(x)
        h = jax.nn.gelu(h, approximate=False)
        return dense(self.width, "fc2")(h)


def init_params(mm_hidden: int, width: int, key: jax.Array, param_dtype=jnp.float32) -> dict:
    return Projector(width, param_dtype=param_dtype).init(key, jnp.zeros((1, mm_hidden), param_dtype))["params"]


def project(params: dict, x: jax.Array, dtype=None) -> jax.Array:
    width = params["fc2"]["kernel"].shape[-1]
    return Projector(width, dtype=dtype or x.dtype).apply({"params": params}, x)


def avg_pool_grid(x: jax.Array, grid: int, stride: int) -> jax.Array:
    """[F, grid*grid, D] row-major patch tokens -> [F, (grid/stride)^2, D] average pooled."""
    f, _, d = x.shape
    g = grid // stride
    x = x.reshape(f, g, stride, g, stride, d)
    return x.mean(axis=(2, 4), dtype=jnp.float32).astype(x.dtype).reshape(f, g * g, d)
