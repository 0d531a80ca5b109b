"""The MLP unit: activation -> linear map, keeping codes only.

Forward (exact): `a = f(h)`, `outputs = linear(a, weights)`. Stock autodiff
keeps `h` (for `f'`) and `a` (for the weight gradient), 8 bytes per element
in float32. This unit keeps:

- a `derivative_bits`-bit code of `h` whose level is the backward's `f'(h)`
  (`keras_blpa.transformer.derivative`; exact for ReLU at one bit);
- a `bits`-bit row code of `a` (`codes.encode_rows`) for the weight gradient.

With `bits=None` it keeps `h` (in its own dtype) and rebuilds `a` and `f'(h)`
exactly: the stock gradient from one tensor instead of two.

Under `mixed_bfloat16` (`h` in bfloat16) `f` and the linear map compute in
`h`'s dtype as Keras's Dense does; the codes are taken from `h` and `a`
cast to float32, and `f'` is applied in float32.

Backward, given the outputs' gradients `g`:

    dW, g_a = vjp(linear, a_decoded, W)(g)
    g_h     = g_a * level[code(h)]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from keras import activations, ops

from keras_blpa.transformer import codes, derivative

Linear = Callable[..., list]


def activation_function(activation: str) -> Callable:
    """The exact forward of a canonical activation name (`derivative.check_activation`)."""
    return {
        "gelu": lambda h: activations.gelu(h, approximate=False),
        "gelu_tanh": lambda h: activations.gelu(h, approximate=True),
        "silu": activations.silu,
        "relu": activations.relu,
        "linear": lambda h: h,
    }[activation]


def activation_linear(
    h,
    weights: Sequence,
    *,
    linear: Linear,
    activation: str,
    bits: int | None,
    derivative_bits: int = 3,
    dropout: float = 0.0,
    seed=None,
    name: str = "activation_linear",
) -> list:
    """Training-mode `dropout(linear(f(h), weights))` with a codes-only backward.

    Args:
      h: the pre-activation, features last (any rank).
      weights: the linear map's weights (kernels, biases).
      linear: `linear(a, *weights) -> [outputs]`, linear in `a` and in the
        weights (Dense / EinsumDense heads).
      activation: a canonical name of `derivative.SUPPORTED`, or "linear"
        (identity: a linear map that keeps a row code of its input only).
      bits: 4 or 8 for the row code of `a`; None for the exact unit.
      derivative_bits: 1 to 4, the derivative code's width (ReLU: 1 is exact).
      dropout: dropout rate on every output, its mask redrawn from `seed` in
        the backward pass (not kept).
      seed: two integers (`keras.random.SeedGenerator.next()`), with dropout.
      name: the layer's name.

    Returns:
      the linear map's outputs.
    """
    forward, backward = activation_linear_steps(
        ops.shape(h), h.dtype, linear=linear, activation=activation, bits=bits,
        derivative_bits=derivative_bits, dropout=dropout)
    seed = ops.zeros((2,), "int32") if seed is None else seed
    return codes.autodiff().custom_vjp(forward, backward, name)(h, seed, *weights)


def activation_linear_steps(h_shape, h_dtype, *, linear: Linear, activation: str,
                            bits: int | None, derivative_bits: int = 3,
                            dropout: float = 0.0) -> tuple[Callable, Callable]:
    """`(forward, backward)` of `activation_linear` on a pre-activation of
    `h_shape` and `h_dtype`, in `autodiff.custom_vjp`'s form (inputs `h,
    seed, *weights`): the steps `norm_mlp` runs slice by slice."""
    f = activation_function(activation)
    features = h_shape[-1]
    smooth = activation not in ("relu", "linear")
    fit = derivative.fit(activation, derivative_bits if smooth else 1) if activation != "linear" \
        else None
    deriv_bits = None if fit is None else max(1, (len(fit.levels) - 1).bit_length())
    linear = codes.compute_linear(linear, h_dtype)

    def forward(h, seed, *weights):
        a = f(h)
        outputs = [codes.dropout(out, seed, dropout) for out in linear(a, *weights)]
        if bits is None:
            saved = [codes.rows(h, features)]
        else:
            saved = codes.encode_rows(codes.rows(ops.cast(a, "float32"), features), bits)
            if fit is not None:
                h32 = codes.rows(ops.cast(h, "float32"), features)
                saved.insert(0, codes.pack_derivative(h32, fit.edges, deriv_bits))
        codes.record("activation_linear", saved)
        return outputs, saved, [seed, *weights]

    def backward(coded, kept, grads):
        seed, *weights = kept
        grads = [codes.dropout(g, seed, dropout) for g in grads]
        if bits is None:
            a = f(coded[0])
        else:
            shape = (ops.shape(coded[-2])[0], features)  # lo: one per row
            a = codes.decode_rows(*coded[-3:], shape, bits)
        a = ops.reshape(ops.cast(a, h_dtype), h_shape)
        g_a, *d_weights = codes.autodiff().vjp(linear, [a, *weights], grads)
        g_a = codes.rows(ops.cast(g_a, "float32"), features)
        if bits is None:
            (g_h,) = codes.autodiff().vjp(f, [ops.cast(coded[0], "float32")], g_a)
        elif fit is None:
            g_h = g_a
        else:
            shape = (ops.shape(coded[-2])[0], features)
            g_h = codes.scale_by_derivative(g_a, coded[0], shape, fit.levels, deriv_bits)
        return [ops.reshape(ops.cast(g_h, h_dtype), h_shape), None, *d_weights]

    return forward, backward
