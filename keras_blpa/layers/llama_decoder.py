"""Llama's, Mistral's and Qwen's decoder blocks, trained with BLPA.

KerasHub's `LlamaTransformerDecoder`, `MistralTransformerDecoder` and
`QwenTransformerDecoder` share one structure (RMSNorm, rotary embeddings,
grouped-query attention, a SwiGLU MLP; Qwen: biases on q, k and v). Their
BLPA subclasses run the training forward through the transformer units,
reading the block's own sublayers' weights:

    q, k, v = norm_linear(x; RMSNorm -> query/key/value)     one code of xhat
    q, k    = rope(q), rope(k)          stock ops: linear, autodiff keeps cos/sin
    x      += attention_linear(q, k, v -> output)           codes of q (rotated),
                                                             k (rotated, kv heads), v
    gate, up = norm_linear(x; RMSNorm -> gate/up Dense)      one code of xhat
    x      += gated_linear(f(gate) * up -> down Dense)       f' code, codes of f(gate), up

Dropout (the attention's, on the output projection's input, and the
residual branch's) is redrawn from a seed in the backward pass. Inference
and cached decoding (`generate`) run KerasHub's code unchanged.

KerasHub exports these blocks only under `keras_hub.src.models`: they are
imported here alone (`convert` skips them when this import fails).
"""

from __future__ import annotations

import keras
from keras import ops
from keras_hub.src.models.llama.llama_decoder import (
    LlamaTransformerDecoder as StockLlamaDecoder,
)
from keras_hub.src.models.mistral.mistral_transformer_decoder import (
    MistralTransformerDecoder as StockMistralDecoder,
)
from keras_hub.src.models.qwen.qwen_decoder import QwenTransformerDecoder as StockQwenDecoder

from keras_blpa.layers.transformer_block import (
    BLPABlockMixin,
    activation_name,
    heads,
    quantized,
)
from keras_blpa.transformer.attention_linear import attention_linear
from keras_blpa.transformer.gated_linear import gated_linear
from keras_blpa.transformer.norm_linear import norm_linear


def _key_first(equation: str) -> str:
    """`"q,k->s"` as `"k,q->s"` (`attention_linear` takes the key first)."""
    inputs, output = equation.split("->")
    query, key = inputs.split(",")
    return f"{key},{query}->{output}"


