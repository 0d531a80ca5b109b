"""ApproxBatchNormalization: BN that saves a low-bit code of its input."""

from __future__ import annotations

import keras
from keras import ops

from keras_blpa import backend, grid
from keras_blpa.layers.base import _SUPPORTED_DTYPES, _float32


@keras.saving.register_keras_serializable(package="keras_blpa")
class ApproxBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` whose backward pass reads a
    `bits`-bit code of its normalized input instead of the input itself.

    For the BN that no ReLU follows, such as the one before each residual
    `Add` of a post-activation ResNet (`Conv -> BN -> Add -> ReLU`), whose
    full-precision input stock Keras keeps for the backward pass. Forward,
    weights, moving statistics and inference are exactly stock BN's; in
    training the layer keeps `xhat = (x - mean) / sqrt(var + epsilon)` as a
    code on a centred grid of `window` standard deviations, and the backward
    is BN's,

        g_x = gamma / sqrt(var + epsilon) * (g - mean(g) - xhat * mean(g * xhat)),

    with the decoded `xhat` (bin centres: within half a bin inside the
    window). This goes beyond the BLPA paper; its gradient error is measured
    in `benchmarks/post_activation.py`. A masked call (`mask=...`) runs stock BN.

    Example:

    >>> bn = ApproxBatchNormalization(bits=8)
    >>> y = bn(keras.random.normal((4, 8, 8, 16)), training=True)

    Args:
      bits: 8 (the default) or 4: the code's width; None keeps `xhat`
        exactly (stock BN's gradients and memory).
      window: the grid's range in standard deviations; None for the default
        per bit width (12 at 8 bits, 6 at 4: `keras_blpa.grid.DEFAULT_WINDOW`).
      **kwargs: those of `keras.layers.BatchNormalization` (channels last:
        `axis=-1`; no `renorm`, no `synchronized`).
    """

    def __init__(self, bits: int | None = 8, window: float | None = None, **kwargs):
        grid.check_bits(bits)
        grid.check_window(window)
        axis = kwargs.get("axis", -1)
        if axis != -1:
            raise ValueError(
                f"ApproxBatchNormalization normalizes the channel (last) axis only; received "
                f"axis={axis!r}. Use axis=-1 with channels_last data, or "
                "keras.layers.BatchNormalization."
            )
        for key in ("renorm", "synchronized"):
            if kwargs.get(key):
                raise ValueError(
                    f"ApproxBatchNormalization does not support {key}=True; use "
                    "keras.layers.BatchNormalization for it."
                )
        super().__init__(**kwargs)
        self.bits = bits
        self.window = None if window is None else float(window)

    def build(self, input_shape):
        rank = len(input_shape)
        if rank < 2 or input_shape[-1] is None:
            raise ValueError(
                f"{self.name} needs inputs of rank >= 2 with a known channel (last) axis; "
                f"received input shape {tuple(input_shape)}."
            )
        super().build(input_shape)

    def call(self, inputs, training=None, mask=None):
        if mask is not None or not (training and self.trainable):
            return super().call(inputs, training=training, mask=mask)
        bn_unit = backend.module("bn_unit")
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if dtype not in _SUPPORTED_DTYPES:
            raise ValueError(
                f"Unsupported input dtype {dtype}: {self.name} takes one of "
                f"{_SUPPORTED_DTYPES}; cast the input first."
            )
        channels = inputs.shape[-1]
        gamma = _float32(self.gamma) if self.scale else ops.ones([channels])
        beta = _float32(self.beta) if self.center else ops.zeros([channels])
        outputs, mean, variance = bn_unit.approx_batch_norm(
            inputs, gamma, beta, bits=self.bits, epsilon=self.epsilon, window=self.window,
            name=self.name,
        )
        # The moving averages as keras.layers.BatchNormalization updates them.
        for stat, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
            stat.assign(_float32(stat) * self.momentum + batch * (1.0 - self.momentum))
        return ops.cast(outputs, self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(bits=self.bits, window=self.window)
        return config
