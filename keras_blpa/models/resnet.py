"""Pre-activation ResNets (He et al., "Identity Mappings in Deep Residual Networks").

Every BN -> ReLU -> conv unit is one fused `BNReLUConv2D` (BLPA), or, with
`stock=True`, the identical network from stock Keras layers. The projection
shortcut of a block reads the same BN-ReLU output as the block's first conv; in
the fused network it is the first unit's projection head, so it shares that
unit's saved code.
"""

from __future__ import annotations

import keras

from keras_blpa import grid, validation
from keras_blpa.layers import BNReLUConv2D, BNReLUDense

IMAGENET_STAGES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}

# Keras maps a functional graph recursively (`map_graph`, when a model is
# built and again when it is loaded), one Python frame per layer on the
# graph's longest path. Python's default recursion limit is 1000 and nothing
# we depend on raises it (IPython's jedi sets 3000 on import, which hid this),
# so no functional graph we build may hold more than FLAT_LAYER_LIMIT layers:
# the rest of the limit is left to the caller's stack (pytest, a notebook, a
# Keras callback). Above the limit each stage becomes nested functional models
# of whole blocks ("stage1", or "stage1_part1", "stage1_part2", ... when a
# stage alone is too long; the layers inside keep their names), so the
# recursion depth is bounded by the part size at any depth and no limit needs
# raising. Layers are counted as in the stock network (10 a block) for fused
# networks too: `to_standard` expands each fused part into its stock twin,
# which must fit as well, and both networks nest alike. Networks up to
# FLAT_LAYER_LIMIT layers stay flat (depth 164 and ImageNet 152, fused and
# stock), so their layer names and .keras files are unchanged.
FLAT_LAYER_LIMIT = 600
STOCK_LAYERS_PER_BLOCK = 10  # BN, ReLU, conv per unit, three units, the add


