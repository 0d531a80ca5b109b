"""The norm unit: LayerNorm (or RMSNorm) -> linear heads, keeping one code.

Forward (exact, `keras.ops.layer_normalization` over the last axis):

    xhat = (x - mean) * inv,   inv = rsqrt(var + eps)     (RMS: x * rsqrt(mean(x**2) + eps))
    y    = gamma * xhat + beta                            (RMS: gamma * xhat)
    outputs = linear(y, weights)                          (Q, K and V heads, or one Dense)

Stock autodiff keeps `x` (or `xhat`) for the norm and `y` for every head's
weight gradient. The whole backward needs only `xhat` and the per-row `inv`,
so this unit keeps one `bits`-bit row code of `xhat` (`codes.encode_rows`),
shared by the norm's backward and every head, plus `inv`:

    y_q        = gamma * xhat_q + beta
    dW, g_y    = vjp(linear, y_q, W)(g)
    dgamma     = sum(g_y * xhat_q),  dbeta = sum(g_y)
    g_xhat     = gamma * g_y
    g_x        = inv * (g_xhat - mean(g_xhat) - xhat_q * mean(g_xhat * xhat_q))
    (RMS:  g_x = inv * (g_xhat - xhat_q * mean(g_xhat * xhat_q)))

With `bits=None` it keeps `x` itself (in its own dtype: half the bytes of a
float32 `xhat` under `mixed_bfloat16`) and normalizes it again: the exact
gradient. The norm and the codes compute in float32 whatever `x`'s dtype;
`y`, the heads and `g_x` are in `x`'s dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from keras import ops

from keras_blpa.transformer import codes


def norm_linear(
    x,
    gamma,
    beta,
    weights: Sequence,
    *,
    linear: Callable[..., list],
    epsilon: float,
    norm: str = "layer",
    bits: int | None,
    name: str = "norm_linear",
) -> list:
    """Training-mode `linear(norm(x), weights)` keeping a code of `xhat` only.

    Args:
      x: the input, features last (any rank).
      gamma, beta: `[features]` (ones / zeros where the norm has no scale or
        center; beta is unused by "rms").
      weights: the linear map's weights; none for a norm alone.
      linear: `linear(y, *weights) -> [outputs]`, linear in `y` and weights.
      epsilon: the norm's epsilon.
      norm: "layer" (`keras.layers.LayerNormalization` over the last axis) or
        "rms" (`keras.layers.RMSNormalization`: scale only).
      bits: 4 or 8 for the row code of `xhat`; None: exact.
      name: the layer's name.

    Returns:
      `[y, *outputs]`: the norm's output (for a residual branch; its gradient
      is accepted) and the linear map's outputs.
    """
    forward, backward = norm_linear_steps(ops.shape(x), x.dtype, linear=linear,
                                          epsilon=epsilon, norm=norm, bits=bits)
    return codes.autodiff().custom_vjp(forward, backward, name)(x, gamma, beta, *weights)


def norm_linear_steps(x_shape, x_dtype, *, linear: Callable[..., list], epsilon: float,
                      norm: str, bits: int | None) -> tuple[Callable, Callable]:
    """`(forward, backward)` of `norm_linear` on an input of `x_shape` and
    `x_dtype`, in `autodiff.custom_vjp`'s form: the steps `norm_mlp` runs
    slice by slice."""
    features = x_shape[-1]
    rms = norm == "rms"
    linear = codes.compute_linear(linear, x_dtype)

    def normalize(x32):
        if rms:
            inv = ops.rsqrt(ops.mean(ops.square(x32), axis=-1, keepdims=True) + epsilon)
            return x32 * inv, inv
        mean, var = ops.moments(x32, axes=[-1], keepdims=True)
        inv = ops.rsqrt(var + epsilon)
        return (x32 - mean) * inv, inv

    def forward(x, gamma, beta, *weights):
        if rms:
            y = ops.rms_normalization(x, gamma, axis=-1, epsilon=epsilon)
        else:
            y = ops.layer_normalization(x, gamma, beta, axis=-1, epsilon=epsilon)
        y = ops.cast(y, x_dtype)
        outputs = linear(y, *weights)
        x_rows = codes.rows(x, features)
        xhat, inv = normalize(ops.cast(x_rows, "float32"))
        saved = [x_rows] if bits is None else codes.encode_rows(xhat, bits)
        codes.record("norm_linear", [*saved, inv[:, 0]])
        return [y, *outputs], [*saved, inv[:, 0]], [gamma, beta, *weights]

    def backward(saved, kept, grads):
        *coded, inv = saved
        gamma, beta, *weights = kept
        if bits is None:
            xhat = normalize(ops.cast(coded[0], "float32"))[0]
        else:
            xhat = codes.decode_rows(*coded, (ops.shape(inv)[0], features), bits)
        y = xhat * gamma if rms else xhat * gamma + beta
        y = ops.reshape(ops.cast(y, x_dtype), x_shape)
        g_y = ops.cast(grads[0], "float32")
        d_weights = []
        if weights:  # heads; a norm alone keeps its code for its own backward
            g_head, *d_weights = codes.autodiff().vjp(linear, [y, *weights], grads[1:])
            g_y = g_y + ops.cast(g_head, "float32")
        g_y = codes.rows(g_y, features)
        d_gamma = ops.sum(g_y * xhat, axis=0)
        d_beta = ops.zeros_like(beta) if rms else ops.sum(g_y, axis=0)
        g_xhat = g_y * gamma
        proj = ops.mean(g_xhat * xhat, axis=-1, keepdims=True)
        centred = g_xhat if rms else g_xhat - ops.mean(g_xhat, axis=-1, keepdims=True)
        g_x = inv[:, None] * (centred - xhat * proj)
        return [ops.reshape(ops.cast(g_x, x_dtype), x_shape), d_gamma, d_beta, *d_weights]

    return forward, backward
