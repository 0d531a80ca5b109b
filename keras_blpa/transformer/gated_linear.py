"""The gated MLP unit: `f(gate) * up -> linear`, keeping codes only.

Forward (exact, as KerasHub's Llama / Mistral / Gemma MLPs compute it):

    a       = f(gate) * up               (SwiGLU: f = silu; GeGLU: f = gelu)
    outputs = linear(a, weights)         (the MLP's down projection)

`f` runs in float32 and is cast back to `gate`'s dtype, as KerasHub's Llama
does. Stock autodiff keeps `gate` (for `f'`), `f(gate)` and `up` (for the
product's two gradients) and `a` (for the weight gradient): 16 bytes per
element in float32. This unit keeps:

- a `derivative_bits`-bit code of `gate` whose level is `f'(gate)`
  (`keras_blpa.transformer.derivative`; exact for ReLU at one bit);
- a `bits`-bit row code of `f(gate)` and one of `up` (`codes.encode_rows`):
  2 bytes and 3 bits per element, plus four floats per row, at 8 bits.

Backward, given the outputs' gradients `g`, from the decoded `f(gate)_q`
and `up_q`:

    dW, g_a = vjp(linear, f(gate)_q * up_q, W)(g)
    g_up    = g_a * f(gate)_q
    g_gate  = g_a * up_q * level[code(gate)]

With `bits=None` it keeps `gate` and `up` themselves (in their own dtype)
and rebuilds `f(gate)`, `f'(gate)` and `a` exactly: the stock gradient from
two tensors instead of four.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from keras import ops

from keras_blpa.transformer import codes, derivative
from keras_blpa.transformer.activation_linear import activation_function


def gated_linear(
    gate,
    up,
    weights: Sequence,
    *,
    linear: Callable[..., list],
    activation: str,
    bits: int | None,
    derivative_bits: int = 3,
    dropout: float = 0.0,
    seed=None,
    name: str = "gated_linear",
) -> list:
    """Training-mode `dropout(linear(f(gate) * up, weights))`, codes-only backward.

    Example (SwiGLU, as a Llama MLP computes it after its gate/up heads):

    >>> down = keras.ops.ones((64, 16))
    >>> (out,) = gated_linear(gate, up, [down], linear=lambda a, w: [a @ w],
    ...                       activation="silu", bits=8)

    Args:
      gate: the gate's pre-activation, features last (any rank).
      up: the up projection, of `gate`'s shape and dtype.
      weights: the linear map's weights (kernels, biases).
      linear: `linear(a, *weights) -> [outputs]`, linear in `a` and in the
        weights (Dense / EinsumDense heads).
      activation: a canonical name of `derivative.SUPPORTED` (gelu,
        gelu_tanh, silu, relu).
      bits: 4 or 8 for the row codes of `f(gate)` and `up`; None: exact.
      derivative_bits: 1 to 4, the derivative code's width (ReLU: 1 is exact).
      dropout: dropout rate on every output, its mask redrawn from `seed` in
        the backward pass (not kept).
      seed: two integers (`keras.random.SeedGenerator.next()`), with dropout.
      name: the layer's name.

    Returns:
      the linear map's outputs.
    """
    activation = derivative.check_activation(activation)
    if tuple(gate.shape) != tuple(up.shape):
        raise ValueError(
            f"`gate` and `up` must have the same shape (the product is elementwise); received "
            f"gate.shape={tuple(gate.shape)}, up.shape={tuple(up.shape)}. Give both heads the "
            "same number of units."
        )
    fit = derivative.fit(activation, derivative_bits if activation != "relu" else 1)
    deriv_bits = fit.bits
    f = activation_function(activation)
    features = gate.shape[-1]
    dtype = gate.dtype
    shape = ops.shape(gate)
    weights = list(weights)
    linear = codes.compute_linear(linear, dtype)
    seed = ops.zeros((2,), "int32") if seed is None else seed

    def activate(gate):
        """float32 `f(gate)` of any-dtype `gate`."""
        return f(ops.cast(gate, "float32"))

    def forward(gate, up, seed, *weights):
        f_gate = activate(gate)
        a = ops.cast(f_gate, dtype) * up
        outputs = [codes.dropout(out, seed, dropout) for out in linear(a, *weights)]
        if bits is None:
            saved = [codes.rows(gate, features), codes.rows(up, features)]
        else:
            gate32 = codes.rows(ops.cast(gate, "float32"), features)
            saved = [
                codes.pack_derivative(gate32, fit.edges, deriv_bits),
                *codes.encode_rows(codes.rows(ops.cast(ops.cast(f_gate, dtype), "float32"),
                                              features), bits),
                *codes.encode_rows(codes.rows(ops.cast(up, "float32"), features), bits),
            ]
        codes.record("gated_linear", saved)
        return outputs, saved, [seed, *weights]

    def backward(coded, kept, grads):
        seed, *weights = kept
        grads = [codes.dropout(g, seed, dropout) for g in grads]
        if bits is None:
            gate32 = ops.cast(coded[0], "float32")
            f_gate = ops.cast(ops.cast(activate(gate32), dtype), "float32")
            up = ops.cast(coded[1], "float32")
        else:
            rows = (ops.shape(coded[2])[0], features)  # lo: one per row
            f_gate = codes.decode_rows(*coded[1:4], rows, bits)
            up = codes.decode_rows(*coded[4:7], rows, bits)
        a = ops.reshape(ops.cast(f_gate * up, dtype), shape)
        g_a, *d_weights = codes.autodiff().vjp(linear, [a, *weights], grads)
        g_a = codes.rows(ops.cast(g_a, "float32"), features)
        g_up = g_a * f_gate
        if bits is None:
            (g_gate,) = codes.autodiff().vjp(activate, [gate32], g_a * up)
        else:
            g_gate = codes.scale_by_derivative(g_a * up, coded[0], rows, fit.levels,
                                               deriv_bits)
        return [ops.reshape(ops.cast(g, dtype), shape) for g in (g_gate, g_up)] + [
            None, *d_weights]

    return codes.autodiff().custom_vjp(forward, backward, name)(gate, up, seed, *weights)
