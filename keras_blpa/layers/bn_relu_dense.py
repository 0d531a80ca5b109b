"""BNReLUDense: BatchNormalization -> ReLU -> (global average pool) -> Dense."""

from __future__ import annotations

import keras
from keras import ops

from keras_blpa import backend, validation
from keras_blpa.layers.base import BNReLUBase


@keras.saving.register_keras_serializable(package="keras_blpa")
class BNReLUDense(BNReLUBase):
    """BatchNormalization -> ReLU -> Dense with low-precision saved activations.

    Forward (training), per feature `c` of the input `x`:

        xhat = (x - mean_c) / sqrt(var_c + epsilon)
        a    = relu(gamma_c * xhat + beta_c)
        out  = a @ kernel + bias            (pooling=None)
        out  = mean_hw(a) @ kernel + bias   (pooling="avg", 4-D input)

    Statistics are taken over every axis but the last, as in
    `keras.layers.BatchNormalization`. Only a `bits`-bit code of `xhat` is kept
    for the backward pass (see `BNReLUConv2D`). `pooling="avg"` makes the layer
    a pre-activation ResNet's classifier head (BN -> ReLU -> global average
    pool -> Dense).

    Example:

    >>> x = keras.random.normal((4, 8, 8, 64))
    >>> BNReLUDense(10, pooling="avg")(x, training=True).shape
    TensorShape([4, 10])

    Args:
      units: output size.
      bits: 4 or 8 (BLPA), or None (exact `xhat`).
      naive: quantize in the forward pass too (the paper's baseline).
      window: quantizer range in standard deviations of the BN input
        (None: 6 at 4 bits as in the paper, 12 at 8 bits, where a 6-sigma
        window clips enough large activations to dominate the error). Only
        with `bits` set.
      pooling: None, or "avg" to global-average-pool a 4-D input first.
      use_bias, kernel_initializer, bias_initializer, kernel_regularizer,
      bias_regularizer, activity_regularizer, kernel_constraint,
      bias_constraint: as in `keras.layers.Dense`.
      momentum, epsilon, center, scale and the BN initializers, regularizers
        and constraints: as in `keras.layers.BatchNormalization`.
      synchronized: if True, under a `tf.distribute` strategy with several
        replicas, the batch statistics are those of the global batch
        (all-reduced across replicas in the forward pass, and the backward's
        per-channel sums too), as in
        `keras.layers.BatchNormalization(synchronized=True)`: every replica's
        gradients are those of one replica on the concatenated batch. The
        saved codes per replica are unchanged. Outside a strategy, or with
        one replica, the same as False.
      negative_slope: 0 (default) for the ReLU; s > 0 for the leaky ReLU
        `y if y > 0 else s * y`, as `keras.layers.LeakyReLU(negative_slope=s)`.
      max_value: None (default) for no cap; m > 0 caps the ReLU,
        `min(max(y, 0), m)` as `keras.layers.ReLU(max_value=m)` (6 for ReLU6),
        with both kinks' masks exact in the backward. Needs
        `negative_slope=0`. Runs the pure-TF / jnp quantizer for now.
        The kink stays at 0, so the saved codes and the mask are the ReLU's.
    """

    def __init__(
        self,
        units: int,
        bits: int | None = 4,
        naive: bool = False,
        window: float | None = None,
        pooling: str | None = None,
        **kwargs,
    ):
        super().__init__(bits=bits, naive=naive, window=window, **kwargs)
        units = validation.positive_int("units", units)
        if pooling not in (None, "avg"):
            raise ValueError(f"`pooling` must be None or 'avg'; received pooling={pooling!r}.")
        self.units = units
        self.pooling = pooling

    def _check_input_shape(self, shape) -> int:
        if self.pooling == "avg" and len(shape) != 4:
            raise ValueError(
                f"{self.__class__.__name__} with pooling='avg' expects a 4-D input "
                f"(batch, height, width, channels); received shape {tuple(shape)}."
            )
        if len(shape) < 2:
            raise ValueError(
                f"{self.__class__.__name__} expects an input of rank >= 2; "
                f"received shape {tuple(shape)}."
            )
        if shape[-1] is None:
            raise ValueError("The feature (last) axis of the input must be defined.")
        return int(shape[-1])

    def _build_linear(self, input_shape):
        self.kernel = self._add_kernel((int(input_shape[-1]), self.units))
        self._add_bias(self.units)

    def _linear_map(self):
        return backend.linear().DenseMap(pooled=self.pooling == "avg", use_bias=self.use_bias)

    def _linear_weights(self):
        return [self.kernel] + ([self.bias] if self.use_bias else [])

    def _prepare_input(self, inputs):
        # BN statistics over all leading axes equal those of the flattened rows.
        if self.pooling is None and len(inputs.shape) > 2:
            return ops.reshape(inputs, (-1, inputs.shape[-1]))
        return inputs

    def _finish_outputs(self, outputs, inputs):
        if self.pooling is None and len(inputs.shape) > 2:
            return ops.reshape(outputs[0], (*ops.shape(inputs)[:-1], self.units))
        return outputs[0]

    def compute_output_shape(self, input_shape):
        # Keras builds symbolic outputs from this, not from `call`.
        self._check_call_shape(input_shape)
        if self.pooling == "avg":
            return (input_shape[0], self.units)
        return (*input_shape[:-1], self.units)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "pooling": self.pooling,
            }
        )
        return config
