"""Fused BLPA layers."""

from keras_blpa.layers.approx_batch_normalization import ApproxBatchNormalization
from keras_blpa.layers.bn_relu_conv2d import BNReLUConv2D
from keras_blpa.layers.bn_relu_dense import BNReLUDense
from keras_blpa.layers.dense import Dense
from keras_blpa.layers.dropout import Dropout
from keras_blpa.layers.layer_normalization import LayerNormalization
from keras_blpa.layers.multi_head_attention import MultiHeadAttention
from keras_blpa.layers.padded_max_pooling2d import PaddedMaxPooling2D
from keras_blpa.layers.relu_conv2d import ReLUConv2D
from keras_blpa.layers.relu_dense import ReLUDense

__all__ = [
    "ApproxBatchNormalization", "BNReLUConv2D", "BNReLUDense", "Dense", "Dropout",
    "GemmaDecoderBlock", "LayerNormalization",
    "LlamaTransformerDecoder",
    "MistralTransformerDecoder", "MultiHeadAttention", "PaddedMaxPooling2D",
    "QwenTransformerDecoder", "ReLUConv2D", "ReLUDense", "TransformerDecoder", "TransformerEncoder",
]

_HUB_BLOCKS = {"TransformerEncoder": "transformer_encoder",
               "TransformerDecoder": "transformer_decoder",
               "LlamaTransformerDecoder": "llama_decoder",
               "MistralTransformerDecoder": "llama_decoder",
               "QwenTransformerDecoder": "llama_decoder",
               "GemmaDecoderBlock": "gemma_decoder"}


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


def _register_hub_blocks() -> None:
    """Imports the KerasHub block subclasses when keras-hub is installed, so
    that their Keras registrations exist before a `.keras` file naming them
    loads in a fresh process (Keras imports modules by name only for its own
    packages). Without keras-hub, or with one that fails to import, they stay
    lazy: `__getattr__` raises the error on first use."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("keras_hub") is None:
        return
    for module in sorted(set(_HUB_BLOCKS.values())):
        try:
            importlib.import_module(f"keras_blpa.layers.{module}")
        except Exception:  # noqa: BLE001 - any failure: leave the error to first use
            return


_register_hub_blocks()
