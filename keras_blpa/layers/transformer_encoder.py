"""TransformerEncoder: KerasHub's encoder block, trained with BLPA."""

from __future__ import annotations

import keras
import keras_hub
from keras_hub.src.layers.modeling.transformer_layer_utils import (
    merge_padding_and_attention_mask,
)

from keras_blpa.layers.transformer_block import BLPABlockMixin, check_block, quantized


@keras.saving.register_keras_serializable(package="keras_blpa")
class TransformerEncoder(BLPABlockMixin, keras_hub.layers.TransformerEncoder):
    """`keras_hub.layers.TransformerEncoder` whose training step keeps codes only.

    The same arguments, weights and outputs as KerasHub's block (it is a
    subclass); in training it runs the units of
    `keras_blpa.layers.transformer_block`: the forward is exact, and the
    backward pass reads 8-bit row codes of the norms' and linear maps'
    inputs, a `derivative_bits`-bit code of the activation's derivative, 1-bit
    attention masks and dropout seeds. Inference and
    `return_attention_scores=True` run KerasHub's code unchanged.

    Example:

    >>> block = TransformerEncoder(intermediate_dim=64, num_heads=2, dropout=0.1)
    >>> block(keras.random.normal((2, 8, 32)), training=True).shape
    (2, 8, 32)

    Args:
      intermediate_dim, num_heads, dropout, activation, layer_norm_epsilon,
        kernel_initializer, bias_initializer, normalize_first: as KerasHub's.
        `activation` must be relu, gelu (exact or tanh) or silu.
      bits: 4 or 8, the row codes' width (default 8); None: exact tensors.
      derivative_bits: 1 to 4 (default 3), the activation derivative code.
    """

    def __init__(self, *args, bits: int | None = 8, derivative_bits: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_blpa(bits, derivative_bits)

    def build(self, inputs_shape):
        super().build(inputs_shape)
        check_block(self)

    def call(self, inputs, padding_mask=None, attention_mask=None, training=None,
             return_attention_scores=False):
        if not training or return_attention_scores or quantized(self):
            return super().call(inputs, padding_mask=padding_mask,
                                attention_mask=attention_mask, training=training,
                                return_attention_scores=return_attention_scores)
        mask = merge_padding_and_attention_mask(inputs, padding_mask, attention_mask)
        return self._blpa_forward(inputs, mask)

    def get_config(self):
        return {**super().get_config(), **self._blpa_config()}
