"""Fused BLPA layers."""

from keras_blpa.layers.approx_batch_normalization import ApproxBatchNormalization
from keras_blpa.layers.bn_relu_conv2d import BNReLUConv2D
from keras_blpa.layers.bn_relu_dense import BNReLUDense
from keras_blpa.layers.padded_max_pooling2d import PaddedMaxPooling2D
from keras_blpa.layers.relu_conv2d import ReLUConv2D
from keras_blpa.layers.relu_dense import ReLUDense

__all__ = [
    "ApproxBatchNormalization", "BNReLUConv2D", "BNReLUDense", "PaddedMaxPooling2D", "ReLUConv2D",
    "ReLUDense",
]
