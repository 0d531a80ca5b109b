"""The linear maps of the fused units on JAX: Conv2D and Dense.

The JAX twins of `keras_blpa.backend.tensorflow.linear`, with the same constructor arguments.
A map only computes its forward, `outputs = W(a)`; the unit differentiates it
with `jax.vjp` inside its custom backward, where it is linear in `a` and in
the weights, so XLA keeps only the transposed convolutions and never reruns
the forward one.

`chunked_gradients` differentiates a map over slices of the batch, so that
the decoded activation and the weight gradient's transposed copies of its
operands are a slice's size (see its docstring).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from keras_blpa.backend.jax import xla

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


DEFAULT_CHUNKS = 4


def weight_gradient_chunks() -> int:
    """Batch slices of the weight gradient on the custom calls:
    `KERAS_BLPA_JAX_WEIGHT_GRADIENT_CHUNKS` (read at trace time), default
    4; 1 differentiates the whole batch at once."""
    value = os.environ.get("KERAS_BLPA_JAX_WEIGHT_GRADIENT_CHUNKS", "").strip()
    if not value:
        return DEFAULT_CHUNKS
    if not value.isdigit() or int(value) < 1:
        raise ValueError(
            f"KERAS_BLPA_JAX_WEIGHT_GRADIENT_CHUNKS={value!r}: use a positive integer "
            f"(1: the whole batch at once; unset: {DEFAULT_CHUNKS})."
        )
    return int(value)


def chunked_gradients(forward: Callable, weights: tuple, grads: tuple,
                      decode_rows: Callable, shape: tuple, dtype, chunks: int):
    """`(g_a, d_weights)` of `outputs = forward(a, weights)` (linear in `a`)
    for the cotangents `grads`, with `a` rebuilt slice by slice.

    `d_weights = sum_i vjp_w(forward(a[i], .))(grads[i])` over `chunks` slices
    `i` of the batch, one after another: `decode_rows(start, stop, gate)`
    rebuilds `a[start:stop]` once `gate` exists, and each slice waits for the
    previous partial sum, so that only one slice's decoded activation (and
    XLA:CPU's transposed copies of it and of its gradient rows) is alive at a
    time instead of the whole batch's. `g_a` (which does not read `a`) is
    computed after the last slice: the full-size `g_a` never lives beside a
    slice's working set. The sum runs in another order than one
    whole-batch convolution: the results agree to float32 rounding.
    """
    batch = shape[0]
    bounds = np.linspace(0, batch, min(chunks, batch) + 1).round().astype(int)
    d_weights, gate = None, grads[0]
    for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        a = decode_rows(start, stop, gate).astype(dtype)
        rows = tuple(xla.after(g[start:stop], gate) for g in grads)
        _, vjp = jax.vjp(lambda w, a=a: tuple(forward(a, list(w))), weights)
        part = vjp(rows)[0]
        d_weights = part if d_weights is None else jax.tree.map(jnp.add, d_weights, part)
        gate = d_weights[0]
    # The input gradient only once the weight gradient is done (gated through
    # the small weights, not the full-size gradient).
    gated = [xla.after(w, gate) for w in weights]
    _, vjp = jax.vjp(lambda a: tuple(forward(a, gated)), jnp.zeros(shape, dtype))
    return vjp(tuple(grads))[0], d_weights
