"""BatchNormalization whose backward pass reads a low-bit code of its input.

A post-activation ResNet block ends `Conv -> BN -> Add -> ReLU`: that BN has
no ReLU after it, so it is no BLPA unit, and stock Keras keeps its
full-precision input (4C channels, against C inside the block) for the
backward pass. `approx_batch_norm` computes the forward exactly as
`keras.layers.BatchNormalization` does and keeps only a `bits`-bit code of
the normalized input `xhat`, from which the backward rebuilds an
approximate `xhat`:

    g_x = gamma * inv_std * (g - mean(g) - xhat * mean(g * xhat))
    d_gamma = sum(g * xhat),  d_beta = sum(g)

This is beyond the BLPA paper, which approximates only what a ReLU follows,
so layers offer it as an option and `benchmarks/post_activation.py` measures its
gradient error.

The codes are the BN units' (`unit._Codes`: the compiled op outside XLA,
uint32 words under XLA), on the centred grid `[-window/2, window/2)` that a
BN unit gives a channel whose ReLU is on over the whole window: the encoder
is fed `gamma = 1` and `beta = window`, which makes every channel such a
channel, so its mask is constant and the backward is BN's alone.
"""

from __future__ import annotations

import tensorflow as tf

from keras_blpa import grid
from keras_blpa.backend.tensorflow import quantizer, xla
from keras_blpa.backend.tensorflow.unit import _Codes, _first_order_only

try:  # Internal API, used only to save memory in eager mode (as in `unit`).
    from tensorflow.python.eager import record as _record
except ImportError:  # pragma: no cover - other TF versions
    _record = None


def centred_grid(channels: int, bits: int, window: float | None):
    """`(params, gamma, beta)` for the encoder: the centred grid of
    `window` standard deviations with a constant-on mask, per channel."""
    window = grid.resolve_window(bits, window)
    gamma = tf.ones([channels], tf.float32)
    beta = tf.fill([channels], window)  # y = xhat + window > 0 over the window
    return quantizer.quantizer_params(gamma, beta, bits, window), gamma, beta


def approx_batch_norm(
    x: tf.Tensor,
    gamma: tf.Tensor,
    beta: tf.Tensor,
    *,
    bits: int | None,
    epsilon: float,
    window: float | None = None,
    name: str = "approx_batch_norm",
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Training-mode BN (batch statistics) that saves only codes of `xhat`.

    Args:
      x: input, channels last (any float dtype; BN runs in float32).
      gamma, beta: float32 `[C]` (ones / zeros when BN has no scale / center).
      bits: 4 or 8, or None (keep `xhat` exactly: gradients equal stock's).
      epsilon: BN's epsilon.
      window: grid range in standard deviations of the input (None: the
        default for `bits`, `grid.DEFAULT_WINDOW`).
      name: the layer's name, for the error on second-order gradients.

    Returns:
      `(y, mean, variance)`: float32 `y`, bit for bit stock BN's, and the
      batch moments (float32 `[C]`, no gradient) for the moving averages.
    """
    axes = list(range(x.shape.rank - 1))
    channels = quantizer._channel_count(x)
    dtype = x.dtype  # `grad` must not capture `x` itself: it would stay alive

    def unit(x, gamma, beta):
        x, gamma, beta = (tf.stop_gradient(t) for t in (x, gamma, beta))
        x32 = tf.cast(x, tf.float32)
        mean, variance = tf.nn.moments(x32, axes)
        # As `keras.layers.BatchNormalization` computes it on this backend.
        y = tf.nn.batch_normalization(x32, mean, variance, beta, gamma, epsilon)
        inv_std = tf.math.rsqrt(variance + epsilon)
        x_shape = tf.shape(x)
        if bits is None:
            saved = (x32 - mean) * inv_std
        else:
            params, ones, offset = centred_grid(channels, bits, window)
            codes = _Codes(bits, params, x_shape, 0.0)
            _, saved = codes.encode(x32, mean, inv_std, ones, offset)
            if codes.words:
                y = xla.tie(y, saved)  # keeps XLA from re-deriving the codes later
        saved, y = xla.optimization_barrier(saved, y)

        def grad(g_y, *_):
            g_y = tf.cast(g_y, tf.float32)
            saved_now, g_y = xla.optimization_barrier(xla.after(saved, g_y), g_y)
            if bits is None:
                on = tf.ones_like(saved_now, tf.bool)
                g_x, d_gamma, d_beta = quantizer.relu_bn_backward(
                    g_y, saved_now, on, gamma, inv_std
                )
            else:
                g_x, d_gamma, d_beta = codes.decode_bn_backward(g_y, saved_now, gamma, inv_std)
            return _first_order_only([tf.cast(g_x, dtype), d_gamma, d_beta], name)

        return (y, mean, variance), grad

    inputs = [x, gamma, beta]
    if tf.executing_eagerly() and _record is not None:
        # As in `unit.bn_relu_linear`: keep only `grad`'s captures on the tape.
        results, grad = unit(*inputs)
        _record.record_operation("ApproxBatchNorm", [results[0]], inputs, grad)
    else:
        results = tf.custom_gradient(unit)(*inputs)
    y, mean, variance = results
    return y, tf.stop_gradient(mean), tf.stop_gradient(variance)
