"""Gemma's decoder block (Gemma 1 and Gemma 2 configurations), trained with BLPA.

KerasHub's `GemmaDecoderBlock` is Llama's structure with four differences,
each met by the same units (`keras_blpa.layers.llama_decoder`):

    q, k, v  = norm_linear(x; RMSNorm -> query/key/value)   gamma = 1 + scale
    q, k     = rope(q), rope(k)            the attention layer's own (interleaved halves)
    a        = attention_linear(q, k, v -> output)         scale: the query pre-scaling;
                                                           soft_cap: cap * tanh(logits / cap)
    a        = norm_linear(a; post-attention RMSNorm)      Gemma 2: a code of its xhat
    x       += dropout(a)
    gate, up = norm_linear(x; RMSNorm -> ffw_gating / ffw_gating_2)
    m        = gated_linear(gelu_tanh(gate) * up -> ffw_linear)
    m        = norm_linear(m; post-FFW RMSNorm)            Gemma 2
    x       += m

`RMSNormalization` scales by `1 + scale`: the norm unit takes `1 + scale`
as its gamma (the gradient with respect to `scale` is the one with respect
to gamma). The queries are multiplied by `1 / sqrt(head_dim)` (or
`1 / sqrt(hidden_dim / heads)`) before the logits: the attention unit's
`scale`. Gemma 2's logit soft cap is applied inside the attention unit's
recomputation, and its sliding window (alternate layers) is the attention
layer's own mask, computed here before the unit. Dropout (on the
probabilities, and the residual branch's after the post-attention norm) is
redrawn from a seed. Inference and cached decoding (`generate`) run
KerasHub's code unchanged.

KerasHub exports this block only under `keras_hub.src.models`: it is
imported here alone (`convert` skips it when this import fails).
"""

from __future__ import annotations

import keras
from keras import ops
from keras_hub.src.models.gemma.gemma_decoder_block import GemmaDecoderBlock as StockGemmaBlock

from keras_blpa.layers.llama_decoder import BLPADecoderMixin
from keras_blpa.layers.transformer_block import heads, quantized
from keras_blpa.transformer.attention_linear import attention_linear
from keras_blpa.transformer.dropout import dropout
from keras_blpa.transformer.gated_linear import gated_linear
from keras_blpa.transformer.norm_linear import norm_linear

_ACTIVATION = "gelu_tanh"  # KerasHub's: keras.activations.gelu(gate, approximate=True)


def _context_training():
    """The `training` flag of the enclosing Keras call. KerasHub's
    `GemmaDecoderBlock.call` takes no `training` argument (nor does this
    subclass's: a block converted in place, or converted back, keeps the
    signature Keras read when it was built); `Layer.__call__` puts the flag
    it was given, or its caller's, in the call context, where the block's
    sublayers read it too. Where Keras keeps it elsewhere, None: the block
    runs KerasHub's code (stock memory, the same numbers)."""
    try:  # Internal: Keras exports no reader of the call context.
        from keras.src.backend.common import global_state
    except ImportError:  # pragma: no cover - another Keras layout: KerasHub's code runs
        return None
    context = global_state.get_global_attribute("current_call_ctx")
    return None if context is None else getattr(context, "training", None)


