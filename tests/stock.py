"""Stock Keras equivalents of the fused layers, with weights copied across."""

import keras
import numpy as np

import keras_blpa


def randomize_bn(layer, channels, rng):
    """Non-trivial gamma (some negative), beta and moving statistics."""
    if layer.scale:
        layer.gamma.assign(rng.normal(1.0, 0.7, channels).astype("float32"))
    if layer.center:
        layer.beta.assign(rng.normal(0.0, 0.5, channels).astype("float32"))
    layer.moving_mean.assign(rng.normal(0.0, 0.3, channels).astype("float32"))
    layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels).astype("float32"))


class StockUnit:
    """BatchNormalization -> ReLU (leaky with the fused layer's `negative_slope`)
    -> [pool] -> Conv2D/Dense mirroring a fused layer."""

    def __init__(self, fused, input_shape):
        cfg = fused.get_config()
        slope = cfg.get("negative_slope", 0.0)
        cap = cfg.get("max_value")
        self.activation = (
            keras.layers.LeakyReLU(negative_slope=slope) if slope
            else keras.layers.ReLU(max_value=cap)
        )
        self.bn = keras.layers.BatchNormalization(
            momentum=cfg["momentum"], epsilon=cfg["epsilon"], center=cfg["center"],
            scale=cfg["scale"],
        )
        self.zero_pad = None
        if isinstance(fused, keras_blpa.BNReLUConv2D):
            padding = cfg["padding"]
            if not isinstance(padding, str):  # explicit: ZeroPadding2D, then "valid"
                self.zero_pad = keras.layers.ZeroPadding2D([tuple(p) for p in padding])
                padding = "valid"
            self.linear = keras.layers.Conv2D(
                cfg["filters"], cfg["kernel_size"], strides=cfg["strides"],
                padding=padding, dilation_rate=cfg["dilation_rate"],
                groups=cfg["groups"], use_bias=cfg["use_bias"],
            )
            self.pool = None
        else:
            self.linear = keras.layers.Dense(cfg["units"], use_bias=cfg["use_bias"])
            self.pool = (
                keras.layers.GlobalAveragePooling2D() if cfg["pooling"] == "avg" else None
            )
        self.bn.build(input_shape)
        for name in ("gamma", "beta", "moving_mean", "moving_variance"):
            if hasattr(fused, name):
                getattr(self.bn, name).assign(getattr(fused, name))
        linear_in = list(input_shape)
        if self.zero_pad is not None:
            linear_in = list(self.zero_pad.compute_output_shape(tuple(input_shape)))
        if self.pool is not None:
            linear_in = [input_shape[0], input_shape[-1]]
        self.linear.build(tuple(linear_in))
        self.linear.kernel.assign(fused.kernel)
        if cfg["use_bias"]:
            self.linear.bias.assign(fused.bias)

    def __call__(self, x, training):
        a = self.activation(self.bn(x, training=training))
        if self.pool is not None:
            a = self.pool(a)
        if self.zero_pad is not None:
            a = self.zero_pad(a)
        return self.linear(a)

    @property
    def weights(self):
        w = []
        if self.bn.scale:
            w.append(self.bn.gamma)
        if self.bn.center:
            w.append(self.bn.beta)
        w.append(self.linear.kernel)
        if self.linear.use_bias:
            w.append(self.linear.bias)
        return w


def fused_weights(layer):
    w = []
    if layer.scale:
        w.append(layer.gamma)
    if layer.center:
        w.append(layer.beta)
    w.append(layer.kernel)
    if layer.use_bias:
        w.append(layer.bias)
    return w


def cosine(a, b):
    a = np.ravel(np.asarray(a, "float64"))
    b = np.ravel(np.asarray(b, "float64"))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
