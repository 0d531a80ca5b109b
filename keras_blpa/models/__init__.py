"""The paper's networks: pre-activation ResNets built from fused BLPA units."""

from keras_blpa.models.resnet import preact_resnet_cifar, preact_resnet_imagenet

__all__ = ["preact_resnet_cifar", "preact_resnet_imagenet"]
