"""Max pooling of a zero-padded input that re-pads in the backward pass
(`keras_blpa.layers.PaddedMaxPooling2D` on TensorFlow)."""

from __future__ import annotations

import tensorflow as tf

from keras_blpa.backend.tensorflow import xla


def padded_max_pool(x, padding, pool_size, strides):
    """`MaxPooling2D(pool_size, strides, "valid")(ZeroPadding2D(padding)(x))`
    whose gradient keeps only `x` and the output, not the padded copy.

    Args:
      x: NHWC input.
      padding: `((top, bottom), (left, right))`.
      pool_size, strides: pairs of ints.
    """
    (top, bottom), (left, right) = padding
    pads = [[0, 0], [top, bottom], [left, right], [0, 0]]
    window, strides = [1, *pool_size, 1], [1, *strides, 1]

    @tf.custom_gradient
    def padded_max_pool_fn(x):
        y = tf.nn.max_pool2d(tf.pad(x, pads), window, strides, "VALID")

        def grad(g):
            # Gated on `g` so that no executor (and no XLA fusion) pads early,
            # nor merges this pad with the forward's and keeps it alive.
            with tf.control_dependencies([g]):
                padded = tf.pad(xla.after(x, g), pads)
            g_padded = tf.raw_ops.MaxPoolGrad(
                orig_input=padded, orig_output=y, grad=g, ksize=window, strides=strides,
                padding="VALID",
            )
            height, width = tf.shape(g_padded)[1], tf.shape(g_padded)[2]
            return g_padded[:, top:height - bottom, left:width - right, :]

        return y, grad

    return padded_max_pool_fn(x)
