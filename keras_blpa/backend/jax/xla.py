"""XLA structure helpers for the JAX unit (twins of `keras_blpa.backend.tensorflow.xla`).

Under `jax.jit` everything is XLA, so unlike TensorFlow no context detection
is needed: these always apply. See `keras_blpa.backend.tensorflow.xla` for why each one exists.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def optimization_barrier(tree):
    """`jax.lax.optimization_barrier`: kept by XLA:GPU and TPU through fusion
    and scheduling; XLA:CPU removes it before fusion (hence `after`, `tie`)."""
    return jax.lax.optimization_barrier(tree)


def after(tensor, gate):
    """`tensor`, made data-dependent on `gate`: a select on a predicate from
    the full sum of `gate` (a reduction gets a kernel of its own, so the
    consumer reads one scalar). False only when the sum is NaN: then floats
    become NaN (`_poison`), so the gradient is NaN too."""
    total = jnp.sum(gate)
    # lax.select, not jnp.where (a nested call before optimization): the
    # gate is one plain select on every backend's input program.
    keep = jax.lax.broadcast(total == total, tensor.shape)
    return jax.lax.select(keep, tensor, _poison(tensor))


def _poison(tensor):
    """What `after` gives for a NaN gate: NaN for floats (weights, per-row
    scales), so the gradient stays NaN; zero for integer codes, which decode
    through those floats. Zeros everywhere turned a NaN upstream gradient
    into finite, wrong weight gradients."""
    if jnp.issubdtype(tensor.dtype, jnp.inexact):
        return jnp.full_like(tensor, jnp.nan)
    return jnp.zeros_like(tensor)


def tie(tensor, source):
    """`tensor + 0 * source[0, ..., 0]`: every schedule must finish `source`
    (the codes, finite integers) before `tensor` (the forward output) is used,
    so the encoder runs in the forward pass. XLA does not fold `0 * x` for
    floats (NaN semantics)."""
    first = source[(0,) * source.ndim]
    return tensor + 0.0 * first.astype(tensor.dtype)
