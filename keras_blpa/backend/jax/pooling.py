"""Max pooling of a zero-padded input that re-pads in the backward pass
(`keras_blpa.layers.PaddedMaxPooling2D` on JAX; the twin of
`keras_blpa.backend.tensorflow.pooling`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from keras_blpa.backend.jax import xla


def padded_max_pool(x, padding, pool_size, strides):
    """`MaxPooling2D(pool_size, strides, "valid")(ZeroPadding2D(padding)(x))`
    whose gradient keeps only `x`, not the padded copy: the backward pads
    again, gated on the upstream gradient (so that XLA neither runs it early
    nor merges it with the forward's pad), and differentiates the pool."""
    (top, bottom), (left, right) = padding
    pads = ((0, 0), (top, bottom), (left, right), (0, 0))
    window, steps = (1, *pool_size, 1), (1, *strides, 1)

    def pool(x):
        padded = jnp.pad(x, pads)
        return jax.lax.reduce_window(padded, -jnp.inf, jax.lax.max, window, steps, "VALID")

    @jax.custom_vjp
    def padded_pool(x):
        return pool(x)

    def forward(x):
        return pool(x), x

    def backward(x, g):
        _, vjp = jax.vjp(pool, xla.after(x, g))
        return vjp(g)

    padded_pool.defvjp(forward, backward)
    return padded_pool(x)
