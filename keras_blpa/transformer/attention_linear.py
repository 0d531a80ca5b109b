"""The attention unit: softmax attention -> output projection, codes only.

Forward (exact, as `keras.layers.MultiHeadAttention` computes it):

    P   = softmax(scale * q k^T, masked)     [batch, heads, query, key]
          (with `soft_cap`: softmax(cap * tanh(scale * q k^T / cap)), Gemma 2's)
    o   = dropout_p(P) v                     [batch, query, heads, head_dim]
    out = dropout(linear(dropout_o(o), weights))

Grouped-query attention (Llama, Mistral): k and v may have fewer heads than
q, each serving `q_heads / kv_heads` consecutive query heads (as
`ops.repeat(k, groups, axis=2)`); the codes keep the fewer heads, and the
repeat is part of the recomputation the backward differentiates.

Stock autodiff keeps q, k, v, P (and, with dropout, its mask and the dropped
P: the `s**2` terms), `o` for the projection's weight gradient, and the
output dropout's mask. This unit keeps a `bits`-bit row code of each of q,
k and v (one row per token and head), the attention mask as one bit per
entry, and the dropout seed. The backward pass rebuilds q, k and v,
recomputes P and `o` from them (as FlashAttention recomputes P), redraws
both dropout masks from the seed, and differentiates that recomputation:
the `s**2` tensors exist only inside one unit's backward pass.

With `bits=None` q, k and v are kept as they are and the gradient is exact.

Under `mixed_bfloat16` the products run in q's dtype, the logits and the
masked softmax in float32 (cast back), as Keras's `dot_product_attention`
forms them on each backend (`autodiff.logits`); the codes are taken from
q, k and v cast to float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from keras import ops

from keras_blpa.transformer import codes

_LARGE_NEGATIVE = -1e9  # keras.layers.Softmax's masked logit (float32)


def attention_linear(
    q,
    k,
    v,
    mask,
    seed,
    weights: Sequence,
    *,
    linear: Callable[..., list],
    scale: float,
    dot_equation: str,
    combine_equation: str,
    attention_dropout: float,
    dropout: float,
    bits: int | None,
    projection_dropout: float = 0.0,
    soft_cap: float | None = None,
    name: str = "attention_linear",
) -> list:
    """Training-mode multi-head attention and its output projection.

    Args:
      q, k, v: projected query `[batch, query, heads, dim]`, key and value
        `[batch, key, kv_heads, dim]`; `heads` a multiple of `kv_heads`
        (grouped-query attention when fewer).
      mask: bool `[batch, query, key]` (True: attend), or None.
      seed: two integers (`keras.random.SeedGenerator.next()`); with any
        dropout.
      weights: the output projection's weights.
      linear: `linear(o, *weights) -> [outputs]`.
      scale: the logits' scale (`1 / sqrt(key_dim)`).
      dot_equation, combine_equation: `MultiHeadAttention`'s einsum
        equations (key, query -> scores; probabilities, value -> o).
      attention_dropout: dropout on the probabilities (`MultiHeadAttention`'s).
      dropout: dropout on the projected output (the block's residual branch).
      bits: 4 or 8 for the row codes of q, k and v; None: exact.
      projection_dropout: dropout on `o`, the projection's input (Llama's
        and Mistral's attention dropout).
      soft_cap: caps the scaled logits at `cap * tanh(logits / cap)` (Gemma
        2's `logit_soft_cap`), inside the recomputation the backward
        differentiates; None: no cap.
      name: the layer's name.
    """
    shapes = [ops.shape(t) for t in (q, k, v)]
    groups = [tuple(t.shape[2:]) for t in (q, k, v)]  # (heads, dim)
    dtype = q.dtype
    if k.shape[2] != v.shape[2] or q.shape[2] % k.shape[2]:
        raise ValueError(
            "The query heads must be a multiple of the key/value heads (axis 2), and key and "
            f"value must have as many; received q.shape={tuple(q.shape)}, "
            f"k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}. Check `num_key_value_heads`."
        )
    repeats = q.shape[2] // k.shape[2]
    has_mask = mask is not None
    if has_mask:
        mask_shape = ops.shape(mask)
        mask_words = codes.autodiff().pack(
            ops.cast(ops.reshape(mask, (-1, mask.shape[-1])), "int32"), 1)
    else:
        mask_words = ops.zeros((1, 1), "uint32")
    seed = ops.zeros((2,), "int32") if seed is None else seed
    weights = list(weights)
    linear = codes.compute_linear(linear, dtype)

    def attend(q, k, v, mask_bool, seed, *weights):
        if repeats > 1:  # grouped-query attention: each k/v head serves `repeats` q heads
            k, v = (ops.repeat(t, repeats, axis=2) for t in (k, v))
        # float32 logits, scaled after (one bfloat16 rounding fewer), as
        # Keras's dot_product_attention computes them on each backend.
        scores = codes.autodiff().logits(dot_equation, k, q) * scale
        if soft_cap is not None:
            scores = ops.tanh(scores / soft_cap) * soft_cap
        if has_mask:
            keep = ops.expand_dims(mask_bool, 1)  # over heads
            scores = ops.where(keep, scores, ops.cast(_LARGE_NEGATIVE, scores.dtype))
        probs = ops.softmax(scores, axis=-1)
        if has_mask:
            probs = ops.where(keep, probs, ops.zeros_like(probs))
        probs = ops.cast(probs, v.dtype)
        probs = codes.dropout(probs, seed, attention_dropout)
        o = codes.dropout(ops.einsum(combine_equation, probs, v), seed + 2, projection_dropout)
        return [codes.dropout(out, seed + 1, dropout) for out in linear(o, *weights)]

    def unpack_mask(words):
        if not has_mask:
            return None
        rows = mask_shape[0] * mask_shape[1]
        flat = codes.autodiff().unpack(words, (rows, mask_shape[-1]), 1)
        return ops.reshape(ops.cast(flat, "bool"), mask_shape)

    def forward(q, k, v, mask, mask_words, seed, *weights):
        outputs = attend(q, k, v, mask if has_mask else None, seed, *weights)
        if bits is None:
            saved = [q, k, v]
        else:
            saved = []
            for t in (q, k, v):  # a row per token, the heads side by side
                saved += codes.encode_rows(ops.reshape(ops.cast(t, "float32"),
                                                       (-1, *t.shape[2:])), bits)
        codes.record("attention_linear", [*saved, mask_words])
        return outputs, [*saved, mask_words], [seed, *weights]

    def backward(coded, kept, grads):
        *coded, mask_words = coded
        seed, *weights = kept
        if bits is None:
            qkv = coded
        else:
            qkv = [
                ops.reshape(ops.cast(codes.decode_rows(
                    *coded[3 * i: 3 * i + 3], (ops.shape(coded[3 * i + 1])[0], *group), bits),
                    dtype), shape)
                for i, (group, shape) in enumerate(zip(groups, shapes))
            ]
        mask_bool = unpack_mask(mask_words)
        grads_in = codes.autodiff().vjp(
            lambda q, k, v, *w: attend(q, k, v, mask_bool, seed, *w), [*qkv, *weights], grads)
        return [*grads_in[:3], None, None, None, *grads_in[3:]]

    # The bool mask serves the forward; only its packed bits are saved.
    return codes.autodiff().custom_vjp(forward, backward, name)(
        q, k, v, mask if has_mask else mask_words, mask_words, seed, *weights)
