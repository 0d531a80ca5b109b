"""The linear maps of the fused units on TensorFlow: Conv2D and Dense.

A map computes `outputs = W(a)` and its two gradients (`unit.LinearMap`); the
backward uses TF's conv backprop ops, so it never reruns the forward
convolution. The layers describe the map (`BNReLUConv2D._linear_map`); the
JAX backend has its own maps (`keras_blpa.jax_backend.linear`).
"""

from __future__ import annotations

import tensorflow as tf

from keras_blpa import xla


class Conv2DMap:
    """Conv2D (+ bias) and an optional 1x1 projection head reading the same `a`.

    Weights: `[kernel, bias?, projection_kernel?]`. The backward uses the conv
    backprop ops, so it never reruns the forward convolution.

    Explicit padding (`((top, bottom), (left, right))`) zero-pads `a` and runs
    the main head "VALID" on it (TF's "EXPLICIT" padding has no grouped CPU
    kernel for the filter gradient); the input gradient is cropped back.
    """

    def __init__(self, strides, padding, dilation_rate, use_bias, projection_strides):
        self.strides = [1, *strides, 1]
        if isinstance(padding, str):
            self.padding, self.explicit = padding.upper(), None
        else:
            self.padding, self.explicit = "VALID", [[0, 0], *map(list, padding), [0, 0]]
        self.dilations = [1, *dilation_rate, 1]
        self.use_bias = use_bias
        self.projection_strides = (
            None if projection_strides is None else [1, *projection_strides, 1]
        )

    def _heads(self, weights):
        """(kernel, strides, padding, dilations) per output."""
        heads = [(weights[0], self.strides, self.padding, self.dilations)]
        if self.projection_strides is not None:
            heads.append((weights[-1], self.projection_strides, "VALID", [1, 1, 1, 1]))
        return heads

    def _pad(self, a, head: int):
        """`a` as the head reads it: zero-padded for the explicitly padded main head."""
        return a if head or self.explicit is None else tf.pad(a, self.explicit)

    def forward(self, a, weights):
        outputs = [
            tf.nn.conv2d(self._pad(a, i), k, s, p, dilations=d)
            for i, (k, s, p, d) in enumerate(self._heads(weights))
        ]
        if self.use_bias:
            outputs[0] = tf.nn.bias_add(outputs[0], weights[1])
        return outputs

    def grad_weights(self, a, grads, weights):
        d_kernels = [
            pointwise_grad_filter(self._pad(a, i), k, g, s)
            if is_pointwise(a, k, d) and xla.in_xla_context()
            else tf.raw_ops.Conv2DBackpropFilter(
                input=self._pad(a, i), filter_sizes=tf.shape(k), out_backprop=g,
                strides=s, padding=p, dilations=d,
            )
            for i, ((k, s, p, d), g) in enumerate(zip(self._heads(weights), grads))
        ]
        if self.use_bias:
            axes = list(range(grads[0].shape.rank - 1))
            d_bias = tf.reduce_sum(tf.cast(grads[0], tf.float32), axes)
            d_kernels.insert(1, tf.cast(d_bias, weights[1].dtype))
        return d_kernels

    def grad_input(self, weights, grads, a_shape):
        g_a = None
        for i, ((k, s, p, d), g) in enumerate(zip(self._heads(weights), grads)):
            if i == 0 and self.explicit is not None:
                # The padded input's gradient, cropped to `a`'s own pixels.
                (top, bottom), (left, right) = self.explicit[1:3]
                padded = a_shape + tf.constant([0, top + bottom, left + right, 0], a_shape.dtype)
                term = tf.raw_ops.Conv2DBackpropInput(
                    input_sizes=padded, filter=k, out_backprop=g, strides=s, padding=p,
                    dilations=d,
                )[:, top : top + a_shape[1], left : left + a_shape[2], :]
            elif s == [1, 1, 1, 1] and is_pointwise(g, k, d, channels=-2) and xla.in_xla_context():
                # The same flattened `g` as the filter gradient's matmul: XLA
                # then keeps one copy of it, not one per product.
                term = tf.reshape(
                    tf.matmul(pixels(g), k[0, 0], transpose_b=True), a_shape
                )
            else:
                term = tf.raw_ops.Conv2DBackpropInput(
                    input_sizes=a_shape, filter=k, out_backprop=g, strides=s, padding=p,
                    dilations=d,
                )
            g_a = term if g_a is None else g_a + term
        return g_a


class DenseMap:
    """`a @ kernel (+ bias)` on 2-D `a`, or on the spatial mean of 4-D `a`.

    Weights: `[kernel, bias?]`.
    """

    def __init__(self, pooled: bool, use_bias: bool):
        self.pooled = pooled
        self.use_bias = use_bias

    def _pool(self, a):
        return tf.reduce_mean(a, axis=[1, 2]) if self.pooled else a

    def forward(self, a, weights):
        out = tf.matmul(self._pool(a), weights[0])
        return [tf.nn.bias_add(out, weights[1]) if self.use_bias else out]

    def grad_weights(self, a, grads, weights):
        d_weights = [tf.matmul(self._pool(a), grads[0], transpose_a=True)]
        if self.use_bias:
            d_bias = tf.reduce_sum(tf.cast(grads[0], tf.float32), 0)
            d_weights.append(tf.cast(d_bias, weights[1].dtype))
        return d_weights

    def grad_input(self, weights, grads, a_shape):
        g_a = tf.matmul(grads[0], weights[0], transpose_b=True)
        if not self.pooled:
            return g_a
        area = tf.cast(a_shape[1] * a_shape[2], g_a.dtype)
        return tf.broadcast_to((g_a / area)[:, None, None, :], a_shape)


def is_pointwise(t, kernel, dilations, channels: int = -1) -> bool:
    """A 1x1 kernel whose `channels` axis spans all of `t`'s channels (no
    groups) and no dilation."""
    return (
        tuple(kernel.shape[:2]) == (1, 1)
        and kernel.shape[channels] == t.shape[-1]
        and list(dilations) == [1, 1, 1, 1]
    )


def pixels(t):
    """`t` as a `[pixels, channels]` matrix (a free reshape of NHWC)."""
    return tf.reshape(t, [-1, t.shape[-1]])


def pointwise_grad_filter(a, kernel, g, strides):
    """Weight gradient of a 1x1 convolution as one matrix product.

    Under XLA:CPU a convolution's filter gradient is canonicalized with
    full-size transposed copies of `a` and `g`; a matmul over the flattened
    pixels reads both in place (faster, and those copies dominated the
    backward's working set in a bottleneck ResNet). With a 1x1 kernel, SAME
    and VALID padding both sample `a` at every `stride`-th pixel from 0.
    """
    if strides[1:3] != [1, 1]:
        a = a[:, :: strides[1], :: strides[2], :]
    d_kernel = tf.matmul(pixels(a), pixels(g), transpose_a=True)
    return tf.reshape(d_kernel, tf.shape(kernel))
