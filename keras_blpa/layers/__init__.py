"""Fused BLPA layers."""

from keras_blpa.layers.approx_batch_normalization import ApproxBatchNormalization
from keras_blpa.layers.bn_relu_conv2d import BNReLUConv2D
from keras_blpa.layers.bn_relu_dense import BNReLUDense
from keras_blpa.layers.dropout import Dropout
from keras_blpa.layers.layer_normalization import LayerNormalization
from keras_blpa.layers.multi_head_attention import MultiHeadAttention
from keras_blpa.layers.padded_max_pooling2d import PaddedMaxPooling2D
from keras_blpa.layers.relu_conv2d import ReLUConv2D
from keras_blpa.layers.relu_dense import ReLUDense

__all__ = [
    "ApproxBatchNormalization", "BNReLUConv2D", "BNReLUDense", "Dropout", "LayerNormalization",
    "LlamaTransformerDecoder",
    "MistralTransformerDecoder", "MultiHeadAttention", "PaddedMaxPooling2D", "ReLUConv2D",
    "ReLUDense", "TransformerDecoder", "TransformerEncoder",
]

_HUB_BLOCKS = {"TransformerEncoder": "transformer_encoder",
               "TransformerDecoder": "transformer_decoder",
               "LlamaTransformerDecoder": "llama_decoder",
               "MistralTransformerDecoder": "llama_decoder"}


def __getattr__(name: str):
    # KerasHub's blocks need keras-hub (the `hub` extra): imported on first use.
    if name in _HUB_BLOCKS:
        import importlib

        try:
            module = importlib.import_module(f"keras_blpa.layers.{_HUB_BLOCKS[name]}")
        except ImportError as err:
            raise ImportError(
                f"keras_blpa.layers.{name} subclasses keras_hub.layers.{name}; install "
                "keras-hub (pip install 'keras-blpa[hub]')."
            ) from err
        return getattr(module, name)
    raise AttributeError(f"module 'keras_blpa.layers' has no attribute {name!r}")
