"""TransformerDecoder: KerasHub's decoder block, trained with BLPA."""

from __future__ import annotations

import keras
import keras_hub

from keras_blpa.layers.transformer_block import BLPABlockMixin, check_block, quantized


@keras.saving.register_keras_serializable(package="keras_blpa")
class TransformerDecoder(BLPABlockMixin, keras_hub.layers.TransformerDecoder):
    """`keras_hub.layers.TransformerDecoder` whose training step keeps codes only.

    A subclass of KerasHub's block with the same arguments, weights and
    outputs (GPT-2, OPT). In training, without cross-attention and without a
    cache, it runs the units of `keras_blpa.layers.transformer_block` (see
    `TransformerEncoder`); cached decoding (`generate`), inference and blocks
    with cross-attention run KerasHub's code unchanged.

    Example:

    >>> block = TransformerDecoder(intermediate_dim=64, num_heads=2,
    ...                            normalize_first=True)
    >>> block(keras.random.normal((2, 8, 32)), training=True).shape
    (2, 8, 32)

    Args:
      intermediate_dim, num_heads, dropout, activation, layer_norm_epsilon,
        kernel_initializer, bias_initializer, normalize_first: as KerasHub's.
      bits, derivative_bits: as `TransformerEncoder`.
    """

    def __init__(self, *args, bits: int | None = 8, derivative_bits: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_blpa(bits, derivative_bits)

    def build(self, decoder_sequence_shape, encoder_sequence_shape=None):
        super().build(decoder_sequence_shape, encoder_sequence_shape)
        check_block(self)

    def call(self, decoder_sequence, encoder_sequence=None, decoder_padding_mask=None,
             decoder_attention_mask=None, encoder_padding_mask=None,
             encoder_attention_mask=None, self_attention_cache=None,
             self_attention_cache_update_index=None, cross_attention_cache=None,
             cross_attention_cache_update_index=None, use_causal_mask=True, training=None):
        stock = (not training or encoder_sequence is not None
                 or self._cross_attention_layer is not None or self_attention_cache is not None
                 or quantized(self))
        if stock:
            return super().call(
                decoder_sequence, encoder_sequence=encoder_sequence,
                decoder_padding_mask=decoder_padding_mask,
                decoder_attention_mask=decoder_attention_mask,
                encoder_padding_mask=encoder_padding_mask,
                encoder_attention_mask=encoder_attention_mask,
                self_attention_cache=self_attention_cache,
                self_attention_cache_update_index=self_attention_cache_update_index,
                cross_attention_cache=cross_attention_cache,
                cross_attention_cache_update_index=cross_attention_cache_update_index,
                use_causal_mask=use_causal_mask, training=training)
        mask = self._compute_self_attention_mask(
            decoder_sequence=decoder_sequence, decoder_padding_mask=decoder_padding_mask,
            decoder_attention_mask=decoder_attention_mask, use_causal_mask=use_causal_mask,
            self_attention_cache=None, self_attention_cache_update_index=None)
        return self._blpa_forward(decoder_sequence, mask)

    def get_config(self):
        return {**super().get_config(), **self._blpa_config()}
