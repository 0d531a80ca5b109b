"""BatchNormalization whose backward pass reads a low-bit code of its input,
on JAX (`jax.custom_vjp`): the twin of `keras_blpa.backend.tensorflow.bn_unit`
(see its docstring for the method), with the same signature and results.

The forward is `keras.ops.batch_normalization` of the batch moments, as
`keras.layers.BatchNormalization` computes it on JAX. The codes are the BN
units' (XLA custom calls where they run, else the jnp quantizer's uint32
words) on the centred grid: the encoder is fed `gamma = 1` and
`beta = window`, so every channel's mask is constant and the backward is
BN's alone, with the layer's own gamma.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras

from keras_blpa import grid
from keras_blpa.backend.jax import kernels, quantizer, xla
from keras_blpa.backend.jax.unit import _first_order_only, _no_tangents, encode_only


def centred_grid(channels: int, bits: int, window: float | None):
    """`(params, gamma, beta)` for the encoder: the centred grid of `window`
    standard deviations with a constant-on mask, per channel."""
    window = grid.resolve_window(bits, window)
    ones = jnp.ones((channels,), jnp.float32)
    offset = jnp.full((channels,), window, jnp.float32)  # y = xhat + window > 0
    return quantizer.quantizer_params(ones, offset, bits, window), ones, offset


def approx_batch_norm(x, gamma, beta, *, bits: int | None, epsilon: float,
                      window: float | None = None, name: str = "approx_batch_norm"):
    """Training-mode BN that keeps only codes of `xhat`: `(y, mean, variance)`,
    as `keras_blpa.backend.tensorflow.bn_unit.approx_batch_norm`."""
    axes = tuple(range(x.ndim - 1))
    shape = tuple(x.shape)
    channels = shape[-1]
    dtype = x.dtype
    custom = kernels.usable(shape, bits)

    def forward(x, gamma, beta):
        if custom:
            x, gamma, beta = _no_tangents((x, gamma, beta), name)
        x32 = x.astype(jnp.float32)
        mean, variance = keras.ops.moments(x32, axes)
        y = keras.ops.batch_normalization(x32, mean, variance, axis=-1, offset=beta,
                                          scale=gamma, epsilon=epsilon)
        inv_std = jax.lax.rsqrt(variance + epsilon)
        if bits is None:
            saved = (x32 - mean) * inv_std
        else:
            params, ones, offset = centred_grid(channels, bits, window)
            saved = encode_only(x32, mean, inv_std, ones, offset, params, bits, window, custom)
            if not custom:
                y = xla.tie(y, saved)
        saved, y = xla.optimization_barrier((saved, y))
        return (y, mean, variance), (saved, gamma, inv_std)

    def backward(residuals, cotangents):
        if custom:
            residuals, cotangents = _no_tangents((residuals, cotangents), name)
        saved, gamma, inv_std = residuals
        g_y = cotangents[0].astype(jnp.float32)  # the moments' cotangents are ignored
        if not custom:
            saved = xla.after(saved, g_y)
        saved, g_y = xla.optimization_barrier((saved, g_y))
        if bits is None:
            on = jnp.ones(saved.shape, bool)
            g_x, d_gamma, d_beta = quantizer.relu_bn_backward(g_y, saved, on, gamma, inv_std)
        else:
            params = centred_grid(channels, bits, window)[0]
            if custom:
                g_x, d_gamma, d_beta = kernels.decode_bn_backward(
                    g_y, saved, params, gamma, inv_std, bits, window, 0.0)
            else:
                g_x, d_gamma, d_beta = quantizer.decode_bn_backward(
                    g_y, saved, params, gamma, inv_std, bits, 0.0)
        return _first_order_only((g_x.astype(dtype), d_gamma, d_beta), name)

    @jax.custom_vjp
    def unit(x, gamma, beta):
        return forward(x, gamma, beta)[0]

    unit.defvjp(forward, backward)
    y, mean, variance = unit(x, gamma, beta)
    return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(variance)
