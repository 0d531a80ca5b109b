"""PaddedMaxPooling2D: ZeroPadding2D -> MaxPooling2D without keeping the padded copy."""

from __future__ import annotations

import keras

from keras_blpa import backend


@keras.saving.register_keras_serializable(package="keras_blpa")
class PaddedMaxPooling2D(keras.layers.Layer):
    """`ZeroPadding2D(padding) -> MaxPooling2D(pool_size, strides)` ("valid"),
    bit for bit, whose backward pass re-pads its input instead of keeping the
    padded copy.

    Stock Keras keeps the padded tensor for the max pool's gradient: in the
    stem of ResNet50 or DenseNet121 (`ReLU -> ZeroPadding2D -> MaxPooling2D`)
    that is the largest tensor of the whole network, kept next to the ReLU's
    output, which holds the same numbers. This layer keeps only its input
    and output (which its neighbours keep anyway) and pads again in the
    backward pass: same outputs, same gradients, and the padded copy exists
    only during the pool's own backward. That lowers the peak where the peak
    comes earlier, as in a deep network (ResNet50, 4-bit with bn_bits=8, 64x64:
    2.41-2.53 MiB/sample with the stock pair, 2.05-2.29 with this layer,
    `benchmarks/padded_pool_memory.py`); when the pool's backward itself sets
    the peak (a stem alone) it saves nothing.

    Example:

    >>> pool = PaddedMaxPooling2D(padding=1, pool_size=3, strides=2)
    >>> pool(keras.random.normal((2, 32, 32, 8))).shape
    TensorShape([2, 16, 16, 8])

    Args:
      padding: as in `keras.layers.ZeroPadding2D`: an int, a pair
        `(rows, cols)` or `((top, bottom), (left, right))`.
      pool_size, strides: as in `keras.layers.MaxPooling2D` (`strides=None`:
        `pool_size`); its padding is "valid".
    """

    def __init__(self, padding=1, pool_size=2, strides=None, **kwargs):
        if kwargs.pop("data_format", "channels_last") != "channels_last":
            raise ValueError(
                "PaddedMaxPooling2D takes channels_last inputs only (data_format="
                "'channels_last'); use ZeroPadding2D -> MaxPooling2D for channels_first."
            )
        super().__init__(**kwargs)
        # The stock layers check and normalize the arguments.
        pad, pool = self._stock(padding, pool_size, strides)
        self.padding = tuple(tuple(int(p) for p in pair) for pair in pad.padding)
        self.pool_size = tuple(pool.pool_size)
        self.strides = tuple(pool.strides)
        self.input_spec = keras.layers.InputSpec(ndim=4)

    @staticmethod
    def _stock(padding, pool_size, strides):
        return (keras.layers.ZeroPadding2D(padding),
                keras.layers.MaxPooling2D(pool_size, strides, padding="valid"))

    def build(self, input_shape):
        pass  # no weights

    def call(self, inputs):
        return backend.module("pooling").padded_max_pool(
            inputs, self.padding, self.pool_size, self.strides
        )

    def compute_output_shape(self, input_shape):
        pad, pool = self._stock(self.padding, self.pool_size, self.strides)
        return pool.compute_output_shape(pad.compute_output_shape(input_shape))

    def get_config(self):
        config = super().get_config()
        config.update(padding=self.padding, pool_size=self.pool_size, strides=self.strides)
        return config
