"""The linear maps of the fused units on TensorFlow: Conv2D and Dense.

A map computes `outputs = W(a)` and its two gradients (`unit.LinearMap`); the
backward uses TF's conv backprop ops, so it never reruns the forward
convolution. The layers describe the map (`BNReLUConv2D._linear_map`); the
JAX backend has its own maps (`keras_blpa.backend.jax.linear`).
"""

from __future__ import annotations

import tensorflow as tf

from keras_blpa.backend.tensorflow import xla


class Conv2DMap:
    """Conv2D (+ bias) and an optional 1x1 projection head reading the same `a`.

    Weights: `[kernel, bias?, projection_kernel?, projection_bias?]`. The
    backward uses the conv backprop ops, so it never reruns the forward
    convolution.

    Explicit padding (`((top, bottom), (left, right))`) zero-pads `a` and runs
    the main head "VALID" on it (the grouped and dilated CPU paths below take
    "SAME" and "VALID" only); the input gradient is cropped back.
    """

    def __init__(self, strides, padding, dilation_rate, use_bias, projection_strides,
                 groups: int = 1, projection_use_bias: bool = False):
        self.strides = [1, *strides, 1]
        self.groups = groups
        if isinstance(padding, str):
            self.padding, self.explicit = padding.upper(), None
        else:
            self.padding, self.explicit = "VALID", [[0, 0], *map(list, padding), [0, 0]]
        self.dilations = [1, *dilation_rate, 1]
        self.use_bias = use_bias
        self.projection_strides = (
            None if projection_strides is None else [1, *projection_strides, 1]
        )
        self.projection_use_bias = projection_use_bias and projection_strides is not None

    def _heads(self, weights):
        """(kernel, strides, padding, dilations) per output."""
        heads = [(weights[0], self.strides, self.padding, self.dilations)]
        if self.projection_strides is not None:
            kernel = weights[2 if self.use_bias else 1]
            heads.append((kernel, self.projection_strides, "VALID", [1, 1, 1, 1]))
        return heads

    def _biased(self) -> list[bool]:
        """Whether each output adds a bias (its weight follows the head's kernel)."""
        heads = 1 + (self.projection_strides is not None)
        return [self.use_bias, self.projection_use_bias][:heads]

    def _head_groups(self, head: int) -> int:
        return self.groups if head == 0 else 1  # the projection is never grouped

    def _pad(self, a, head: int):
        """`a` as the head reads it: zero-padded for the explicitly padded main head."""
        return a if head or self.explicit is None else tf.pad(a, self.explicit)

    def forward(self, a, weights):
        outputs = [
            conv_forward(self._pad(a, i), k, s, p, d, self._head_groups(i))
            for i, (k, s, p, d) in enumerate(self._heads(weights))
        ]
        bias_at = 1
        for i, biased in enumerate(self._biased()):
            if biased:
                outputs[i] = tf.nn.bias_add(outputs[i], weights[bias_at])
            bias_at += 1 + biased
        return outputs

    def grad_weights(self, a, grads, weights):
        d_kernels = [
            pointwise_grad_filter(self._pad(a, i), k, g, s)
            if is_pointwise(a, k, d) and xla.in_xla_context()
            else conv_grad_filter(self._pad(a, i), k, g, s, p, d, self._head_groups(i))
            for i, ((k, s, p, d), g) in enumerate(zip(self._heads(weights), grads))
        ]
        d_weights = []
        for d_kernel, g, biased in zip(d_kernels, grads, self._biased()):
            d_weights.append(d_kernel)
            if biased:
                axes = list(range(g.shape.rank - 1))
                d_bias = tf.reduce_sum(tf.cast(g, tf.float32), axes)
                d_weights.append(tf.cast(d_bias, weights[len(d_weights)].dtype))
        return d_weights

    def grad_input(self, weights, grads, a_shape):
        g_a = None
        for i, ((k, s, p, d), g) in enumerate(zip(self._heads(weights), grads)):
            if i == 0 and self.explicit is not None:
                # The padded input's gradient, cropped to `a`'s own pixels.
                (top, bottom), (left, right) = self.explicit[1:3]
                padded = a_shape + tf.constant([0, top + bottom, left + right, 0], a_shape.dtype)
                term = conv_grad_input(padded, k, g, s, p, d, self.groups)[
                    :, top : top + a_shape[1], left : left + a_shape[2], :
                ]
            elif s == [1, 1, 1, 1] and is_pointwise(g, k, d, channels=-2) and xla.in_xla_context():
                # The same flattened `g` as the filter gradient's matmul: XLA
                # then keeps one copy of it, not one per product.
                term = tf.reshape(
                    tf.matmul(pixels(g), k[0, 0], transpose_b=True), a_shape
                )
            else:
                term = conv_grad_input(a_shape, k, g, s, p, d, self._head_groups(i))
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


# Grouped convolutions. TF's CPU kernels support groups only through oneDNN,
# which TF enables on some x86 CPUs and not others (not on AMD EPYC):
# elsewhere Conv2DBackpropFilter/Input refuse grouped shapes, and in graphs
# grappler's Conv2D + BiasAdd fusion refuses them in the forward, for stock
# Keras layers too. Outside XLA a grouped convolution therefore runs per
# group, and a depthwise one (one input channel per group, as `convert` makes
# from DepthwiseConv2D) through the depthwise ops, which every device
# supports. XLA lowers grouped convolutions itself.


