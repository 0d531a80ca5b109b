"""The linear maps of the fused units on JAX: Conv2D and Dense.

The JAX twins of `keras_blpa.backend.tensorflow.linear`, with the same constructor arguments.
A map only computes its forward, `outputs = W(a)`; the unit differentiates it
with `jax.vjp` inside its custom backward, where it is linear in `a` and in
the weights, so XLA keeps only the transposed convolutions and never reruns
the forward one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


class Conv2DMap:
    """Conv2D (+ bias) and an optional 1x1 projection head reading the same `a`.

    Weights: `[kernel, bias?, projection_kernel?, projection_bias?]`. Grouped
    convolutions are inferred from the kernel's input channels, as
    `keras.layers.Conv2D` does.
    """

    def __init__(self, strides, padding, dilation_rate, use_bias, projection_strides,
                 groups: int = 1, projection_use_bias: bool = False):
        del groups  # inferred from the kernel
        self.projection_use_bias = projection_use_bias and projection_strides is not None
        self.strides = tuple(strides)
        self.padding = padding.upper() if isinstance(padding, str) else tuple(
            tuple(p) for p in padding
        )
        self.dilations = tuple(dilation_rate)
        self.use_bias = use_bias
        self.projection_strides = (
            None if projection_strides is None else tuple(projection_strides)
        )

    @staticmethod
    def _conv(a, kernel, strides, padding, dilations):
        return jax.lax.conv_general_dilated(
            a, kernel, strides, padding, rhs_dilation=dilations,
            dimension_numbers=_DIMENSIONS,
            feature_group_count=a.shape[-1] // kernel.shape[2],
        )

    def forward(self, a, weights):
        outputs = [self._conv(a, weights[0], self.strides, self.padding, self.dilations)]
        if self.use_bias:
            outputs[0] = outputs[0] + weights[1]
        if self.projection_strides is not None:
            kernel = weights[2 if self.use_bias else 1]
            outputs.append(self._conv(a, kernel, self.projection_strides, "VALID", (1, 1)))
            if self.projection_use_bias:
                outputs[1] = outputs[1] + weights[-1]
        return outputs


class DenseMap:
    """`a @ kernel (+ bias)` on 2-D `a`, or on the spatial mean of 4-D `a`."""

    def __init__(self, pooled: bool, use_bias: bool):
        self.pooled = pooled
        self.use_bias = use_bias

    def forward(self, a, weights):
        if self.pooled:
            a = jnp.mean(a, axis=(1, 2))
        out = jnp.matmul(a, weights[0])
        return [out + weights[1] if self.use_bias else out]
