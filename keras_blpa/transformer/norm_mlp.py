"""The MLP unit: norm -> Dense -> activation -> Dense, over batch slices.

Forward (exact): `norm_linear` (the norm and the intermediate Dense) then
`activation_linear` (the activation and the output Dense), one after the
other:

    y, h = norm_linear(x; norm -> inner)       one code of the norm's xhat
    out  = dropout(activation_linear(h; f -> outer))   f' code + code of f(h)

It keeps exactly their codes. What it adds is where the 4x-wide tensors
live: `h`, `f(h)` and, in the backward pass, their gradients exist only
inside this one unit, so both passes can run over batch slices, one after
another (`slicing.slice_bounds`, unit "mlp"): each slice's `h` and `f(h)`
are taken, coded and dropped before the next slice's exist, and the backward
decodes and differentiates one slice at a time. Between units only the
1x-wide `y` and `out` travel. The output dropout's mask is drawn whole, as
`activation_linear` draws it, so that one slice gives that unit's numbers.
The weight gradients are summed over slices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from keras import ops

from keras_blpa.transformer import codes
from keras_blpa.transformer.activation_linear import Linear, activation_linear_steps
from keras_blpa.transformer.norm_linear import norm_linear_steps
from keras_blpa.transformer.slicing import slice_bounds


def norm_mlp(
    x,
    gamma,
    beta,
    inner_weights: Sequence,
    outer_weights: Sequence,
    seed,
    *,
    inner: Linear,
    outer: Linear,
    width: int,
    epsilon: float,
    activation: str,
    bits: int | None,
    norm: str = "layer",
    derivative_bits: int = 3,
    dropout: float = 0.0,
    name: str = "norm_mlp",
) -> list:
    """Training-mode `[y, dropout(outer(f(inner(y))))]`, `y = norm(x)`, with
    a codes-only backward and the 4x-wide tensors one batch slice at a time.

    Args:
      x: the input `[batch, ..., features]`.
      gamma, beta: the norm's `[features]` scale and center (`norm_linear`).
      inner_weights, outer_weights: the two linear maps' weights.
      seed: two integers (`keras.random.SeedGenerator.next()`), with dropout;
        None without.
      inner: `inner(y, *inner_weights) -> [h]`.
      outer: `outer(a, *outer_weights) -> [out]`.
      width: `h`'s features (the intermediate size): sets the slices.
      epsilon: the norm's epsilon.
      activation: a canonical name of `derivative.SUPPORTED`.
      bits: 4 or 8 for the row codes; None: exact.
      norm: "layer" or "rms".
      derivative_bits: 1 to 4, the derivative code's width.
      dropout: dropout rate on the output, its mask redrawn from `seed` in the
        backward pass.
      name: the layer's name.

    Returns:
      `[y, out]`: the norm's output (for a residual branch) and the MLP's.
    """
    x_shape = ops.shape(x)
    dtype = x.dtype
    inner_weights, outer_weights = list(inner_weights), list(outer_weights)
    split = len(inner_weights)
    tokens = math.prod(x.shape[1:-1]) if None not in x.shape[1:-1] else None
    bounds = slice_bounds(x_shape[0], None if tokens is None else 4 * tokens * width, "mlp")
    seed = ops.zeros((2,), "int32") if seed is None else seed
    sizes: list[tuple[int, int]] = []  # codes of each slice: (norm's, activation's)

    def steps(first, last):
        shape = x_shape if len(bounds) == 1 else (last - first, *x_shape[1:])
        norm_steps = norm_linear_steps(shape, dtype, linear=inner, epsilon=epsilon,
                                       norm=norm, bits=bits)
        act_steps = activation_linear_steps(
            (*shape[:-1], width), dtype, linear=outer, activation=activation, bits=bits,
            derivative_bits=derivative_bits)
        return norm_steps, act_steps

    def part(t, first, last):
        return t if len(bounds) == 1 else t[first:last]

    def forward(x, gamma, beta, seed, *weights):
        inner_w, outer_w = weights[:split], weights[split:]
        ys, outs, saved = [], [], []
        sizes.clear()
        for first, last in bounds:
            x_now = part(x, first, last)
            if outs:  # the slices run one after another
                (x_now,) = codes.autodiff().after_all([x_now], [outs[-1], *saved])
            (norm_forward, _), (act_forward, _) = steps(first, last)
            (y, h), norm_saved, _ = norm_forward(x_now, gamma, beta, *inner_w)
            (out,), act_saved, _ = act_forward(h, seed, *outer_w)
            ys.append(y)
            outs.append(out)
            saved += [*norm_saved, *act_saved]
            sizes.append((len(norm_saved), len(act_saved)))
        y, out = (t[0] if len(t) == 1 else ops.concatenate(t, axis=0) for t in (ys, outs))
        return [y, codes.dropout(out, seed, dropout)], saved, [gamma, beta, seed, *weights]

    def backward(saved, kept, grads):
        gamma, beta, seed, *weights = kept
        inner_w, outer_w = weights[:split], weights[split:]
        g_y, g_out = grads
        g_out = codes.dropout(g_out, seed, dropout)
        g_xs, sums, at = [], None, 0
        for (first, last), (norm_size, act_size) in zip(bounds, sizes):
            now = [*saved[at: at + norm_size + act_size], part(g_y, first, last),
                   part(g_out, first, last)]
            at += norm_size + act_size
            if sums is not None:  # the slices run one after another
                now = codes.autodiff().after_all(now, [g_xs[-1], *sums])
            norm_saved, act_saved = now[:norm_size], now[norm_size:-2]
            (_, norm_backward), (_, act_backward) = steps(first, last)
            g_h, _, *d_outer = act_backward(act_saved, [seed, *outer_w], [now[-1]])
            g_x, d_gamma, d_beta, *d_inner = norm_backward(
                norm_saved, [gamma, beta, *inner_w], [now[-2], g_h])
            results = [d_gamma, d_beta, *d_inner, *d_outer]
            g_xs.append(g_x)
            sums = results if sums is None else [a + b for a, b in zip(sums, results)]
        g_x = g_xs[0] if len(g_xs) == 1 else ops.concatenate(g_xs, axis=0)
        return [g_x, *sums[:2], None, *sums[2:]]

    return codes.autodiff().custom_vjp(forward, backward, name)(
        x, gamma, beta, seed, *inner_weights, *outer_weights)
