"""The ReLU -> linear unit without a BN in front (post-activation ResNets).

In a post-activation ResNet each block ends `Conv -> BN -> Add -> ReLU`, and
the ReLU's output `a = relu(z)` feeds the next block's convolutions (which
save it for their weight gradients) and its identity shortcut. `relu_linear`
computes `a` and the convolutions at full precision and keeps only a
`bits`-bit code of `z` for the backward pass, from which it rebuilds the
mask `z > 0` and an approximation of `a`.

There is no BN statistic to set the grid, so each training step sets it from
the batch's own moments of `z`, per channel: the grid's lowest edge sits one
bin below 0 and its top at `max(mean, 0) + window/2 * std`, so that all but
one of its `2**bits` bins cover `0 <= z <= top`. Why the batch's moments:
they cost one pass over `z`, need no state (a running estimate would lag
after each weight update and needs warm-up), and are the same choice BN
units make with their normalized input (`window` standard deviations). Why
one-sided: below 0 the backward needs only the mask, so bins there would be
wasted; at 4 bits this is 15 levels for the positive part instead of 8.

The codes are those of the BN units (`_Codes`: the compiled op outside XLA,
uint32 words under XLA), fed `z` with the grid's offset and scale as the BN
statistics, so `y = (z - m) * s / s + m` is `z` up to float32 rounding: the
mask rebuilt from the codes is `y > 0`, which can differ from `z > 0` only
for `z` within a few float32 ulps of the grid's offset `m` (about `1e-7 *
top`), where the activation is 0 to that precision anyway.
"""

from __future__ import annotations

import tensorflow as tf

from keras_blpa import grid
from keras_blpa.backend.tensorflow import quantizer, xla
from keras_blpa.backend.tensorflow.unit import LinearMap, _Codes, _first_order_only

try:  # Internal API, used only to save memory in eager mode (as in `unit`).
    from tensorflow.python.eager import record as _record
except ImportError:  # pragma: no cover - other TF versions
    _record = None


def relu_grid(z32: tf.Tensor, bits: int, window: float | None):
    """`(mean, inv_std, gamma, beta)` that make the BN units' encoder quantize
    `z` on its one-sided grid (see the module docstring), float32 `[C]`."""
    window = grid.resolve_window(bits, window)
    half, w = window / 2, grid.bin_width(bits, window)
    mu, variance = tf.nn.moments(z32, list(range(z32.shape.rank - 1)))
    top = tf.maximum(mu, 0.0) + half * tf.sqrt(variance)
    top = tf.maximum(top, 1e-30)  # an all-zero channel
    # xhat = (z - m) * s maps 0 to -half + w (the threshold edge one bin above
    # the grid's bottom) and top to half.
    scale = (window - w) / top
    offset = top - half / scale
    return offset, scale, 1.0 / scale, offset


def relu_linear(
    z: tf.Tensor,
    weights: list[tf.Tensor],
    *,
    linear: LinearMap,
    bits: int | None,
    window: float | None = None,
    return_activation: bool = False,
    name: str = "relu_linear",
) -> list[tf.Tensor]:
    """Training-mode forward of ReLU -> linear that saves only codes of `z`.

    Args:
      z: input, channels last, in the compute dtype.
      weights: the linear map's weights in the compute dtype.
      linear: the linear map.
      bits: 4 or 8, or None (keep `relu(z)` exactly: gradients equal stock's).
      window: grid range in standard deviations of `z` (None: the default for
        `bits`, `grid.DEFAULT_WINDOW`).
      return_activation: also return `relu(z)` (exact) as the last output,
        for readers that keep nothing for their backward pass (an `Add`);
        its gradient joins the linear map's in the backward.
      name: the layer's name, for the error on second-order gradients.

    Returns:
      The linear map's outputs, then `relu(z)` if `return_activation`.
    """
    compute_dtype = z.dtype

    def unit(*inputs):
        z, *weights = (tf.stop_gradient(t) for t in inputs)
        z32 = tf.cast(z, tf.float32)
        a = tf.nn.relu(z32)
        z_shape = tf.shape(z)
        if bits is None:
            saved = tf.cast(a, compute_dtype)
        else:
            mean, inv_std, gamma, beta = relu_grid(z32, bits, window)
            params = quantizer.quantizer_params(gamma, beta, bits, window)
            codes = _Codes(bits, params, z_shape, 0.0)
            _, saved = codes.encode(z32, mean, inv_std, gamma, beta)
            if codes.words:
                a = xla.tie(a, saved)  # keeps XLA from re-deriving the codes later
        saved, a = xla.optimization_barrier(saved, a)
        with tf.control_dependencies([saved]):
            a = tf.cast(a, compute_dtype)
            outputs = linear.forward(a, weights)
        specs = [(tf.shape(out), out.dtype) for out in outputs]
        results = [*outputs, a] if return_activation else outputs

        def decode_relu(saved_now):
            if bits is None:
                return saved_now
            return tf.cast(codes.decode_relu(saved_now, gamma, beta), compute_dtype)

        def grad(*upstream):
            grads = [
                tf.zeros(shape, dtype) if g is None else g
                for g, (shape, dtype) in zip(upstream[: len(specs)], specs)
            ]
            saved_now, *grads = xla.optimization_barrier(xla.after(saved, grads[0]), *grads)
            with tf.control_dependencies(grads):
                a_approx = decode_relu(saved_now)
            d_weights = linear.grad_weights(a_approx, grads, weights)
            del a_approx
            with tf.control_dependencies(d_weights):
                weights_now = [xla.after(w, d_weights[0]) for w in weights]
                g_a = linear.grad_input(weights_now, grads, z_shape)
            if return_activation and upstream[len(specs)] is not None:
                g_a = g_a + tf.cast(upstream[len(specs)], g_a.dtype)
            with tf.control_dependencies([g_a]):
                # The first on-bin decodes half a bin above 0: `a > 0` is the mask.
                on = decode_relu(saved_now) > 0
            g_z = tf.where(on, g_a, tf.zeros_like(g_a))
            return _first_order_only([tf.cast(g_z, compute_dtype), *d_weights], name)

        return results, grad

    inputs = [z, *weights]
    if tf.executing_eagerly() and _record is not None:
        # As in `unit.bn_relu_linear`: keep only `grad`'s captures on the tape.
        results, grad = unit(*inputs)
        _record.record_operation("ReLULinear", list(results), inputs, grad)
        return list(results)
    return list(tf.custom_gradient(lambda *t: (lambda r, g: (tuple(r), g))(*unit(*t)))(*inputs))


def relu_linear_inference(
    z: tf.Tensor, weights: list[tf.Tensor], *, linear: LinearMap,
    return_activation: bool = False, **_,
) -> list[tf.Tensor]:
    """Forward of ReLU -> linear in plain ops (inference; plain autodiff)."""
    a = tf.nn.relu(z)
    outputs = linear.forward(a, weights)
    return [*outputs, a] if return_activation else outputs
