"""ReLUConv2D: ReLU -> Conv2D (no BN in front) as one BLPA unit."""

from __future__ import annotations

import keras

from keras_blpa import backend, validation
from keras_blpa.layers.bn_relu_conv2d import BNReLUConv2D
from keras_blpa.layers.relu_base import ReLUOnlyMixin


@keras.saving.register_keras_serializable(package="keras_blpa")
class ReLUConv2D(ReLUOnlyMixin, BNReLUConv2D):
    """ReLU -> Conv2D with a low-precision saved activation, no BN in front.

    Forward (training), for the input `z`:

        a   = relu(z)
        out = conv2d(a, kernel) + bias

    at full precision. For the backward pass the layer keeps only a
    `bits`-bit code of `z` on a per-channel grid set from the batch's own
    moments (`keras_blpa.backend.tensorflow.relu_unit`): its lowest edge one bin below 0, its
    top at `max(mean, 0) + window/2 * std`. The mask `z > 0` and an
    approximation of `a` are rebuilt from the codes. This is the ReLU after
    a post-activation ResNet's residual add (`Conv -> BN -> Add -> ReLU`),
    whose output feeds the next block's convolutions and its shortcut:
    `return_activation=True` also returns `a` (exact) for the shortcut's
    `Add`, which keeps nothing for its backward pass. `bits=None` keeps `a`
    exactly (gradients equal stock's). With `training=False`, exactly
    `keras.layers.ReLU()` then `keras.layers.Conv2D`.

    Example:

    >>> z = keras.random.normal((2, 8, 8, 16))
    >>> out, a = ReLUConv2D(32, 1, return_activation=True)(z, training=True)
    >>> out.shape, a.shape
    (TensorShape([2, 8, 8, 32]), TensorShape([2, 8, 8, 16]))

    Args:
      filters, kernel_size, strides, padding, dilation_rate, groups,
      use_bias, kernel_initializer, bias_initializer, kernel_regularizer,
      bias_regularizer, activity_regularizer, kernel_constraint,
      bias_constraint: as in `BNReLUConv2D` and `keras.layers.Conv2D`.
      bits: 4 or 8 (BLPA), or None (exact `relu(z)`).
      window: the grid's range in standard deviations of `z` (None: 6 at 4
        bits, 12 at 8 bits, as for the BN units). Only with `bits` set.
      projection_filters, projection_strides: a 1x1 projection head reading
        the same activation (returned after the main output), as in
        `BNReLUConv2D`.
      projection_use_bias: whether the projection head adds its own bias
        (post-activation ResNets' shortcut convolutions have one).
      return_activation: also return `relu(z)`, last.
      data_format: only "channels_last" is supported.
    """

    def __init__(self, filters: int, kernel_size, *args,
                 projection_use_bias: bool = False, **kwargs):
        super().__init__(filters, kernel_size, *args, **kwargs)
        self.projection_use_bias = validation.boolean(
            "projection_use_bias", projection_use_bias
        )
        if self.projection_use_bias and not self.projection_filters:
            raise ValueError(
                "`projection_use_bias=True` needs a projection head (`projection_filters`)."
            )

    def _build_linear(self, input_shape):
        super()._build_linear(input_shape)
        if self.projection_use_bias:
            self.projection_bias = self.add_weight(
                shape=(self.projection_filters,), name="projection_bias",
                initializer=self.bias_initializer, regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )

    def _linear_map(self):
        return backend.linear().Conv2DMap(
            self.strides, self.padding, self.dilation_rate, self.use_bias,
            self.projection_strides if self.projection_filters else None,
            groups=self.groups, projection_use_bias=self.projection_use_bias,
        )

    def _linear_weights(self):
        weights = super()._linear_weights()
        return weights + ([self.projection_bias] if self.projection_use_bias else [])

    def get_config(self):
        return {**super().get_config(), "projection_use_bias": self.projection_use_bias}