class BLPADecoderMixin(BLPABlockMixin):
    """What the BLPA subclasses of KerasHub's RMSNorm decoder blocks share
    (Llama's here, Gemma's in `keras_blpa.layers.gemma_decoder`): `bits` and
    `derivative_bits`, the check once built, the config, the dropout seed
    and the norms' weights.

    Args (beside the KerasHub block's own):
      bits: 4 or 8, the row codes' width; None keeps the exact tensors (the
        stock gradient, less memory than stock).
      derivative_bits: 1 to 4, the width of the gate activation's derivative code.
    """

    def __init__(self, *args, bits: int | None = 8, derivative_bits: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_blpa(bits, derivative_bits)

    def build(self, input_shape):
        super().build(input_shape)
        self._check_blpa()

    def get_config(self):
        return {**super().get_config(), **self._blpa_config()}

    def _check_norms(self, norms) -> None:
        for norm in norms:
            if not isinstance(getattr(norm, "scale", None), keras.Variable) \
                    or not hasattr(norm, "epsilon"):
                raise ValueError(
                    f"{self.name}: the BLPA block needs an RMS norm with `scale` and "
                    f"`epsilon`; {norm.name} is a {type(norm).__name__}. Keep the stock block.")

    @staticmethod
    def _rms_weights(norm) -> tuple:
        """`(gamma, beta)` of the norm unit for an RMS norm that scales by `scale`."""
        scale = ops.convert_to_tensor(norm.scale)
        return scale, ops.zeros_like(scale)


class BLPALlamaMixin(BLPADecoderMixin):
    """The BLPA training forward of a Llama-style block (module docstring)."""

    def call(self, decoder_sequence, decoder_padding_mask=None, decoder_attention_mask=None,
             self_attention_cache=None, self_attention_cache_update_index=None, training=None):
        if not training or self_attention_cache is not None or quantized(self):
            return super().call(
                decoder_sequence, decoder_padding_mask=decoder_padding_mask,
                decoder_attention_mask=decoder_attention_mask,
                self_attention_cache=self_attention_cache,
                self_attention_cache_update_index=self_attention_cache_update_index,
                training=training)
        mask = self._compute_self_attention_mask(
            decoder_sequence=decoder_sequence, decoder_padding_mask=decoder_padding_mask,
            decoder_attention_mask=decoder_attention_mask, self_attention_cache=None,
            self_attention_cache_update_index=None)
        return self._blpa_forward(decoder_sequence, mask)

    def _check_blpa(self) -> None:
        """A ValueError naming what the block uses that the units do not cover."""
        activation_name(self.activation)
        self._check_norms((self._self_attention_layernorm, self._feedforward_layernorm))

    def _dropout_layers(self) -> tuple:
        return (self._self_attention_layer._dropout_layer, self._self_attention_dropout)

    def _blpa_forward(self, x, mask):
        x = ops.cast(x, self.compute_dtype)  # as `__call__` (not `stateless_call`) does
        attention = self._self_attention_layer
        ln1, ln2 = self._self_attention_layernorm, self._feedforward_layernorm
        qkv_weights, qkv = heads(
            [attention._query_dense, attention._key_dense, attention._value_dense])
        out_weights, out = heads([attention._output_dense])
        gate_up_weights, gate_up = heads(
            [self._feedforward_gate_dense, self._feedforward_intermediate_dense])
        down_weights, down = heads([self._feedforward_output_dense])
        bits, name = self.bits, self.name

        _, q, k, v = norm_linear(x, *self._rms_weights(ln1), qkv_weights, linear=qkv,
                                 epsilon=ln1.epsilon, norm="rms", bits=bits, name=name)
        rope = attention.rotary_embedding_layer
        q, k = rope(q, start_index=0), rope(k, start_index=0)
        (attended,) = attention_linear(
            q, k, v, mask, self._seed(), out_weights, linear=out,
            scale=attention._inv_norm_factor,
            dot_equation=_key_first(attention._dot_product_equation),
            combine_equation=attention._combine_equation, attention_dropout=0.0,
            projection_dropout=attention._dropout_layer.rate,
            dropout=self._self_attention_dropout.rate, bits=bits, name=name)
        x = x + attended
        _, gate, up = norm_linear(x, *self._rms_weights(ln2), gate_up_weights, linear=gate_up,
                                  epsilon=ln2.epsilon, norm="rms", bits=bits, name=name)
        (mlp,) = gated_linear(gate, up, down_weights, linear=down,
                              activation=activation_name(self.activation), bits=bits,
                              derivative_bits=self.derivative_bits, name=name)
        return x + mlp


@keras.saving.register_keras_serializable(package="keras_blpa")
class LlamaTransformerDecoder(BLPALlamaMixin, StockLlamaDecoder):
    """KerasHub's Llama decoder block whose training step keeps codes only.

    A subclass with the same arguments, weights and outputs; in training
    without a cache it runs the units of `keras_blpa.layers.llama_decoder`:
    the forward is exact, the backward reads 8-bit row codes, a
    `derivative_bits`-bit code of the gate's `f'`, a 1-bit mask and dropout
    seeds. Inference and cached decoding (`generate`) run KerasHub's code.

    Example:

    >>> block = LlamaTransformerDecoder(intermediate_dim=64, num_query_heads=4,
    ...                                 num_key_value_heads=2)
    >>> block(keras.random.normal((2, 8, 32)), training=True).shape
    (2, 8, 32)

    Args:
      intermediate_dim, num_query_heads, num_key_value_heads, rope_*,
        activation, layer_norm_epsilon, kernel_initializer, dropout: as
        KerasHub's (`activation`: silu, gelu (exact or tanh) or relu).
      bits: 4 or 8, the row codes' width (default 8); None: exact tensors.
      derivative_bits: 1 to 4 (default 3), the gate's derivative code.
    """


@keras.saving.register_keras_serializable(package="keras_blpa")
class MistralTransformerDecoder(BLPALlamaMixin, StockMistralDecoder):
    """KerasHub's Mistral decoder block whose training step keeps codes only.

    As `LlamaTransformerDecoder` (the same structure); the sliding-window
    mask is KerasHub's own. Args: KerasHub's (`sliding_window`, `head_dim`
    too), `bits` and `derivative_bits`.
    """


@keras.saving.register_keras_serializable(package="keras_blpa")
class QwenTransformerDecoder(BLPALlamaMixin, StockQwenDecoder):
    """KerasHub's Qwen (1.5 / 2) decoder block whose training step keeps codes only.

    As `LlamaTransformerDecoder` (the same structure, with biases on q, k
    and v). `use_sliding_window_attention=True` is refused: Qwen applies that
    window inside its attention layer, which the units replace. Args:
    KerasHub's, `bits` and `derivative_bits`.
    """

    def _check_blpa(self) -> None:
        super()._check_blpa()
        if self.use_sliding_window_attention:
            raise ValueError(
                f"{self.name}: the BLPA block does not apply Qwen's sliding window (KerasHub "
                "applies it inside QwenAttention); received use_sliding_window_attention=True. "
                "Keep the stock block, or pass use_sliding_window_attention=False.")


def pairs() -> list:
    """`(KerasHub class, BLPA class)` of each Llama-style block (for `convert`)."""
    return [(StockLlamaDecoder, LlamaTransformerDecoder),
            (StockMistralDecoder, MistralTransformerDecoder),
            (StockQwenDecoder, QwenTransformerDecoder)]
