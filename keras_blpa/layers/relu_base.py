"""Shared half of the ReLU -> linear layers (no BN in front)."""

from __future__ import annotations

import keras
from keras import ops

from keras_blpa import backend

# The BN half's arguments, which these layers do not take.
_BN_ONLY = (
    "naive", "momentum", "epsilon", "center", "scale", "beta_initializer",
    "gamma_initializer", "moving_mean_initializer", "moving_variance_initializer",
    "beta_regularizer", "gamma_regularizer", "beta_constraint", "gamma_constraint",
    "synchronized", "negative_slope", "max_value",
)
_SUPPORTED_DTYPES = ("float16", "bfloat16", "float32")


class ReLUOnlyMixin:
    """ReLU -> linear on top of a fused BN layer class: the linear half of
    that class (weights, shapes, maps), without BatchNormalization.

    In training the unit is the backend's `relu_unit.relu_linear` (TensorFlow
    or JAX), whose grid comes from the batch's moments of the input; in
    inference, plain ops.
    """

    def __init__(self, *args, return_activation: bool = False, **kwargs):
        refused = sorted(k for k in kwargs if k in _BN_ONLY)
        if refused:
            raise ValueError(
                f"{type(self).__name__} has no BatchNormalization (nor a leaky or capped "
                f"ReLU, nor a naive mode); it takes no {', '.join(map(repr, refused))}. "
                f"Use BN{type(self).__name__} for BN -> ReLU -> linear."
            )
        if not isinstance(return_activation, bool):
            raise ValueError(
                f"`return_activation` must be True or False; received {return_activation!r}."
            )
        super().__init__(*args, **kwargs)
        self.return_activation = return_activation

    def build(self, input_shape):
        self._channels = self._check_input_shape(input_shape)
        self._build_linear(input_shape)

    def _check_call_shape(self, shape) -> None:
        channels = self._check_input_shape(shape)
        if self.built and channels != self._channels:
            raise ValueError(
                f"{self.name} was built for inputs with {self._channels} channels (the "
                f"last axis) but received {channels}: input shape {tuple(shape)}. "
                "Its weights fix the channel count; build a new layer for this input."
            )

    def call(self, inputs, training=None):
        relu_unit = backend.module("relu_unit")
        self._check_call_shape(inputs.shape)
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if dtype not in _SUPPORTED_DTYPES:
            raise ValueError(
                f"Unsupported input dtype {dtype}: {self.name} "
                f"takes one of {_SUPPORTED_DTYPES}; cast the input first."
            )
        z = ops.cast(self._prepare_input(inputs), self.compute_dtype)
        weights = [ops.cast(w, self.compute_dtype) for w in self._linear_weights()]
        options = dict(linear=self._linear_map(), return_activation=self.return_activation)
        if training and self.trainable:
            outputs = relu_unit.relu_linear(
                z, weights, bits=self.bits, window=self.window, name=self.name, **options
            )
        else:
            outputs = relu_unit.relu_linear_inference(z, weights, **options)
        if not self.return_activation:
            return self._finish_outputs(outputs, inputs)
        *outputs, activation = outputs
        finished = self._finish_outputs(outputs, inputs)
        activation = ops.reshape(activation, ops.shape(inputs))
        return [*finished, activation] if isinstance(finished, list) else [finished, activation]

    def compute_output_shape(self, input_shape):
        shapes = super().compute_output_shape(input_shape)
        if not self.return_activation:
            return shapes
        shapes = shapes if isinstance(shapes, list) else [shapes]
        return [*shapes, tuple(input_shape)]

    def get_config(self):
        config = super().get_config()
        for key in _BN_ONLY:
            config.pop(key, None)
        config["return_activation"] = self.return_activation
        return config