def conv_forward(a, kernel, strides, padding, dilations, groups: int = 1):
    """`tf.nn.conv2d`, grouped convolutions included."""
    if groups == 1 or xla.in_xla_context():
        return tf.nn.conv2d(a, kernel, strides, padding, dilations=dilations)
    if _depthwise(kernel, dilations, groups):
        return tf.nn.depthwise_conv2d(
            a, tf.reshape(kernel, _depthwise_kernel_shape(kernel, groups)), strides, padding
        )
    return tf.concat(
        [
            tf.nn.conv2d(a_i, k_i, strides, padding, dilations=dilations)
            for a_i, k_i in zip(tf.split(a, groups, -1), tf.split(kernel, groups, -1))
        ],
        -1,
    )


def _depthwise_kernel_shape(kernel, groups: int) -> list[int]:
    # Grouped kernel [kh, kw, 1, groups * m]: output f = c * m + j is
    # depthwise channel c, multiplier j.
    kh, kw, _, filters = kernel.shape
    return [kh, kw, groups, filters // groups]


def _depthwise(kernel, dilations, groups: int) -> bool:
    return kernel.shape[2] == 1 and groups > 1 and list(dilations) == [1, 1, 1, 1]


def conv_grad_filter(a, kernel, g, strides, padding, dilations, groups: int = 1):
    """`Conv2DBackpropFilter` of `a`, grouped and dilated convolutions included."""
    if xla.in_xla_context() or (groups == 1 and not _dilated(dilations)):
        return tf.raw_ops.Conv2DBackpropFilter(
            input=a, filter_sizes=tf.shape(kernel), out_backprop=g, strides=strides,
            padding=padding, dilations=dilations,
        )
    if _depthwise(kernel, dilations, groups):
        d_kernel = tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
            input=a, filter_sizes=_depthwise_kernel_shape(kernel, groups), out_backprop=g,
            strides=strides, padding=padding,
        )
        return tf.reshape(d_kernel, kernel.shape)
    kernels = tf.split(kernel, groups, -1)
    return tf.concat(
        [
            _grad_filter_one(a_i, k_i, g_i, strides, padding, dilations)
            for a_i, k_i, g_i in zip(tf.split(a, groups, -1), kernels, tf.split(g, groups, -1))
        ],
        -1,
    )


def conv_grad_input(input_sizes, kernel, g, strides, padding, dilations, groups: int = 1):
    """`Conv2DBackpropInput` into `input_sizes` (NHWC), grouped and dilated
    convolutions included."""
    if xla.in_xla_context() or (groups == 1 and not _dilated(dilations)):
        return tf.raw_ops.Conv2DBackpropInput(
            input_sizes=input_sizes, filter=kernel, out_backprop=g, strides=strides,
            padding=padding, dilations=dilations,
        )
    if _depthwise(kernel, dilations, groups):
        return tf.raw_ops.DepthwiseConv2dNativeBackpropInput(
            input_sizes=input_sizes,
            filter=tf.reshape(kernel, _depthwise_kernel_shape(kernel, groups)),
            out_backprop=g, strides=strides, padding=padding,
        )
    sizes = tf.concat([input_sizes[:-1], [input_sizes[-1] // groups]], 0)
    return tf.concat(
        [
            _grad_input_one(sizes, k_i, g_i, strides, padding, dilations)
            for k_i, g_i in zip(tf.split(kernel, groups, -1), tf.split(g, groups, -1))
        ],
        -1,
    )


# Dilated convolutions. TF's CPU Conv2DBackpropFilter/Input refuse dilations
# without oneDNN ("Current CPU implementations do not yet support dilation
# rates larger than 1"); `tf.nn.convolution`, which stock Keras layers call,
# runs them through space-to-batch, whose gradients every device has. Outside
# XLA a dilated head's gradients are therefore those of `tf.nn.convolution`;
# in a graph the unused forward product is pruned.


def _dilated(dilations) -> bool:
    return list(dilations) != [1, 1, 1, 1]


def _convolution_vjp(a, kernel, g, strides, padding, dilations, wrt_kernel: bool):
    with tf.GradientTape() as tape:
        tape.watch(kernel if wrt_kernel else a)
        out = tf.nn.convolution(a, kernel, strides[1:3], padding, dilations=dilations[1:3])
    return tape.gradient(out, kernel if wrt_kernel else a, output_gradients=g)


def _grad_filter_one(a, kernel, g, strides, padding, dilations):
    if _dilated(dilations):
        return _convolution_vjp(a, kernel, g, strides, padding, dilations, True)
    return tf.raw_ops.Conv2DBackpropFilter(
        input=a, filter_sizes=tf.shape(kernel), out_backprop=g, strides=strides,
        padding=padding, dilations=dilations,
    )


def _grad_input_one(input_sizes, kernel, g, strides, padding, dilations):
    if _dilated(dilations):
        # The input gradient is linear in `g` alone: any input of the right shape.
        a = tf.zeros(input_sizes, g.dtype)
        return _convolution_vjp(a, kernel, g, strides, padding, dilations, False)
    return tf.raw_ops.Conv2DBackpropInput(
        input_sizes=input_sizes, filter=kernel, out_backprop=g, strides=strides,
        padding=padding, dilations=dilations,
    )


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
