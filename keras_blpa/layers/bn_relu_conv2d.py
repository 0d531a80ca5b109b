"""BNReLUConv2D: BatchNormalization -> ReLU -> Conv2D as one BLPA unit."""

from __future__ import annotations

import numbers

import keras

from keras_blpa import backend, validation
from keras_blpa.layers.base import BNReLUBase


def _padding(padding):
    """"same", "valid", or explicit `((top, bottom), (left, right))` ints >= 0."""
    if isinstance(padding, str):
        if padding.lower() in ("same", "valid"):
            return padding.lower()
    else:
        def non_negative(v):
            return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0

        if non_negative(padding):
            padding = (padding, padding)
        if isinstance(padding, (tuple, list)) and len(padding) == 2:
            pairs = [(p, p) if non_negative(p) else p for p in padding]
            if all(
                isinstance(p, (tuple, list)) and len(p) == 2 and all(map(non_negative, p))
                for p in pairs
            ):
                return tuple(tuple(int(v) for v in p) for p in pairs)
    raise ValueError(
        "`padding` must be 'same', 'valid' or explicit zero padding "
        "((top, bottom), (left, right)) of non-negative integers; received "
        f"padding={padding!r}."
    )


@keras.saving.register_keras_serializable(package="keras_blpa")
class BNReLUConv2D(BNReLUBase):
    """BatchNormalization -> ReLU -> Conv2D with low-precision saved activations.

    Forward (training), per channel `c` of the input `x`:

        xhat = (x - mean_c) / sqrt(var_c + epsilon)
        a    = relu(gamma_c * xhat + beta_c)
        out  = conv2d(a, kernel) + bias

    at full precision. For the backward pass the layer keeps only a
    `bits`-bit code of `xhat` (packed two per byte at 4 bits) whose grid is
    aligned to the ReLU threshold, so the ReLU mask is exact; the BN input and
    the ReLU output are freed. `bits=None` keeps `xhat` exactly: gradients
    equal those of the stock layers, with one tensor saved instead of several.
    With `training=False` it computes exactly the stock layers' inference.

    Example:

    >>> x = keras.random.normal((2, 8, 8, 16))
    >>> layer = BNReLUConv2D(32, 3, bits=4)
    >>> layer(x, training=True).shape
    TensorShape([2, 8, 8, 32])

    Args:
      filters: number of output channels.
      kernel_size: int or pair, the convolution window.
      strides: int or pair.
      padding: "same" or "valid" (case-insensitive), or explicit zero padding
        of the activation as `((top, bottom), (left, right))` (an int or a
        pair `(rows, columns)` pads symmetrically), then a "valid"
        convolution: a `ZeroPadding2D` between the ReLU and the convolution,
        folded in (TF's "same" pads asymmetrically for even strides).
      bits: 4 or 8 (BLPA), or None (exact `xhat`, no quantization).
      naive: quantize in the forward pass too (the paper's baseline); the
        approximation then also applies with `training=False`.
      window: quantizer range in standard deviations of the BN input
        (None: 6 at 4 bits as in the paper, 12 at 8 bits, where a 6-sigma
        window clips enough large activations to dominate the error). Only
        with `bits` set.
      dilation_rate: int or pair.
      groups: grouped convolution: `filters` and the input channels must be
        divisible by it (as in `keras.layers.Conv2D`).
      use_bias: whether the convolution adds a bias.
      kernel_initializer, bias_initializer, kernel_regularizer,
      bias_regularizer, activity_regularizer, kernel_constraint,
      bias_constraint: as in `keras.layers.Conv2D`.
      momentum, epsilon, center, scale, beta_initializer, gamma_initializer,
      moving_mean_initializer, moving_variance_initializer, beta_regularizer,
      gamma_regularizer, beta_constraint, gamma_constraint: as in
        `keras.layers.BatchNormalization` (same defaults).
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
      data_format: only "channels_last" is supported.
      projection_filters: if set, the layer also returns a bias-free 1x1
        convolution of the same BN-ReLU output with this many filters (a
        pre-activation ResNet's projection shortcut), as `[out, shortcut]`;
        both heads share one saved code, so the shortcut keeps no
        full-precision copy of the activation.
      projection_strides: strides of the projection (default: `strides`).
    """

    def __init__(
        self,
        filters: int,
        kernel_size,
        strides=1,
        padding: str = "same",
        bits: int | None = 4,
        naive: bool = False,
        window: float | None = None,
        dilation_rate=1,
        groups: int = 1,
        projection_filters: int | None = None,
        projection_strides=None,
        **kwargs,
    ):
        super().__init__(bits=bits, naive=naive, window=window, **kwargs)
        self.filters = validation.positive_int("filters", filters)
        self.kernel_size = validation.positive_int_pair("kernel_size", kernel_size)
        self.strides = validation.positive_int_pair("strides", strides)
        self.dilation_rate = validation.positive_int_pair("dilation_rate", dilation_rate)
        padding = _padding(padding)
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError(
                "`strides` > 1 together with `dilation_rate` > 1 is not "
                f"supported; received strides={strides}, dilation_rate={dilation_rate}."
            )
        groups = validation.positive_int("groups", groups)
        if self.filters % groups:
            raise ValueError(
                f"`groups` must divide filters={self.filters}; received groups={groups}."
            )
        self.projection_filters = validation.positive_int(
            "projection_filters", projection_filters, allow_none=True
        )
        self.projection_strides = (
            self.strides if projection_strides is None
            else validation.positive_int_pair("projection_strides", projection_strides)
        )
        self.groups = groups
        self.padding = padding

    def _check_input_shape(self, shape) -> int:
        if len(shape) != 4:
            raise ValueError(
                f"{self.__class__.__name__} expects a 4-D input (batch, height, "
                f"width, channels); received an input of shape {tuple(shape)}."
            )
        if shape[-1] is None:
            raise ValueError("The channel (last) axis of the input must be defined.")
        if self.padding != "same":
            pads = (0, 0) if self.padding == "valid" else [sum(p) for p in self.padding]
            for axis, size, k, d, pad in zip(
                ("height", "width"), shape[1:3], self.kernel_size, self.dilation_rate, pads
            ):
                if size is not None and (k - 1) * d + 1 > size + pad:
                    raise ValueError(
                        f"{self.name}: the kernel (kernel_size={self.kernel_size}, "
                        f"dilation_rate={self.dilation_rate}) is larger than the "
                        f"input's {axis} {size} (input shape {tuple(shape)}) with "
                        f"padding={self.padding!r}, so the output would be empty. Use "
                        "padding='same', a smaller kernel or a larger input."
                    )
        return int(shape[-1])

    def _build_linear(self, input_shape):
        channels = int(input_shape[-1])
        if channels % self.groups:
            raise ValueError(
                f"The input's {channels} channels are not divisible by groups={self.groups}."
            )
        self.kernel = self._add_kernel(
            (*self.kernel_size, channels // self.groups, self.filters)
        )
        if self.projection_filters:
            self.projection_kernel = self._add_kernel(
                (1, 1, channels, self.projection_filters), "projection_kernel"
            )
        self._add_bias(self.filters)

    def _linear_map(self):
        return backend.linear().Conv2DMap(
            self.strides, self.padding, self.dilation_rate, self.use_bias,
            self.projection_strides if self.projection_filters else None,
            groups=self.groups,
        )

    def _linear_weights(self):
        weights = [self.kernel] + ([self.bias] if self.use_bias else [])
        if self.projection_filters:
            weights.append(self.projection_kernel)
        return weights

    def _finish_outputs(self, outputs, inputs):
        return outputs if self.projection_filters else outputs[0]

    def compute_output_shape(self, input_shape):
        # Keras builds symbolic outputs from this, not from `call`.
        self._check_call_shape(input_shape)
        main = self._output_shape(
            input_shape, self.filters, self.kernel_size, self.strides, self.padding,
            self.dilation_rate,
        )
        if not self.projection_filters:
            return main
        projection = self._output_shape(
            input_shape, self.projection_filters, (1, 1), self.projection_strides,
            "valid", (1, 1),
        )
        return [main, projection]

    @staticmethod
    def _output_shape(input_shape, filters, kernel_size, strides, padding, dilations):
        spatial = []
        pads = [sum(p) for p in padding] if not isinstance(padding, str) else (0, 0)
        for size, k, s, d, pad in zip(input_shape[1:3], kernel_size, strides, dilations, pads):
            if size is not None and padding != "same":
                size += pad - (k - 1) * d
            spatial.append(None if size is None else -(-size // s))
        return (input_shape[0], *spatial, filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "padding": (
                    self.padding if isinstance(self.padding, str)
                    else [list(p) for p in self.padding]
                ),
                "dilation_rate": self.dilation_rate,
                "groups": self.groups,
                "projection_filters": self.projection_filters,
                "projection_strides": self.projection_strides,
            }
        )
        return config
