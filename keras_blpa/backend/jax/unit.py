"""The BN -> ReLU -> linear unit on JAX: BLPA's backward as a `jax.custom_vjp`.

The JAX twin of `keras_blpa.backend.tensorflow.unit`, with the same signature and results. The
forward runs at full precision; the residuals that `jax.jit` keeps from the
forward for the backward are the unit's packed codes (uint32 words, see
`quantizer.pack_words`), or `xhat` itself with `bits=None`, plus per-channel
vectors and the weights. The backward rebuilds the ReLU output and the mask
from the codes and differentiates the linear map with `jax.vjp`; on the
custom calls a conv's weight gradient runs over batch slices
(`linear.chunked_gradients`), so that only a slice's rows are decoded at once.

On CPU and CUDA the kernels are XLA custom calls (`kernels`): the TensorFlow op's
own kernels, opaque to fusion, so only the codes live from the forward into
the backward; each decode takes a scalar of its upstream gradient as an
operand, so that XLA cannot run it early. Elsewhere (TPU), or without the
library, the jnp quantizer runs, and keeping XLA from undoing that takes
(measured on XLA:CPU, see the README):
- the codes are packed by a reduce-window, which XLA:CPU does not fuse into
  the backward (an elementwise encode is recomputed there from the float32
  input, which then stays alive: more memory than stock layers);
- the forward output is tied to the codes (`xla.tie`), so the encoder runs
  in the forward pass;
- every decode is gated on the upstream gradient (`xla.after`): XLA drops
  optimization barriers on CPU before scheduling, and would otherwise run a
  decode, which depends only on the codes, right after the forward and hold
  its float32 result;
- optimization barriers around both, which the GPU and TPU pipelines keep.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from keras_blpa.backend.jax import kernels, quantizer, xla
from keras_blpa.backend.jax.linear import chunked_gradients, weight_gradient_chunks
from keras_blpa.grid import resolve_max_value


class LinearMap(Protocol):
    """What a unit needs from its linear map: the forward `outputs = W(a)`,
    one output per head; `jax.vjp` gives the gradients."""

    def forward(self, a, weights: list) -> list: ...


def bn_relu_linear(
    x,
    gamma,
    beta,
    weights: list,
    *,
    linear: LinearMap,
    bits: int | None,
    naive: bool,
    epsilon: float,
    window: float | None = None,
    synchronized: bool = False,
    negative_slope: float = 0.0,
    max_value: float | None = None,
    name: str = "bn_relu_linear",
):
    """Training-mode forward of BN (batch statistics) -> ReLU -> linear.

    Arguments and results as `keras_blpa.backend.tensorflow.unit.bn_relu_linear`. `synchronized`
    changes nothing here: under `jax.jit` the batch moments are those of the
    whole (global) batch, also when `keras.distribution.DataParallel` shards
    it over devices (XLA inserts the all-reduce), which is what the flag asks.
    """
    del synchronized
    axes = tuple(range(x.ndim - 1))
    shape = tuple(x.shape)
    compute_dtype = x.dtype
    slope = float(np.float32(negative_slope))

    # Custom calls where the platform has them (decided at trace time: the
    # two paths keep different residuals, which lax.platform_dependent's
    # branches cannot), the jnp quantizer elsewhere. Capped units too: the
    # calls take the cap edge (`kernels`), as the TensorFlow op does.
    cap = resolve_max_value(max_value, slope)
    custom = kernels.usable(shape, bits)
    # The weight gradient over batch slices on the custom calls (a 4-D
    # activation, one device): the decoded activation and XLA:CPU's
    # transposed copies are then a slice's size. Not on the jnp path, where
    # XLA fuses the decode into the transposed copy (and TPU runs it), nor
    # under a data-parallel mesh, whose batch shards a slice would cross.
    chunks = (weight_gradient_chunks()
              if custom and len(shape) == 4 and not kernels.batch_sharded() else 1)

    def grid_of(gamma, beta):
        if bits is None:
            return None, None
        params = quantizer.quantizer_params(gamma, beta, bits, window, max_value=cap)
        caps = None if cap is None else quantizer.cap_params(gamma, beta, params, bits, cap)
        return params, caps

    def forward(x, gamma, beta, weights):
        if custom:
            x, gamma, beta = _no_tangents((x, gamma, beta), name)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axes)
        variance = jnp.var(x32, axes)
        inv_std = jax.lax.rsqrt(variance + epsilon)
        params, caps = grid_of(gamma, beta)
        if custom:
            # Opaque to fusion: the codes are the only full-size residual.
            if bits is None:
                a, saved = kernels.exact_forward(x32, mean, inv_std, gamma, beta, slope, cap)
            else:
                a, saved = kernels.encode(x32, mean, inv_std, gamma, beta, params, bits,
                                          window, slope, caps)
                if naive:
                    decoded = kernels.decode_relu(saved, params, gamma, beta, shape, bits,
                                                  window, slope, x32, caps)
                    a = decoded + 0.0 * a
        elif cap is not None:
            xhat, on, saturated, a = quantizer.normalize_relu_capped(
                x32, mean, inv_std, gamma, beta, cap)
            if bits is None:
                saved = xhat
            else:
                codes = quantizer.encode_codes(xhat, on, params, bits, caps, saturated)
                saved = quantizer.pack_words(codes, bits)
                a = xla.tie(a, saved)
                if naive:
                    a = decode_for_linear(saved, params, caps, gamma, beta, None) + 0.0 * a
        else:
            xhat, on, a = quantizer.normalize_relu(x32, mean, inv_std, gamma, beta, slope)
            if bits is None:
                saved = xhat
            else:
                saved = quantizer.pack_words(quantizer.encode_codes(xhat, on, params, bits), bits)
                a = xla.tie(a, saved)
                if naive:
                    # `+ 0 * a`: a NaN or Inf input still reaches the output.
                    xhat_q, mask = quantizer.decode_words(saved, params, shape, bits)
                    a = quantizer.relu_from_decoded(xhat_q, mask, gamma, beta, slope) + 0.0 * a
        saved, a = xla.optimization_barrier((saved, a))
        outputs = linear.forward(a.astype(compute_dtype), list(weights))
        residuals = (saved, gamma, beta, inv_std, weights)
        return (tuple(outputs), mean, variance), residuals

    def decoded_capped(saved, params, caps):
        codes = quantizer.unpack_words(saved, shape, bits)
        return quantizer.centres_and_masks_capped(codes, params, caps, bits)

    def decode_for_linear(saved, params, caps, gamma, beta, gate):
        """The approximate ReLU output, not before the upstream gradient
        (the jnp path's `saved` is already gated on it)."""
        if custom:
            if bits is None:
                return kernels.exact_relu(saved, gamma, beta, slope, gate, cap)
            return kernels.decode_relu(saved, params, gamma, beta, shape, bits, window, slope,
                                       gate, caps)
        if cap is not None:
            if bits is None:
                return quantizer.relu_exact_capped(saved, gamma, beta, cap)
            return quantizer.relu_from_decoded_capped(
                *decoded_capped(saved, params, caps), gamma, beta, cap)
        if bits is None:
            return quantizer.relu_exact(saved, gamma, beta, slope)
        xhat, mask = quantizer.decode_words(saved, params, shape, bits)
        return quantizer.relu_from_decoded(xhat, mask, gamma, beta, slope)

    def decode_rows(saved, params, caps, gamma, beta, start, stop, gate):
        """The custom calls' `decode_for_linear` of the batch rows
        `start:stop`, not before `gate` exists (nor the slice of the codes)."""
        rows = xla.after(saved[start:stop], gate)
        if bits is None:
            return kernels.exact_relu(rows, gamma, beta, slope, gate, cap)
        return kernels.decode_relu(rows, params, gamma, beta, (stop - start, *shape[1:]), bits,
                                   window, slope, gate, caps)

    def bn_backward(g_a, saved, params, caps, gamma, beta, inv_std):
        if custom:
            if bits is None:
                return kernels.exact_bn_backward(g_a, saved, gamma, beta, inv_std, slope, cap)
            return kernels.decode_bn_backward(g_a, saved, params, gamma, inv_std, bits, window,
                                              slope, caps)
        # The second decode waits for g_a, so that it does not live beside
        # the first one while the linear map's gradients run.
        saved = xla.after(saved, g_a)
        if cap is not None and bits is None:
            mask = quantizer.exact_masks_capped(saved, gamma, beta, cap)[0]
            return quantizer.relu_bn_backward(g_a, saved, mask, gamma, inv_std)
        if bits is None:
            return quantizer.relu_bn_backward(
                g_a, saved, quantizer.exact_mask(saved, gamma, beta), gamma, inv_std, slope
            )
        return quantizer.decode_bn_backward(g_a, saved, params, gamma, inv_std, bits, slope, caps)

    def backward(residuals, cotangents):
        if custom:
            residuals, cotangents = _no_tangents((residuals, cotangents), name)
        saved, gamma, beta, inv_std, weights = residuals
        grads = list(cotangents[0])  # the moments' cotangents are ignored
        # Recomputed from gamma and beta ([C] each): residuals must be arrays.
        params, caps = grid_of(gamma, beta)
        if not custom:
            saved = xla.after(saved, grads[0])
        saved, grads = xla.optimization_barrier((saved, grads))
        if chunks > 1:
            g_a, d_weights = chunked_gradients(
                linear.forward, weights, tuple(grads),
                lambda start, stop, gate: decode_rows(saved, params, caps, gamma, beta,
                                                      start, stop, gate),
                shape, compute_dtype, chunks)
        else:
            a_approx = decode_for_linear(saved, params, caps, gamma, beta, grads[0])
            _, linear_vjp = jax.vjp(
                lambda a, w: tuple(linear.forward(a, list(w))),
                a_approx.astype(compute_dtype), weights,
            )
            g_a, d_weights = linear_vjp(tuple(grads))
        g_x, d_gamma, d_beta = bn_backward(
            g_a.astype(jnp.float32), saved, params, caps, gamma, beta, inv_std
        )
        return _first_order_only((g_x.astype(compute_dtype), d_gamma, d_beta, d_weights), name)

    @jax.custom_vjp
    def unit(x, gamma, beta, weights):
        return forward(x, gamma, beta, weights)[0]

    unit.defvjp(forward, backward)
    outputs, mean, variance = unit(x, gamma, beta, tuple(weights))
    return list(outputs), jax.lax.stop_gradient(mean), jax.lax.stop_gradient(variance)


def encode_only(x32, mean, inv_std, gamma, beta, params, bits: int, window, custom: bool):
    """The packed codes of `x32` on the BN units' grid, without the unit's
    own output (for the ReLU-only units and ApproxBatchNormalization, which
    compute theirs): the custom calls' bytes, or the jnp quantizer's words."""
    if custom:
        return kernels.encode(x32, mean, inv_std, gamma, beta, params, bits, window, 0.0)[1]
    xhat, on, _ = quantizer.normalize_relu(x32, mean, inv_std, gamma, beta, 0.0)
    return quantizer.pack_words(quantizer.encode_codes(xhat, on, params, bits), bits)


def _second_order_error(name: str) -> NotImplementedError:
    return NotImplementedError(
        f"Second-order gradients through the fused BLPA layer {name!r} are not "
        "supported (a gradient of its gradient: a gradient penalty, nested "
        "jax.grad, a Hessian-vector product). Its backward pass is a first-order "
        "gradient rebuilt from the saved codes, with bits=None too. Build this "
        "part of the model from stock keras.layers.BatchNormalization, ReLU and "
        "Conv2D/Dense layers."
    )


def _no_tangents(tree, name: str):
    """`tree`, unchanged; raises the second-order error where autodiff pushes
    a tangent through it. Guards what the custom calls read: they have no
    differentiation rule, and a `stop_gradient` instead would turn a
    second-order gradient into a silently partial one."""

    @jax.custom_jvp
    def identity(tree):
        return tree

    @identity.defjvp
    def _(primals, tangents):
        raise _second_order_error(name)

    return identity(tree)


def _first_order_only(gradients, name: str):
    """The unit's gradients, unchanged; differentiating them raises.

    JAX would differentiate the hand-written backward itself (the codes are
    integers, so the result would silently miss every path through them): a
    gradient penalty or a Hessian-vector product through the layer gets one
    clear error instead, as on TensorFlow.
    """

    @jax.custom_vjp
    def identity(tree):
        return tree

    def forward(tree):
        return tree, None

    def backward(_, cotangents):
        raise _second_order_error(name)

    identity.defvjp(forward, backward)
    return identity(gradients)


def bn_relu_linear_inference(
    x,
    mean,
    variance,
    gamma,
    beta,
    weights: list,
    *,
    linear: LinearMap,
    bits: int | None,
    naive: bool,
    epsilon: float,
    window: float | None = None,
    negative_slope: float = 0.0,
    max_value: float | None = None,
    name: str = "bn_relu_linear",
) -> list:
    """Forward with given statistics: plain jnp, plain autodiff (as
    `keras_blpa.backend.tensorflow.unit.bn_relu_linear_inference`)."""
    del name
    x32 = x.astype(jnp.float32)
    inv_std = jax.lax.rsqrt(variance + epsilon)
    slope = float(np.float32(negative_slope))
    y = (x32 - mean) * inv_std * gamma + beta
    cap = resolve_max_value(max_value)
    # As stock Keras's ReLU / ReLU(max_value) / LeakyReLU on JAX compute them.
    if cap is not None:
        a = jax.nn.relu6(y) if cap == 6.0 else jnp.clip(jax.nn.relu(y), 0.0, cap)
    else:
        a = jax.nn.leaky_relu(y, slope) if slope else jax.nn.relu(y)
    if naive and bits is not None:
        params = quantizer.quantizer_params(gamma, beta, bits, window, max_value=cap)
        if cap is not None:
            a_quantized = quantizer.quantize_relu_capped(
                x32, mean, inv_std, gamma, beta, params,
                quantizer.cap_params(gamma, beta, params, bits, cap), bits)
        else:
            a_quantized = quantizer.quantize_relu(
                x32, mean, inv_std, gamma, beta, params, bits, negative_slope=slope
            )
        # Straight-through: the quantized value forward, the exact gradient back.
        a = jax.lax.stop_gradient(a_quantized) + (a - jax.lax.stop_gradient(a))
    return linear.forward(a.astype(x.dtype), list(weights))
