"""The Dense unit: linear map -> activation, keeping codes only.

Forward (exact): `h = linear(x, weights)`, `outputs = f(h)`: a
`keras.layers.Dense` with its activation. Stock autodiff keeps `x` (for the
weight gradient) and `h` or `f(h)` (for `f'`), 4 bytes an element each in
float32. This unit keeps:

- a `bits`-bit row code of `x` (`codes.encode_rows`) for the weight gradient;
- a `derivative_bits`-bit code of `h` whose level is the backward's `f'(h)`
  (`keras_blpa.transformer.derivative`; exact for ReLU at one bit); none for
  a linear activation.

With `bits=None` it keeps `x` alone and recomputes `h` in the backward: the
stock gradient from one tensor instead of two.

Backward, given the outputs' gradient `g`:

    g_h     = g * level[code(h)]
    dW, g_x = vjp(linear, x_decoded, W)(g_h)
"""

from __future__ import annotations

from collections.abc import Sequence

from keras import ops

from keras_blpa.transformer import codes, derivative
from keras_blpa.transformer.activation_linear import Linear, activation_function


def linear_activation(
    x,
    weights: Sequence,
    *,
    linear: Linear,
    activation: str,
    bits: int | None,
    derivative_bits: int = 3,
    name: str = "linear_activation",
):
    """Training-mode `f(linear(x, weights))` with a codes-only backward.

    Args:
      x: the input, features last (any rank).
      weights: the linear map's weights (kernel, bias).
      linear: `linear(x, *weights) -> [h]`, linear in `x` and in the weights.
      activation: a canonical name of `derivative.SUPPORTED`, or "linear".
      bits: 4 or 8 for the row code of `x`; None for the exact unit.
      derivative_bits: 1 to 4, the derivative code's width (ReLU: 1 is exact).
      name: the layer's name.

    Returns:
      `f(h)`.
    """
    f = activation_function(activation)
    features = x.shape[-1]
    smooth = activation not in ("relu", "linear")
    fit = None if activation == "linear" else derivative.fit(
        activation, derivative_bits if smooth else 1)
    deriv_bits = None if fit is None else max(1, (len(fit.levels) - 1).bit_length())
    x_dtype = x.dtype
    x_shape = ops.shape(x)
    weights = list(weights)
    linear = codes.compute_linear(linear, x_dtype)

    def forward(x, *weights):
        (h,) = linear(x, *weights)
        x_rows = codes.rows(x, features)
        if bits is None:
            saved = [x_rows]
        else:
            saved = codes.encode_rows(ops.cast(x_rows, "float32"), bits)
            if fit is not None:
                h_rows = codes.rows(ops.cast(h, "float32"), h.shape[-1])
                saved.insert(0, codes.pack_derivative(h_rows, fit.edges, deriv_bits))
        codes.record("linear_activation", saved)
        return [f(h)], saved, weights

    def backward(coded, weights, grads):
        (g,) = grads
        rows = ops.shape(coded[-2])[0] if bits is not None else ops.shape(coded[0])[0]
        if bits is None:
            x_now = ops.reshape(coded[0], x_shape)
            (h,) = linear(x_now, *weights)
            (g_h,) = codes.autodiff().vjp(f, [ops.cast(h, "float32")],
                                          ops.cast(g, "float32"))
        else:
            x_now = codes.decode_rows(*coded[-3:], (rows, features), bits)
            x_now = ops.reshape(ops.cast(x_now, x_dtype), x_shape)
            g_h = ops.cast(g, "float32")
            if fit is not None:
                units = g.shape[-1]
                g_h = codes.scale_by_derivative(codes.rows(g_h, units), coded[0], (rows, units),
                                                fit.levels, deriv_bits)
                g_h = ops.reshape(g_h, ops.shape(g))
        g_x, *d_weights = codes.autodiff().vjp(linear, [x_now, *weights],
                                               [ops.cast(g_h, g.dtype)])
        return [g_x, *d_weights]

    (out,) = codes.autodiff().custom_vjp(forward, backward, name)(x, *weights)
    return out
