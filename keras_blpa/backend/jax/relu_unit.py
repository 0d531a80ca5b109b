"""The ReLU -> linear unit without a BN in front, on JAX (`jax.custom_vjp`).

The JAX twin of `keras_blpa.backend.tensorflow.relu_unit`, same signature and
results: `relu(z)` and the linear map at full precision, and only a
`bits`-bit code of `z` on a one-sided grid set per step from the batch's
moments of `z` (see that module's docstring) kept for the backward pass.
The codes are the BN unit's (`unit`): the XLA custom calls where they run,
else the jnp quantizer's uint32 words, fed `z` with the grid's offset and
scale as the BN statistics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from keras_blpa import grid
from keras_blpa.backend.jax import kernels, quantizer, xla
from keras_blpa.backend.jax.linear import chunked_gradients, weight_gradient_chunks
from keras_blpa.backend.jax.unit import (
    LinearMap,
    _first_order_only,
    _no_tangents,
    encode_only,
)


def relu_grid(z32, bits: int, window: float | None):
    """`(mean, inv_std, gamma, beta)` that make the BN units' encoder quantize
    `z` on its one-sided grid, float32 `[C]` (as on TensorFlow)."""
    window = grid.resolve_window(bits, window)
    half, w = window / 2, grid.bin_width(bits, window)
    axes = tuple(range(z32.ndim - 1))
    mu, variance = jnp.mean(z32, axes), jnp.var(z32, axes)
    top = jnp.maximum(jnp.maximum(mu, 0.0) + half * jnp.sqrt(variance), 1e-30)
    scale = (window - w) / top
    offset = top - half / scale
    return offset, scale, 1.0 / scale, offset


def relu_linear(
    z,
    weights: list,
    *,
    linear: LinearMap,
    bits: int | None,
    window: float | None = None,
    return_activation: bool = False,
    name: str = "relu_linear",
) -> list:
    """Training-mode forward of ReLU -> linear that keeps only codes of `z`.

    Arguments and results as `keras_blpa.backend.tensorflow.relu_unit.relu_linear`.
    """
    shape = tuple(z.shape)
    compute_dtype = z.dtype
    custom = kernels.usable(shape, bits)
    # As in the BN unit (`unit.bn_relu_linear`): the weight gradient over batch
    # slices on the custom calls.
    chunks = (weight_gradient_chunks() if custom and bits is not None and len(shape) == 4
              and not kernels.batch_sharded() else 1)

    def grid_of(gamma, beta):
        return quantizer.quantizer_params(gamma, beta, bits, window)

    def forward(z, weights):
        if custom:
            z = _no_tangents(z, name)
        z32 = z.astype(jnp.float32)
        a = jax.nn.relu(z32)
        channels = shape[-1]
        gamma = beta = jnp.zeros((channels,), jnp.float32)
        if bits is None:
            saved = a.astype(compute_dtype)
        else:
            mean, inv_std, gamma, beta = relu_grid(z32, bits, window)
            saved = encode_only(z32, mean, inv_std, gamma, beta, grid_of(gamma, beta), bits,
                                window, custom)
            if not custom:
                a = xla.tie(a, saved)
        saved, a = xla.optimization_barrier((saved, a))
        a = a.astype(compute_dtype)
        outputs = tuple(linear.forward(a, list(weights)))
        results = (*outputs, a) if return_activation else outputs
        return results, (saved, gamma, beta, weights)

    def decode(saved, gamma, beta, gate):
        """The approximate `relu(z)`, not before `gate` exists."""
        if bits is None:
            return saved
        params = grid_of(gamma, beta)
        if custom:
            return kernels.decode_relu(saved, params, gamma, beta, shape, bits, window, 0.0,
                                       gate)
        xhat, mask = quantizer.decode_words(xla.after(saved, gate), params, shape, bits)
        return quantizer.relu_from_decoded(xhat, mask, gamma, beta, 0.0)

    def backward(residuals, cotangents):
        if custom:
            residuals, cotangents = _no_tangents((residuals, cotangents), name)
        saved, gamma, beta, weights = residuals
        heads = len(cotangents) - return_activation
        grads = list(cotangents[:heads])
        saved, grads = xla.optimization_barrier((saved, grads))
        if chunks > 1:
            def decode_rows(start, stop, gate):
                rows = xla.after(saved[start:stop], gate)
                return kernels.decode_relu(rows, grid_of(gamma, beta), gamma, beta,
                                           (stop - start, *shape[1:]), bits, window, 0.0, gate)

            g_a, d_weights = chunked_gradients(linear.forward, weights, tuple(grads),
                                               decode_rows, shape, compute_dtype, chunks)
        else:
            a_approx = decode(saved, gamma, beta, grads[0]).astype(compute_dtype)
            _, linear_vjp = jax.vjp(lambda a, w: tuple(linear.forward(a, list(w))), a_approx,
                                    weights)
            g_a, d_weights = linear_vjp(tuple(grads))
        if return_activation:
            g_a = g_a + cotangents[heads].astype(g_a.dtype)
        # A second decode, once g_a exists: the first on-bin decodes half a
        # bin above 0, so `a > 0` is the mask.
        on = decode(saved, gamma, beta, g_a) > 0
        g_z = jnp.where(on, g_a, jnp.zeros_like(g_a))
        return _first_order_only((g_z.astype(compute_dtype), d_weights), name)

    @jax.custom_vjp
    def unit(z, weights):
        return forward(z, weights)[0]

    unit.defvjp(forward, backward)
    return list(unit(z, tuple(weights)))


def relu_linear_inference(z, weights: list, *, linear: LinearMap,
                          return_activation: bool = False, **_) -> list:
    """Forward of ReLU -> linear in plain jnp (inference; plain autodiff)."""
    a = jax.nn.relu(z)
    outputs = linear.forward(a, list(weights))
    return [*outputs, a] if return_activation else outputs
