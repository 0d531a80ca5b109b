"""ReLUDense: ReLU -> Dense (no BN in front) as one BLPA unit."""

from __future__ import annotations

import keras

from keras_blpa.layers.bn_relu_dense import BNReLUDense
from keras_blpa.layers.relu_base import ReLUOnlyMixin


@keras.saving.register_keras_serializable(package="keras_blpa")
class ReLUDense(ReLUOnlyMixin, BNReLUDense):
    """ReLU -> Dense with a low-precision saved activation, no BN in front.

    Forward (training): `out = relu(z) @ kernel + bias` at full precision,
    keeping only a `bits`-bit code of `z` for the backward pass, on the
    one-sided per-channel grid of `ReLUConv2D` (`keras_blpa.backend.tensorflow.relu_unit`).
    `pooling="avg"` global-average-pools a 4-D input first: the head of a
    post-activation ResNet (`Add -> ReLU -> GlobalAveragePooling2D ->
    Dense`). With `training=False`, exactly the stock layers.

    Example:

    >>> z = keras.random.normal((2, 4, 4, 16))
    >>> ReLUDense(10, pooling="avg")(z, training=True).shape
    TensorShape([2, 10])

    Args:
      units, pooling, use_bias, kernel_initializer, bias_initializer,
      kernel_regularizer, bias_regularizer, activity_regularizer,
      kernel_constraint, bias_constraint: as in `BNReLUDense`.
      bits, window, return_activation: as in `ReLUConv2D`.
    """
