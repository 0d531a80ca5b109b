"""The dropout unit: dropout whose backward keeps only its seed.

Forward: `y = where(keep, x / (1 - rate), 0)` with `keep` drawn from `seed`
(`codes.dropout`). Stock dropout keeps its mask (a float on TensorFlow; on
JAX XLA keeps the random bits it drew, 8 bytes an element); this unit keeps
the two-integer seed and draws the same mask again in the backward pass,
once the upstream gradient exists:

    g_x = where(keep, g_y / (1 - rate), 0)
"""

from __future__ import annotations

from keras_blpa.transformer import codes


def dropout(x, seed, rate: float, name: str = "dropout"):
    """Training-mode dropout of `x` at `rate` keeping only `seed` for the backward.

    Args:
      x: any float tensor.
      seed: two integers (a `keras.random.SeedGenerator`'s `next()`).
      rate: the drop probability, in [0, 1).
      name: the layer's name.

    Returns:
      `x` with dropout applied (the mask a pure function of `seed`).
    """
    if not rate:
        return x

    def forward(x, seed):
        return [codes.dropout(x, seed, rate)], [seed], []

    def backward(saved, kept, grads):
        return [codes.dropout(grads[0], saved[0], rate), None]

    return codes.autodiff().custom_vjp(forward, backward, name)(x, seed)[0]