class _Builder:
    """Emits fused or stock units with shared settings."""

    def __init__(self, bits, naive, stock, momentum, epsilon, window=None, synchronized=False):
        stock = validation.boolean("stock", stock)
        synchronized = validation.boolean("synchronized", synchronized)
        naive = validation.boolean("naive", naive)
        if stock and naive:
            raise ValueError("`naive=True` needs fused layers; received stock=True.")
        self.bits = bits
        self.naive = naive
        self.window = window
        self.stock = stock
        self.bn = dict(momentum=momentum, epsilon=epsilon, synchronized=synchronized)
        self.conv = dict(use_bias=False, kernel_initializer="he_normal")
        self.nest = False

    def stage(self, x, stage: int, blocks: int, planes: int, strides: int):
        """`blocks` bottleneck blocks, the first with `strides`; with `self.nest`
        set, as nested functional models of at most FLAT_LAYER_LIMIT layers."""
        if not self.nest:
            return self._blocks(x, stage, range(blocks), planes, strides)
        parts = min(blocks, -(-blocks * STOCK_LAYERS_PER_BLOCK // FLAT_LAYER_LIMIT))
        bounds = [blocks * p // parts for p in range(parts + 1)]
        for part in range(parts):
            name = f"stage{stage}" if parts == 1 else f"stage{stage}_part{part + 1}"
            inputs = keras.Input(x.shape[1:], name=f"{name}_input")
            h = self._blocks(inputs, stage, range(bounds[part], bounds[part + 1]), planes,
                             strides)
            x = keras.Model(inputs, h, name=name)(x)
        return x

    def _blocks(self, x, stage, blocks, planes, strides):
        for block in blocks:
            x = self.bottleneck(
                x, planes, strides if block == 0 else 1, name=f"s{stage}b{block + 1}"
            )
        return x

    def unit(self, x, filters, kernel_size, strides=1, projection=None, name=None):
        """BN -> ReLU -> conv; with `projection=(filters, strides)` also the shortcut."""
        if self.stock:
            a = keras.layers.BatchNormalization(**self.bn, name=f"{name}_bn")(x)
            a = keras.layers.ReLU(name=f"{name}_relu")(a)
            out = keras.layers.Conv2D(
                filters, kernel_size, strides=strides, padding="same", **self.conv,
                name=f"{name}_conv",
            )(a)
            if projection is None:
                return out
            shortcut = keras.layers.Conv2D(
                projection[0], 1, strides=projection[1], **self.conv, name=f"{name}_proj"
            )(a)
            return out, shortcut
        layer = BNReLUConv2D(
            filters, kernel_size, strides=strides, padding="same", bits=self.bits,
            naive=self.naive, window=self.window, **self.bn, **self.conv,
            projection_filters=None if projection is None else projection[0],
            projection_strides=None if projection is None else projection[1],
            name=name,
        )
        out = layer(x)
        return tuple(out) if projection is not None else out

    def head(self, x, classes, name="head"):
        """BN -> ReLU -> global average pool -> Dense."""
        if self.stock:
            a = keras.layers.BatchNormalization(**self.bn, name=f"{name}_bn")(x)
            a = keras.layers.ReLU(name=f"{name}_relu")(a)
            a = keras.layers.GlobalAveragePooling2D(name=f"{name}_pool")(a)
            return keras.layers.Dense(classes, name=f"{name}_dense", dtype="float32")(a)
        return BNReLUDense(
            classes, bits=self.bits, naive=self.naive, window=self.window, pooling="avg",
            **self.bn,
            name=name, dtype="float32",
        )(x)

    def bottleneck(self, x, planes, strides, name):
        """Pre-activation bottleneck block: 1x1, 3x3 (strided), 1x1 (4x planes)."""
        in_channels = x.shape[-1]
        out_channels = 4 * planes
        if strides != 1 or in_channels != out_channels:
            h, shortcut = self.unit(
                x, planes, 1, projection=(out_channels, strides), name=f"{name}_1"
            )
        else:
            h, shortcut = self.unit(x, planes, 1, name=f"{name}_1"), x
        h = self.unit(h, planes, 3, strides=strides, name=f"{name}_2")
        h = self.unit(h, out_channels, 1, name=f"{name}_3")
        return keras.layers.Add(name=f"{name}_add")([h, shortcut])


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _check_common(bits, width, classes, input_shape, momentum, epsilon) -> float:
    """Checks shared by the builders (the layers check the rest); the width."""
    grid.check_bits(bits)
    validation.positive_int("classes", classes)
    validation.real("momentum", momentum, low=0.0, high=1.0)
    validation.real("epsilon", epsilon, low=0.0, low_open=True)
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if shape is None or len(shape) != 3 or not all(
        d is None or validation.is_positive_int(d) for d in shape
    ):
        raise ValueError(
            "`input_shape` must be (height, width, channels) with positive integer "
            f"sizes (height and width may be None); received input_shape={input_shape!r}."
        )
    if shape[-1] is None:
        raise ValueError(
            f"`input_shape` needs a defined channel count; received input_shape={shape}."
        )
    return validation.real("width", width, low=0.0, low_open=True)


def preact_resnet_cifar(
    depth: int = 164,
    width: float = 1.0,
    classes: int = 10,
    bits: int | None = 4,
    naive: bool = False,
    window: float | None = None,
    stock: bool = False,
    input_shape: tuple = (32, 32, 3),
    momentum: float = 0.9,
    epsilon: float = 1e-5,
    name: str | None = None,
    synchronized: bool = False,
) -> keras.Model:
    """CIFAR pre-activation bottleneck ResNet of depth `9n + 2` (164, 254, 488, 1001).

    Three stages of `n` bottleneck blocks with 16, 32, 64 planes (times
    `width`; 4x that many output channels), strides 1, 2, 2, after a 3x3
    stem convolution, ending in BN -> ReLU -> average pool -> Dense.

    Args:
      depth: 9n + 2 layers (ResNet-164 has about 1.7M parameters).
      width: channel multiplier: 4 gives the paper's "1001 (4x)", 0.25 its
        "exact with 1/4 of the features" baseline.
      classes: output logits.
      bits: 4, 8 or None (exact) for every fused unit.
      naive: quantize the forward pass too (the paper's baseline).
      window: quantizer range in standard deviations (None: the default for
        `bits`, see `keras_blpa.layers.BNReLUConv2D`).
      stock: build the same network from stock Keras layers instead.
      input_shape: HWC input shape.
      momentum, epsilon: BatchNormalization settings of every unit.
      synchronized: batch statistics over the global batch of a
        `tf.distribute` strategy in every BatchNormalization (fused or
        stock), as `keras.layers.BatchNormalization(synchronized=True)`; no
        effect with one replica.
    """
    width = _check_common(bits, width, classes, input_shape, momentum, epsilon)
    depth = validation.positive_int("depth", depth)
    if depth < 11 or (depth - 2) % 9:
        raise ValueError(
            f"`depth` must be 9n + 2 with n >= 1 (e.g. 164, 254, 488, 1001); received {depth}."
        )
    blocks = (depth - 2) // 9
    builder = _Builder(bits, naive, stock, momentum, epsilon, window, synchronized)
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(
        _scaled(16, width), 3, padding="same", use_bias=False,
        kernel_initializer="he_normal", name="stem",
    )(inputs)
    builder.nest = STOCK_LAYERS_PER_BLOCK * 3 * blocks > FLAT_LAYER_LIMIT
    for stage, (planes, strides) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
        x = builder.stage(x, stage, blocks, _scaled(planes, width), strides)
    outputs = builder.head(x, classes)
    return keras.Model(inputs, outputs, name=name or _model_name("cifar", depth, width, bits,
                                                                naive, stock))


def preact_resnet_imagenet(
    depth: int = 50,
    width: float = 1.0,
    classes: int = 1000,
    bits: int | None = 4,
    naive: bool = False,
    window: float | None = None,
    stock: bool = False,
    input_shape: tuple = (224, 224, 3),
    momentum: float = 0.9,
    epsilon: float = 1e-5,
    name: str | None = None,
    synchronized: bool = False,
) -> keras.Model:
    """ImageNet pre-activation bottleneck ResNet-50/101/152.

    7x7/2 stem convolution, BN, ReLU, 3x3/2 max pool (stock layers: the max
    pool sits between the stem's BN-ReLU and the first conv, so it is not a
    fused unit), then four stages with 64, 128, 256, 512 planes and strides 1,
    2, 2, 2, ending in BN -> ReLU -> average pool -> Dense. Arguments as in
    `preact_resnet_cifar`; `depth` is 50, 101 or 152.
    """
    width = _check_common(bits, width, classes, input_shape, momentum, epsilon)
    if depth not in IMAGENET_STAGES:
        raise ValueError(f"`depth` must be one of {sorted(IMAGENET_STAGES)}; received {depth}.")
    builder = _Builder(bits, naive, stock, momentum, epsilon, window, synchronized)
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(
        _scaled(64, width), 7, strides=2, padding="same", use_bias=False,
        kernel_initializer="he_normal", name="stem",
    )(inputs)
    x = keras.layers.BatchNormalization(**builder.bn, name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    stages = IMAGENET_STAGES[depth]
    builder.nest = STOCK_LAYERS_PER_BLOCK * sum(stages) > FLAT_LAYER_LIMIT
    for stage, (blocks, planes) in enumerate(zip(stages, (64, 128, 256, 512)), start=1):
        x = builder.stage(x, stage, blocks, _scaled(planes, width), 2 if stage > 1 else 1)
    outputs = builder.head(x, classes)
    return keras.Model(inputs, outputs, name=name or _model_name("imagenet", depth, width,
                                                                bits, naive, stock))


def _model_name(kind, depth, width, bits, naive, stock):
    variant = "stock" if stock else ("naive" if naive else "blpa") + f"{bits or 'exact'}"
    suffix = "" if width == 1 else f"_w{width:g}"
    return f"preact_resnet{depth}_{kind}_{variant}{suffix}".replace(".", "p")