@keras.saving.register_keras_serializable(package="keras_blpa")
class GemmaDecoderBlock(BLPADecoderMixin, StockGemmaBlock):
    """KerasHub's Gemma decoder block whose training step keeps codes only.

    A subclass with the same arguments, weights and outputs (module
    docstring); in training without a cache it runs the units: the forward
    is exact, the backward reads 8-bit row codes, a `derivative_bits`-bit
    code of the gate's `f'`, a 1-bit mask and dropout seeds. Gemma 2's
    options (logit soft cap, post-attention and post-FFW norms, sliding
    window) are covered. Inference and cached decoding run KerasHub's code.

    Example:

    >>> block = GemmaDecoderBlock(hidden_dim=32, intermediate_dim=64, head_dim=8,
    ...                           num_query_heads=4, num_key_value_heads=2)
    >>> block(keras.random.normal((2, 8, 32)), training=True).shape
    (2, 8, 32)

    Args:
      hidden_dim, intermediate_dim, head_dim, num_query_heads,
        num_key_value_heads, query_head_dim_normalize, use_post_ffw_norm,
        use_post_attention_norm, logit_soft_cap,
        use_sliding_window_attention, sliding_window_size,
        layer_norm_epsilon, dropout: as KerasHub's.
      bits: 4 or 8, the row codes' width (default 8); None: exact tensors.
      derivative_bits: 1 to 4 (default 3), the gate's derivative code.
    """

    def call(self, x, padding_mask=None, cache=None, cache_update_index=0):
        if not _context_training() or cache is not None or quantized(self):
            return super().call(x, padding_mask=padding_mask, cache=cache,
                                cache_update_index=cache_update_index)
        mask = ops.cast(self._compute_attention_mask(x, padding_mask, None, 0), "bool")
        if self.attention.use_sliding_window_attention:
            mask = self.attention._mask_sliding_window(mask, cache_update_index=0)
        return self._blpa_forward(x, mask)

    def _check_blpa(self) -> None:
        """A ValueError naming what the block uses that the units do not cover."""
        norms = [self.pre_attention_norm, self.pre_ffw_norm]
        norms += [self.post_attention_norm] if self.use_post_attention_norm else []
        norms += [self.post_ffw_norm] if self.use_post_ffw_norm else []
        self._check_norms(norms)

    def _dropout_layers(self) -> tuple:
        return (self.attention.dropout_layer, getattr(self, "attention_dropout", None))

    @staticmethod
    def _rms_weights(norm) -> tuple:
        """Gemma's RMSNorm scales by `1 + scale`: the norm unit's gamma."""
        scale = ops.convert_to_tensor(norm.scale)
        return 1 + scale, ops.zeros_like(scale)

    def _post_norm(self, norm, y):
        """`norm(y)` (Gemma 2's post-attention or post-FFW RMSNorm), a code of its xhat."""
        (out,) = norm_linear(y, *self._rms_weights(norm), [], linear=lambda _: [],
                             epsilon=norm.epsilon, norm="rms", bits=self.bits, name=self.name)
        return out

    def _query_scale(self) -> float:
        """The factor KerasHub's attention multiplies the queries by."""
        attention = self.attention
        dim = attention.head_dim if attention.query_head_dim_normalize \
            else attention.hidden_dim // attention.num_query_heads
        return float(1 / dim**0.5)

    def _blpa_forward(self, x, mask):
        x = ops.cast(x, self.compute_dtype)  # as `__call__` (not `stateless_call`) does
        attention = self.attention
        qkv_weights, qkv = heads(
            [attention.query_dense, attention.key_dense, attention.value_dense])
        out_weights, out = heads([attention.output_dense])
        gate_up_weights, gate_up = heads([self.gating_ffw, self.gating_ffw_2])
        down_weights, down = heads([self.ffw_linear])
        bits, name, rate = self.bits, self.name, self.dropout or 0.0
        post_attention = self.use_post_attention_norm

        norm = self.pre_attention_norm
        _, q, k, v = norm_linear(x, *self._rms_weights(norm), qkv_weights, linear=qkv,
                                 epsilon=norm.epsilon, norm="rms", bits=bits, name=name)
        q, k = attention._apply_rope(q, 0), attention._apply_rope(k, 0)
        (attended,) = attention_linear(
            q, k, v, mask, self._seed(), out_weights, linear=out, scale=self._query_scale(),
            dot_equation="bkuh,bquh->buqk", combine_equation="buqk,bkuh->bquh",
            attention_dropout=attention.dropout or 0.0,
            dropout=0.0 if post_attention else rate, soft_cap=attention.logit_soft_cap,
            bits=bits, name=name)
        if post_attention:  # the residual dropout follows the post-attention norm
            attended = dropout(self._post_norm(self.post_attention_norm, attended),
                               self._seed(), rate, name=name)
        x = x + attended
        norm = self.pre_ffw_norm
        _, gate, up = norm_linear(x, *self._rms_weights(norm), gate_up_weights,
                                  linear=gate_up, epsilon=norm.epsilon, norm="rms", bits=bits,
                                  name=name)
        (mlp,) = gated_linear(gate, up, down_weights, linear=down, activation=_ACTIVATION,
                              bits=bits, derivative_bits=self.derivative_bits, name=name)
        if self.use_post_ffw_norm:
            mlp = self._post_norm(self.post_ffw_norm, mlp)
        return x + mlp


def pairs() -> list:
    """`(KerasHub class, BLPA class)` of Gemma's block (for `convert`)."""
    return [(StockGemmaBlock, GemmaDecoderBlock)]
