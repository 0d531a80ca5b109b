"""MultiHeadAttention: Keras's attention layer, trained with BLPA.

The training forward runs through the transformer units
(`keras_blpa.transformer`), reading the weights of the layer's own
`query` / `key` / `value` / `attention_output` EinsumDense sublayers:

    q, k, v = activation_linear(x; identity -> query/key/value)   a row code per input
    out     = attention_linear(q, k, v -> attention_output)       codes of q, k, v

Self-attention (`layer(x, x)`: query, value and key the same tensor) keeps
one row code of `x` for all three projections' weight gradients;
cross-attention a code per distinct input.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_blpa.layers.transformer_block import heads
from keras_blpa.transformer import codes
from keras_blpa.transformer.activation_linear import activation_linear
from keras_blpa.transformer.attention_linear import attention_linear


def _keras_mask(x):
    """The Keras mask attached to `x` (what stock `MultiHeadAttention.call`
    reads as the query's mask). Keras exports no getter; the internal one is
    used here only, with the attribute it reads as the fallback."""
    try:
        from keras.src.backend import get_keras_mask
    except ImportError:
        return getattr(x, "_keras_mask", None)
    return get_keras_mask(x)


@keras.saving.register_keras_serializable(package="keras_blpa")
class MultiHeadAttention(keras.layers.MultiHeadAttention):
    """`keras.layers.MultiHeadAttention` whose training step keeps codes only.

    The same arguments, weights and outputs as Keras's layer (it is a
    subclass). In training the forward is exact and the backward pass reads:

    - a `bits`-bit row code (one per token) of each distinct input, from
      which the query, key and value projections' weight gradients are
      computed: `layer(x, x)` keeps ONE code of `x` for all three;
    - row codes of the projected q, k and v (a row per token and head); the
      backward recomputes the probabilities `P = softmax(q k^T / sqrt(d))`
      and the output projection's input from them, as FlashAttention does;
    - the attention mask (Keras's: `attention_mask`, the inputs' Keras masks,
      `use_causal_mask`, `sliding_window`) as one bit per entry, and the
      attention dropout's seed (its mask is redrawn in the backward pass).

    Stock autodiff keeps the inputs, q, k, v, the `heads x T x S`
    probabilities (with dropout also the dropped copy and its mask) and the
    output projection's input in full precision.

    Runs Keras's own code unchanged: inference (`training` not True),
    `return_attention_scores=True`, `use_gate=True`, inputs that are not
    `(batch, sequence, features)`, non-default `attention_axes`, an
    `attention_mask` of rank 4, quantized (int8, ...) projections, and
    subclasses that override `_compute_attention`.

    Example:

    >>> layer = MultiHeadAttention(num_heads=2, key_dim=16, dropout=0.1)
    >>> x = keras.random.normal((2, 8, 32))
    >>> layer(x, x, use_causal_mask=True, training=True).shape
    (2, 8, 32)

    Args:
      num_heads, key_dim, value_dim, dropout, use_bias, output_shape,
        attention_axes, ...: as `keras.layers.MultiHeadAttention`.
      bits: 4 or 8 (default), the row codes' width; None keeps the exact
        tensors (the stock gradient, less memory than stock).
    """

    def __init__(self, *args, bits: int | None = 8, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_blpa(bits)

    def _init_blpa(self, bits: int | None) -> None:
        codes.check_bits(bits)
        self.bits = bits

    def get_config(self):
        return {**super().get_config(), "bits": self.bits}

    def __call__(self, query, value, key=None, **kwargs):
        # Keras converts each argument on its own (numpy arrays; float32 cast
        # to bfloat16 under a mixed policy): self-attention's one input would
        # reach `call` as two tensors and keep two codes. Convert it once.
        if value is query and (key is None or key is query) \
                and not isinstance(query, keras.KerasTensor) and _keras_mask(query) is None:
            query = value = self.dtype_policy.convert_input(query, self.autocast,
                                                            self.input_dtype)
            key = None if key is None else query
        return super().__call__(query, value, key=key, **kwargs)

    def call(self, query, value, key=None, query_mask=None, value_mask=None, key_mask=None,
             attention_mask=None, return_attention_scores=False, training=None,
             use_causal_mask=False):
        if not self._units_cover(query, value, key, attention_mask, training,
                                 return_attention_scores):
            return super().call(
                query, value, key=key, query_mask=query_mask, value_mask=value_mask,
                key_mask=key_mask, attention_mask=attention_mask,
                return_attention_scores=return_attention_scores, training=training,
                use_causal_mask=use_causal_mask)
        key = value if key is None else key
        # As stock: the query's own Keras mask (the argument is ignored).
        mask = self._compute_attention_mask(
            query, value, query_mask=_keras_mask(query), value_mask=value_mask,
            key_mask=key_mask, attention_mask=attention_mask, use_causal_mask=use_causal_mask)
        if mask is not None:
            shape = ops.shape(query)[:2] + ops.shape(value)[1:2]
            mask = ops.broadcast_to(ops.cast(mask, "bool"), shape)
        q, k, v = self._projections(query, key, value)
        seed = self._dropout_layer.seed_generator.next() if self._dropout > 0 else None
        out_weights, out = heads([self.output_dense])
        (output,) = attention_linear(
            q, k, v, mask, seed, out_weights, linear=out,
            scale=self._inverse_sqrt_key_dim, dot_equation=self._dot_product_equation,
            combine_equation=self._combine_equation, attention_dropout=self._dropout,
            dropout=0.0, bits=self.bits, name=self.name)
        return output

    def _units_cover(self, query, value, key, attention_mask, training,
                     return_attention_scores) -> bool:
        """Whether this call runs through the units (the class docstring)."""
        base = keras.layers.MultiHeadAttention
        ranks = {len(t.shape) for t in (query, value, key) if t is not None}
        projections = (self.query_dense, self.key_dense, self.value_dense, self.output_dense)
        return (bool(training) and not return_attention_scores and not self._use_gate
                and ranks == {3} and tuple(self._attention_axes) == (1,)
                and (attention_mask is None or len(attention_mask.shape) <= 3)
                and not any(getattr(d, "quantization_mode", None) for d in projections)
                and type(self)._compute_attention is base._compute_attention)

    def _projections(self, query, key, value) -> list:
        """q, k and v through one `activation_linear` unit per distinct input
        tensor (self-attention: one unit, one code, three heads)."""
        # `__call__` casts the inputs to the compute dtype; `stateless_call`
        # does not. Identity decides which projections share a code.
        inputs, cast = [], {}
        for t in (query, key, value):
            if id(t) not in cast:
                cast[id(t)] = ops.cast(t, self.compute_dtype)
            inputs.append(cast[id(t)])
        dense = (self.query_dense, self.key_dense, self.value_dense)
        projected = [None] * 3
        for t in {id(t): t for t in inputs}.values():
            which = [i for i in range(3) if inputs[i] is t]
            weights, linear = heads([dense[i] for i in which])
            outputs = activation_linear(t, weights, linear=linear, activation="linear",
                                        bits=self.bits, name=self.name)
            for i, out in zip(which, outputs):
                projected[i] = out
        return projected
