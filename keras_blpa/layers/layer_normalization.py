"""LayerNormalization that keeps one row code of its normalized input."""

from __future__ import annotations

import keras
from keras import ops

from keras_blpa.transformer import codes
from keras_blpa.transformer.norm_linear import norm_linear


@keras.saving.register_keras_serializable(package="keras_blpa")
class LayerNormalization(keras.layers.LayerNormalization):
    """`keras.layers.LayerNormalization` over the last axis whose training
    step keeps a `bits`-bit code of `xhat` instead of its input.

    Forward (exact): `y = gamma * (x - mean) / sqrt(var + epsilon) + beta`.
    The backward needs only `xhat` and the per-row `1 / sigma`
    (`keras_blpa.transformer.norm_linear`, a norm without heads): this layer
    keeps a row code of `xhat` (8 bits: a quarter of stock's float input)
    and `1 / sigma`. `bits=None` keeps `x` (the exact gradient). Inference
    runs Keras's own code. `keras_blpa.convert` makes the norms around
    converted transformer blocks (an embedding's, a final norm) this layer.

    Example:

    >>> layer = LayerNormalization(bits=8)
    >>> y = layer(keras.ops.ones((2, 3, 8)), training=True)

    Args:
      bits: 4 or 8 for the row code; None keeps the input (exact).
      **kwargs: `keras.layers.LayerNormalization`'s. The axis must be the
        last one and `rms_scaling` off.
    """

    def __init__(self, bits: int | None = 8, **kwargs):
        super().__init__(**kwargs)
        self._init_blpa(bits)
        check_norm(self)

    def _init_blpa(self, bits: int | None) -> None:
        codes.check_bits(bits)
        self.bits = bits

    def call(self, inputs, training=None):
        if not training:
            return super().call(inputs)
        features = inputs.shape[-1]
        gamma = self.gamma if self.gamma is not None else ops.ones((features,))
        beta = self.beta if self.beta is not None else ops.zeros((features,))
        (y,) = norm_linear(ops.cast(inputs, self.compute_dtype), ops.convert_to_tensor(gamma),
                           ops.convert_to_tensor(beta), [], linear=lambda y: [],
                           epsilon=self.epsilon, bits=self.bits, name=self.name)
        return y

    def get_config(self) -> dict:
        return {**super().get_config(), "bits": self.bits}


def check_norm(layer) -> None:
    """A ValueError naming what `layer` uses that the norm unit does not cover."""
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    try:
        rank = len(layer.input.shape)
    except (AttributeError, ValueError):  # never called: only -1 is known to be last
        rank = None
    last = len(axis) == 1 and (axis[0] == -1 or (rank is not None and axis[0] == rank - 1))
    if getattr(layer, "rms_scaling", False) or not last:
        raise ValueError(
            f"{layer.name}: keras_blpa.layers.LayerNormalization normalizes over the last axis "
            f"without rms_scaling; received axis={layer.axis}, "
            f"rms_scaling={getattr(layer, 'rms_scaling', False)}. Keep the stock layer.")
