"""Fused BLPA layers."""

from keras_blpa.layers.bn_relu_conv2d import BNReLUConv2D
from keras_blpa.layers.bn_relu_dense import BNReLUDense

__all__ = ["BNReLUConv2D", "BNReLUDense"]
