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

The backward runs over batch slices, one after another, where one sample's
`s**2` tensors are large (`slice_bounds`): each slice decodes its own
rows of q, k and v, and the dropout masks are drawn whole, as the forward
drew them, and sliced. The gradients are the whole batch's (the weight
gradient summed over slices).

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
from keras_blpa.transformer.slicing import slice_bounds

_LARGE_NEGATIVE = -1e9  # keras.layers.Softmax's masked logit (float32)


def _einsum_shape(equation: str, *shapes) -> tuple:
    """The shape of `einsum(equation, *operands)` from the operands' shapes."""
    inputs, output = equation.replace(" ", "").split("->")
    sizes: dict = {}
    for letters, shape in zip(inputs.split(","), shapes):
        for letter, size in zip(letters, shape):
            sizes.setdefault(letter, size)
    return tuple(sizes[letter] for letter in output)


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
    # One sample's float32 probabilities (None: a sequence length unknown when traced).
    probs_bytes = (None if None in (q.shape[1], k.shape[1])
                   else 4 * q.shape[2] * q.shape[1] * k.shape[1])
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

    def attend(q, k, v, mask_bool, drop_probs, drop_o, *weights):
        """The outputs before their dropout, from q, k, v (all heads)."""
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
            probs = ops.where(keep, probs, codes.zero(probs))
        probs = drop_probs(ops.cast(probs, v.dtype))
        return linear(drop_o(ops.einsum(combine_equation, probs, v)), *weights)

    def drawn(seed, rate):
        return lambda x: codes.dropout(x, seed, rate)

    def kept_as(keep, rate):
        return lambda x: x if keep is None else codes.apply_keep(x, keep, rate)

    def unpack_mask(words):
        if not has_mask:
            return None
        rows = mask_shape[0] * mask_shape[1]
        flat = codes.autodiff().unpack(words, (rows, mask_shape[-1]), 1)
        return ops.reshape(ops.cast(flat, "bool"), mask_shape)

    def forward(q, k, v, mask, mask_words, seed, *weights):
        outputs = attend(q, k, v, mask if has_mask else None, drawn(seed, attention_dropout),
                         drawn(seed + 2, projection_dropout), *weights)
        outputs = [codes.dropout(out, seed + 1, dropout) for out in outputs]
        if bits is None:
            saved = [q, k, v]
        else:
            saved = []
            for t in (q, k, v):  # a row per token, the heads side by side
                saved += codes.encode_rows(ops.reshape(ops.cast(t, "float32"),
                                                       (-1, *t.shape[2:])), bits)
        codes.record("attention_linear", [*saved, mask_words])
        return outputs, [*saved, mask_words], [seed, *weights]

    def decode(coded, first=None, last=None):
        """q, k and v (of the samples `first:last`, which start on a word's
        first row) from the codes."""
        if bits is None:
            return [t if first is None else t[first:last] for t in coded]
        qkv = []
        for i, (group, shape) in enumerate(zip(groups, shapes)):
            words, lo, scale_ = coded[3 * i: 3 * i + 3]
            if first is None:
                values = codes.decode_rows(words, lo, scale_, (ops.shape(lo)[0], *group), bits)
            else:
                values = codes.decode_row_slice(words, lo, scale_, group, bits,
                                                first * shape[1], last * shape[1])
            qkv.append(ops.reshape(ops.cast(values, dtype), (-1, *shape[1:])))
        return qkv

    def backward(coded, kept, grads):
        *coded, mask_words = coded
        seed, *weights = kept
        mask_bool = unpack_mask(mask_words)
        # The output dropout's vjp is that dropout of the upstream gradient.
        grads = [codes.dropout(g, seed + 1, dropout) for g in grads]
        batch = ops.shape(grads[-1])[0]
        bounds = slice_bounds(batch, probs_bytes, "attention")
        if len(bounds) == 1:
            grads_in = codes.autodiff().vjp(
                lambda q, k, v, *w: attend(q, k, v, mask_bool, drawn(seed, attention_dropout),
                                           drawn(seed + 2, projection_dropout), *w),
                [*decode(coded), *weights], grads)
        else:
            grads_in = sliced_backward(coded, weights, grads, mask_bool, seed, batch, bounds)
        return [*grads_in[:3], None, None, None, *grads_in[3:]]

    def sliced_backward(coded, weights, grads, mask_bool, seed, batch, bounds):
        """The backward pass over batch slices, one after another: the `s**2`
        tensors of one slice at a time. Each dropout mask is drawn whole, as
        the forward drew it (a bit per element), and sliced."""
        q_shape, k_shape, v_shape = ((batch, *shape[1:]) for shape in shapes)
        k_shape = (*k_shape[:2], q_shape[2], k_shape[3])  # repeated to the query heads
        v_shape = (*v_shape[:2], q_shape[2], v_shape[3])
        probs_shape = _einsum_shape(dot_equation, k_shape, q_shape)
        keeps = [
            None if not rate else codes.autodiff().dropout_keep(s, shape, rate, grads[-1])
            for s, shape, rate in (
                (seed, probs_shape, attention_dropout),
                (seed + 2, _einsum_shape(combine_equation, probs_shape, v_shape),
                 projection_dropout))]
        length = shapes[0][1]
        aligned = bits is None or (
            isinstance(length, int) and length % codes.rows_per_word(coded[0], bits) == 0)
        sources = coded if aligned else decode(coded)  # else slices would split words
        parts: list[list] = [[], [], []]
        sums = None
        for first, last in bounds:
            inputs = [*sources, *grads, mask_bool, *keeps]
            if sums is not None:  # the slices run one after another
                inputs = codes.autodiff().after_all(inputs, [p[-1] for p in parts] + sums)
            sources_now, inputs = inputs[: len(sources)], inputs[len(sources):]
            qkv = (decode(sources_now, first, last) if aligned
                   else [t[first:last] for t in sources_now])
            grads_now = [g[first:last] for g in inputs[: len(grads)]]
            mask_now, keep_probs, keep_o = (
                None if t is None else t[first:last] for t in inputs[len(grads):])
            drop_probs = kept_as(keep_probs, attention_dropout)
            drop_o = kept_as(keep_o, projection_dropout)
            results = codes.autodiff().vjp(
                lambda q, k, v, *w, mask=mask_now, drop_probs=drop_probs, drop_o=drop_o:
                    attend(q, k, v, mask, drop_probs, drop_o, *w),
                [*qkv, *weights], grads_now)
            for part, result in zip(parts, results[:3]):
                part.append(result)
            sums = list(results[3:]) if sums is None else [
                a + b for a, b in zip(sums, results[3:])]
        return [*(ops.concatenate(part, axis=0) for part in parts), *sums]

    # The bool mask serves the forward; only its packed bits are saved.
    return codes.autodiff().custom_vjp(forward, backward, name)(
        q, k, v, mask if has_mask else mask_words, mask_words, seed, *weights)
