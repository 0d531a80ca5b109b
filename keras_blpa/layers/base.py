"""Shared BatchNormalization half of the fused BN -> ReLU -> linear layers."""

from __future__ import annotations

import keras
from keras import constraints, initializers, ops, regularizers

from keras_blpa import backend, grid, validation

_SUPPORTED_DTYPES = ("float16", "bfloat16", "float32")


class BNReLUBase(keras.layers.Layer):
    """Base class: BN parameters and statistics, bits/naive, training logic.

    Subclasses build the linear map's weights in `_build_linear(input_shape)`
    and return a `unit.LinearMap` from `_linear_map()`.
    """

    def __init__(
        self,
        bits: int | None = 4,
        naive: bool = False,
        window: float | None = None,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        data_format: str | None = None,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        synchronized: bool = False,
        negative_slope: float = 0.0,
        max_value: float | None = None,
        **kwargs,
    ):
        backend.check(f"The fused BLPA layer {type(self).__name__}")
        super().__init__(**kwargs)
        grid.check_bits(bits)
        synchronized = validation.boolean("synchronized", synchronized)
        # The kink stays at 0, so the codes and the exact mask are unchanged;
        # only the activation and the gradient of the "off" side scale.
        negative_slope = validation.real("negative_slope", negative_slope, low=0.0)
        # A capped ReLU (ReLU6: 6): a second kink, with its own grid edge.
        max_value = grid.resolve_max_value(max_value, negative_slope)
        naive = validation.boolean("naive", naive)
        if naive and bits is None:
            raise ValueError(
                "`naive=True` quantizes the forward pass and needs `bits` of 4 "
                "or 8; received bits=None."
            )
        grid.check_window(window)
        if window is not None and bits is None:
            raise ValueError(
                "`window` sets the quantizer's range and needs `bits` of 4 or 8; "
                f"received window={window!r} with bits=None."
            )
        data_format = data_format or keras.config.image_data_format()
        if data_format != "channels_last":
            raise ValueError(
                f"`data_format={data_format!r}` is not supported: fused BLPA "
                "layers need channels_last inputs (NHWC). Transpose the input "
                "or set keras.config.set_image_data_format('channels_last')."
            )
        momentum = validation.real("momentum", momentum, low=0.0, high=1.0)
        epsilon = validation.real("epsilon", epsilon, low=0.0, low_open=True)
        if self.dtype_policy.compute_dtype not in _SUPPORTED_DTYPES:
            raise ValueError(
                f"Unsupported dtype policy {self.dtype_policy.name!r}: fused "
                f"BLPA layers compute in one of {_SUPPORTED_DTYPES}."
            )
        self.bits = bits
        self.naive = naive
        # Resolved now so that a saved model keeps its grid if defaults change.
        self.window = None if bits is None else grid.resolve_window(bits, window)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = validation.boolean("center", center)
        self.scale = validation.boolean("scale", scale)
        self.data_format = data_format
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.use_bias = validation.boolean("use_bias", use_bias)
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.kernel_constraint = constraints.get(kernel_constraint)
        self.bias_constraint = constraints.get(bias_constraint)
        # Global batch statistics under a tf.distribute strategy, as in
        # `keras.layers.BatchNormalization(synchronized=True)`.
        self.synchronized = synchronized
        self.negative_slope = negative_slope
        self.max_value = max_value
        self.supports_masking = False

    # Rank and channel checks shared by build and call.
    def _check_input_shape(self, shape) -> int:
        raise NotImplementedError

    def build(self, input_shape):
        channels = self._check_input_shape(input_shape)
        # BN weights stay float32 under mixed precision, as in Keras's BN.
        if self.scale:
            self.gamma = self.add_weight(
                shape=(channels,),
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=(channels,),
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                autocast=False,
            )
        self.moving_mean = self.add_weight(
            shape=(channels,),
            name="moving_mean",
            initializer=self.moving_mean_initializer,
            trainable=False,
            autocast=False,
        )
        self.moving_variance = self.add_weight(
            shape=(channels,),
            name="moving_variance",
            initializer=self.moving_variance_initializer,
            trainable=False,
            autocast=False,
        )
        self._build_linear(input_shape)

    def _build_linear(self, input_shape) -> None:
        raise NotImplementedError

    def _add_kernel(self, shape, name="kernel"):
        return self.add_weight(
            shape=shape,
            name=name,
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )

    def _add_bias(self, units: int) -> None:
        if self.use_bias:
            self.bias = self.add_weight(
                shape=(units,),
                name="bias",
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )

    def _linear_map(self):
        """The backend's linear map (`backend.linear()`) for this layer."""
        raise NotImplementedError

    def _linear_weights(self) -> list:
        """The linear map's weights, in the order its `LinearMap` expects."""
        raise NotImplementedError

    def _prepare_input(self, inputs):
        """Hook: reshape the input before the unit (Dense flattens)."""
        return inputs

    def _finish_outputs(self, outputs: list, inputs):
        """Hook: the layer's return value from the linear map's outputs."""
        return outputs[0]

    def _check_call_shape(self, shape) -> None:
        """The build-time checks, plus, once built, the weights' channel count."""
        channels = self._check_input_shape(shape)
        if not self.built:
            return
        expected = int(self.moving_mean.shape[0])
        if channels != expected:
            raise ValueError(
                f"{self.name} was built for inputs with {expected} channels (the "
                f"last axis) but received {channels}: input shape {tuple(shape)}. "
                "Its weights fix the channel count; build a new layer for this input."
            )

    def call(self, inputs, training=None):
        self._check_call_shape(inputs.shape)
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if dtype not in _SUPPORTED_DTYPES:
            raise ValueError(
                f"Unsupported input dtype {dtype}: {self.name} "
                f"takes one of {_SUPPORTED_DTYPES}; cast the input first."
            )
        x = ops.cast(self._prepare_input(inputs), self.compute_dtype)
        channels = x.shape[-1]
        # BN runs in float32 whatever the layer's dtype (as Keras's BN does for
        # float16 and bfloat16), so its weights are cast, not the statistics.
        gamma = _float32(self.gamma) if self.scale else ops.ones([channels])
        beta = _float32(self.beta) if self.center else ops.zeros([channels])
        weights = [ops.cast(w, self.compute_dtype) for w in self._linear_weights()]
        options = dict(
            linear=self._linear_map(), bits=self.bits, naive=self.naive,
            epsilon=self.epsilon, window=self.window, name=self.name,
            negative_slope=self.negative_slope, max_value=self.max_value,
        )
        unit = backend.unit()
        if training and self.trainable:
            outputs, mean, variance = unit.bn_relu_linear(
                x, gamma, beta, weights, synchronized=self.synchronized, **options
            )
            for stat, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
                updated = _float32(stat) * self.momentum + batch * (1.0 - self.momentum)
                stat.assign(ops.cast(updated, stat.dtype))
        else:
            outputs = unit.bn_relu_linear_inference(
                x,
                _float32(self.moving_mean),
                _float32(self.moving_variance),
                gamma,
                beta,
                weights,
                **options,
            )
        return self._finish_outputs(outputs, inputs)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "bits": self.bits,
                "naive": self.naive,
                "window": self.window,
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "center": self.center,
                "scale": self.scale,
                "beta_initializer": initializers.serialize(self.beta_initializer),
                "gamma_initializer": initializers.serialize(self.gamma_initializer),
                "moving_mean_initializer": initializers.serialize(
                    self.moving_mean_initializer
                ),
                "moving_variance_initializer": initializers.serialize(
                    self.moving_variance_initializer
                ),
                "beta_regularizer": regularizers.serialize(self.beta_regularizer),
                "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
                "beta_constraint": constraints.serialize(self.beta_constraint),
                "gamma_constraint": constraints.serialize(self.gamma_constraint),
                "data_format": self.data_format,
                "use_bias": self.use_bias,
                "kernel_initializer": initializers.serialize(self.kernel_initializer),
                "bias_initializer": initializers.serialize(self.bias_initializer),
                "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": regularizers.serialize(self.bias_regularizer),
                "kernel_constraint": constraints.serialize(self.kernel_constraint),
                "bias_constraint": constraints.serialize(self.bias_constraint),
                "synchronized": self.synchronized,
                "negative_slope": self.negative_slope,
                "max_value": self.max_value,
            }
        )
        return config

    @classmethod
    def from_config(cls, config: dict) -> BNReLUBase:
        if config.get("bits") is not None and "window" not in config:
            # Saved before `window` existed, when every bit width used the
            # paper's grid: keep it (a naive layer's inference depends on it).
            config = {**config, "window": grid.PAPER_WINDOW}
        return super().from_config(config)


def _float32(variable):
    return ops.cast(ops.convert_to_tensor(variable), "float32")
