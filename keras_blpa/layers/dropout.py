"""Dropout that keeps only its seed for the backward pass."""

from __future__ import annotations

import keras

from keras_blpa.transformer import dropout as dropout_unit


@keras.saving.register_keras_serializable(package="keras_blpa")
class Dropout(keras.layers.Dropout):
    """`keras.layers.Dropout` whose training step keeps no mask.

    In training, `y = where(keep, x / (1 - rate), 0)` with `keep` drawn from
    a fresh seed of the layer's `SeedGenerator`; the backward pass draws the
    same mask again from that seed (`keras_blpa.transformer.dropout`).
    Stock dropout keeps its mask until the backward (a float on TensorFlow;
    on JAX, XLA keeps the random bits, 8 bytes an element). On JAX an
    element is dropped when its 16 random bits fall under
    `round(rate * 2**16)` (a drop probability within 2**-17 of `rate`), on
    TensorFlow when a float uniform falls under `rate`. Inference, `noise_shape`
    and `rate=0` run Keras's own code. The weights, arguments and config are
    Keras's; `keras_blpa.convert` makes the dropouts around converted
    transformer blocks (an embedding's) this layer.

    Example:

    >>> layer = Dropout(0.1)
    >>> y = layer(keras.ops.ones((2, 8)), training=True)
    """

    def call(self, inputs, training=False):
        if not training or not self.rate or self.noise_shape is not None:
            return super().call(inputs, training=training)
        return dropout_unit.dropout(inputs, self.seed_generator.next(), self.rate,
                                    name=self.name)
