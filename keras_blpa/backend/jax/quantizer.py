"""The sign-preserving quantizer in jnp: the JAX twin of `keras_blpa.backend.tensorflow.quantizer`.

The same float32 arithmetic in the same order as the TensorFlow quantizer
(and the compiled op), so that both give the same codes for the same inputs;
`tests/test_jax_quantizer.py` checks that bit for bit. The grid and its
guarantees are documented in `keras_blpa.backend.tensorflow.quantizer`; its settings come from
`keras_blpa.grid`. Two layouts hold the same codes: the flat bytes of `pack`
(the public format) and the uint32 words of `pack_words` (what a unit keeps
under `jax.jit`, see `keras_blpa.backend.tensorflow.quantizer` on the word layout).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from keras_blpa.grid import (
    CapParams,
    QuantParams,
    bin_width,
    check_bits,
    codes_per_word,
    resolve_max_value,
    resolve_window,
    word_axis,
    words_shape,  # noqa: F401  (the layout's shape, re-exported)
)


def rounded(product):
    """`product`, rounded to float32 before any sum reads it.

    XLA (CPU and GPU) contracts `a * b + c` into one fused multiply-add,
    which rounds once where TensorFlow's kernels and the compiled op
    (`-ffp-contract=off`) round twice; a value one ulp apart can land in the
    other bin or on the other side of the ReLU threshold. Passing the product
    through an integer xor with a value XLA cannot fold (0, or 1 for a NaN,
    which stays NaN) keeps the multiply and the add apart; optimization
    barriers do not, XLA:CPU removes them before fusion. Costs two bitcasts
    and an xor per element, fused into the same loop.
    """
    bits = jax.lax.bitcast_convert_type(product, jnp.uint32)
    bits = bits ^ jnp.isnan(product).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def quantizer_params(gamma, beta, bits: int, window: float | None = None,
                     max_value: float | None = None) -> QuantParams:
    """The threshold-aligned grid of each channel
    (`backend.tensorflow.quantizer.quantizer_params`)."""
    window = resolve_window(bits, window)
    n = float(1 << bits)
    w = bin_width(bits, window)
    gamma = jnp.asarray(gamma, jnp.float32)
    beta = jnp.asarray(beta, jnp.float32)
    t = -beta / jnp.where(gamma != 0.0, gamma, 1.0)
    half = window / 2
    # Decided from y at both window edges, as the forward computes y.
    aligned = (rounded(-half * gamma) + beta > 0.0) != (rounded(half * gamma) + beta > 0.0)
    t_in = jnp.where(aligned, jnp.clip(t, -half, half), 0.0)
    margin = 1.0 if max_value is None else 2.0
    k_aligned = jnp.clip(jnp.round((t_in + half) / w), margin, n - margin)
    lo = jnp.where(aligned, t_in - rounded(k_aligned * w), -half)
    k_const = jnp.where(beta > 0.0, 0.0, n)
    k = jnp.where(aligned, k_aligned, k_const)
    flip = (aligned & (gamma < 0.0)).astype(jnp.float32)
    return QuantParams(lo, k, flip, aligned.astype(jnp.float32), window)


def cap_params(gamma, beta, params: QuantParams, bits: int, max_value: float) -> CapParams:
    """The grid's edge at a capped ReLU's second kink
    (`backend.tensorflow.quantizer.cap_params`)."""
    cap = resolve_max_value(max_value)
    n = float(1 << bits)
    w = bin_width(bits, params.window)
    half = params.window / 2
    gamma = jnp.asarray(gamma, jnp.float32)
    beta = jnp.asarray(beta, jnp.float32)
    aligned = (rounded(-half * gamma) + beta >= cap) != (rounded(half * gamma) + beta >= cap)
    t1 = (cap - beta) / jnp.where(gamma != 0.0, gamma, 1.0)
    edge = jnp.round((jnp.clip(t1, params.lo, params.lo + n * w) - params.lo) / w)
    k_aligned = params.aligned > 0.5
    low_side = gamma < 0.0
    lower = jnp.where(~low_side & k_aligned, params.k + 1.0, 1.0)
    upper = jnp.where(low_side & k_aligned, params.k - 1.0, n - 1.0)
    kc = jnp.where(aligned, jnp.clip(edge, lower, upper), jnp.where(beta >= cap, 0.0, n))
    flip = (aligned & low_side).astype(jnp.float32)
    return CapParams(kc, flip, aligned.astype(jnp.float32), cap)


def encode_codes(xhat, on, params: QuantParams, bits: int, cap: CapParams | None = None,
                 saturated=None):
    """Unpacked codes (float32 values in `[0, n)`), clamped onto the side of
    the threshold edge that the forward's mask `on` says (and of the cap's
    edge that `saturated`, `y >= max_value`, says)."""
    n = float(1 << bits)
    inv_w = 1.0 / bin_width(bits, params.window)
    u = jnp.floor((xhat - params.lo) * inv_w)
    u = jnp.clip(jnp.where(jnp.isnan(u), 0.0, u), 0.0, n - 1.0)
    want_hi = on == (params.flip < 0.5)
    aligned = params.aligned > 0.5
    lower = jnp.where(aligned & want_hi, params.k, 0.0)
    upper = jnp.where(aligned & ~want_hi, params.k - 1.0, n - 1.0)
    u = jnp.minimum(jnp.maximum(u, lower), upper)
    if cap is None:
        return u
    want_hi = saturated == (cap.flip < 0.5)
    aligned = cap.aligned > 0.5
    lower = jnp.where(aligned & want_hi, cap.kc, 0.0)
    upper = jnp.where(aligned & ~want_hi, cap.kc - 1.0, n - 1.0)
    return jnp.minimum(jnp.maximum(u, lower), upper)


def centres_and_mask(codes, params: QuantParams, bits: int):
    """`(xhat, mask)` from unpacked codes: bin centres and the exact mask."""
    q = codes.astype(jnp.float32)
    xhat = rounded((q + 0.5) * bin_width(bits, params.window)) + params.lo
    mask = (q >= params.k) != (params.flip > 0.5)
    return xhat, mask


def centres_and_masks_capped(codes, params: QuantParams, cap: CapParams, bits: int):
    """`(xhat, mask, saturated)` of a capped ReLU
    (`backend.tensorflow.quantizer.centres_and_masks_capped`)."""
    xhat, on = centres_and_mask(codes, params, bits)
    saturated = (codes.astype(jnp.float32) >= cap.kc) != (cap.flip > 0.5)
    return xhat, on & ~saturated, saturated


def normalize_relu_capped(x, mean, inv_std, gamma, beta, max_value: float):
    """`(xhat, on, saturated, a)` of a capped ReLU
    (`backend.tensorflow.quantizer.normalize_relu_capped`)."""
    xhat = rounded((x - mean) * inv_std)
    y = rounded(xhat * gamma) + beta
    return xhat, y > 0.0, y >= max_value, _capped(y, max_value)


def _capped(y, max_value: float):
    """`min(max(y, 0), max_value)`, letting NaN through."""
    return jnp.where(y <= 0.0, 0.0, jnp.where(y >= max_value, max_value, y))


def exact_masks_capped(xhat, gamma, beta, max_value: float):
    """`(mask, saturated)` of a capped ReLU from the exact `xhat`."""
    y = rounded(xhat * gamma) + beta
    return (y > 0.0) & (y < max_value), y >= max_value


def relu_exact_capped(xhat, gamma, beta, max_value: float):
    """The capped ReLU output rebuilt from the exact `xhat`."""
    return _capped(rounded(xhat * gamma) + beta, max_value)


def quantize_relu_capped(x, mean, inv_std, gamma, beta, params: QuantParams, cap: CapParams,
                         bits: int):
    """The capped ReLU output rebuilt from the codes without packing (naive)."""
    xhat, on, saturated, _ = normalize_relu_capped(x, mean, inv_std, gamma, beta, cap.max_value)
    codes = encode_codes(xhat, on, params, bits, cap, saturated)
    centres, mask, saturated = centres_and_masks_capped(codes, params, cap, bits)
    return relu_from_decoded_capped(centres, mask, saturated, gamma, beta, cap.max_value)


def relu_from_decoded_capped(xhat, mask, saturated, gamma, beta, max_value: float):
    """The capped ReLU output rebuilt from the decoded masks
    (`backend.tensorflow.quantizer.relu_from_decoded_capped`)."""
    y = jnp.minimum(rounded(xhat * gamma) + beta, max_value)
    return jnp.where(saturated, max_value, jnp.where(mask, y, 0.0))


def pack(codes, bits: int):
    """Flat uint8 bytes, as `backend.tensorflow.quantizer.pack` (4 bits: element 2j low)."""
    flat = codes.astype(jnp.uint8).reshape(-1)
    if bits == 8:
        return flat
    flat = jnp.pad(flat, (0, flat.size % 2))
    pairs = flat.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << jnp.uint8(4))


def unpack(packed, shape, bits: int):
    """Inverse of `pack`: uint8 codes of `shape`."""
    if bits == 8:
        return packed.reshape(shape)
    flat = jnp.stack([packed & jnp.uint8(15), packed >> jnp.uint8(4)], axis=1).reshape(-1)
    return flat[: int(np.prod(shape))].reshape(shape)


def encode(xhat, on, params: QuantParams, bits: int):
    """Quantizes and packs into flat bytes (`backend.tensorflow.quantizer.encode`)."""
    check_bits(bits, allow_none=False)
    return pack(encode_codes(xhat, on, params, bits), bits)


def decode(packed, params: QuantParams, shape, bits: int):
    """`(xhat, mask)` from flat bytes (`backend.tensorflow.quantizer.decode`)."""
    check_bits(bits, allow_none=False)
    return centres_and_mask(unpack(packed, tuple(shape), bits), params, bits)


def _along(axis: int, rank: int, values):
    shape = [1] * rank
    shape[axis] = -1
    return values.reshape(shape)


def pack_words(codes, bits: int):
    """uint32 words along `word_axis` (`backend.tensorflow.quantizer.pack_words`).

    The windows are or-ed by one reduce-window: XLA:CPU never loop-fuses a
    reduce-window into a later consumer, so the words are a buffer of their
    own and the float32 input they were computed from is not kept alive for
    the backward pass (an elementwise encode would be recomputed there).
    """
    rank = codes.ndim
    axis = word_axis(rank)
    k = codes_per_word(bits)
    size = codes.shape[axis]
    shift = jnp.asarray((np.arange(size) % k) * bits, jnp.uint32)
    shifted = codes.astype(jnp.uint32) << _along(axis, rank, shift)
    window = [1] * rank
    window[axis] = k
    padding = [(0, 0)] * rank
    padding[axis] = (0, -size % k)
    return jax.lax.reduce_window(
        shifted, np.uint32(0), jax.lax.bitwise_or, tuple(window), tuple(window), padding
    )


def unpack_words(words, shape, bits: int):
    """Inverse of `pack_words`: uint32 codes of `shape`."""
    rank = words.ndim
    axis = word_axis(rank)
    k = codes_per_word(bits)
    shift = jnp.asarray(np.arange(k) * bits, jnp.uint32)
    codes = (jnp.expand_dims(words, axis + 1) >> _along(axis + 1, rank + 1, shift)) & jnp.uint32(
        (1 << bits) - 1
    )
    dims = list(words.shape)
    codes = codes.reshape(dims[:axis] + [dims[axis] * k] + dims[axis + 1 :])
    return jax.lax.slice(codes, (0,) * rank, tuple(shape))


def decode_words(words, params: QuantParams, shape, bits: int):
    """`(xhat, mask)` from the word layout."""
    return centres_and_mask(unpack_words(words, shape, bits), params, bits)


def leaky(y, on, negative_slope: float):
    """`where(on, y, negative_slope * y)`; slope 0 gives an exact 0.0."""
    return jnp.where(on, y, 0.0 if negative_slope == 0.0 else y * negative_slope)


def normalize_relu(x, mean, inv_std, gamma, beta, negative_slope: float = 0.0):
    """`(xhat, on, a)`: normalized input, the ReLU mask, the (leaky) ReLU
    output, which lets NaN through as `relu` does."""
    xhat = rounded((x - mean) * inv_std)
    y = rounded(xhat * gamma) + beta
    off = 0.0 if negative_slope == 0.0 else y * negative_slope
    return xhat, y > 0.0, jnp.where(y <= 0.0, off, y)


def relu_from_decoded(xhat, mask, gamma, beta, negative_slope: float = 0.0):
    """The (leaky) ReLU output rebuilt from decoded `(xhat, mask)`."""
    return leaky(rounded(xhat * gamma) + beta, mask, negative_slope)


def quantize_relu(x, mean, inv_std, gamma, beta, params, bits: int, negative_slope=0.0):
    """The ReLU output rebuilt from the codes without packing (naive forward)."""
    xhat, on, _ = normalize_relu(x, mean, inv_std, gamma, beta)
    centres, mask = centres_and_mask(encode_codes(xhat, on, params, bits), params, bits)
    return relu_from_decoded(centres, mask, gamma, beta, negative_slope)


def relu_bn_backward(g_a, xhat, mask, gamma, inv_std, negative_slope: float = 0.0):
    """`(g_x, d_gamma, d_beta)` of `a = relu(gamma * xhat + beta)` with batch
    statistics (`backend.tensorflow.quantizer.relu_bn_backward`)."""
    axes = tuple(range(g_a.ndim - 1))
    count = float(np.prod(g_a.shape[:-1]))
    g_y = leaky(g_a, mask, negative_slope)
    d_beta = jnp.sum(g_y, axes)
    d_gamma = jnp.sum(g_y * xhat, axes)
    g_x = (gamma * inv_std) * (g_y - d_beta / count - xhat * (d_gamma / count))
    return g_x, d_gamma, d_beta


def decode_bn_backward(g_a, words, params: QuantParams, gamma, inv_std, bits: int,
                       negative_slope: float = 0.0, cap: CapParams | None = None):
    """`relu_bn_backward` with `xhat` and the mask decoded from the word layout
    (with `cap`, a capped ReLU's mask `0 < y < max_value`).

    `d_gamma = sum(g_y * xhat)` is reduced over the integer codes instead,
    `w * sum(g_y * q) + (lo + w / 2) * d_beta` (xhat = (q + 1/2) w + lo): the
    reductions then read only full-size operands (`g_y`, `q`). XLA:CPU's
    YNNPACK reduce fusions (jaxlib 0.10) take every operand as a full-size
    buffer, so a reduction over the decoded `xhat` materializes the broadcast
    bin width, offset and grid origin at full size, the two constants once for
    the whole program (measured: 0.75 MiB/sample more on the 20-unit stack).
    """
    axes = tuple(range(g_a.ndim - 1))
    count = float(np.prod(g_a.shape[:-1]))
    w = bin_width(bits, params.window)
    q = unpack_words(words, g_a.shape, bits).astype(jnp.float32)
    mask = (q >= params.k) != (params.flip > 0.5)
    if cap is not None:  # not saturated (`centres_and_masks_capped`)
        mask = mask & ((q >= cap.kc) == (cap.flip > 0.5))
    g_y = leaky(g_a, mask, negative_slope)
    d_beta = jnp.sum(g_y, axes)
    d_gamma = w * jnp.sum(g_y * q, axes) + (params.lo + 0.5 * w) * d_beta
    xhat = rounded((q + 0.5) * w) + params.lo
    g_x = (gamma * inv_std) * (g_y - d_beta / count - xhat * (d_gamma / count))
    return g_x, d_gamma, d_beta


def exact_mask(xhat, gamma, beta):
    """The forward's ReLU mask rebuilt from the exact `xhat`."""
    return rounded(xhat * gamma) + beta > 0.0


def relu_exact(xhat, gamma, beta, negative_slope: float = 0.0):
    """The (leaky) ReLU output rebuilt from the exact `xhat`."""
    y = rounded(xhat * gamma) + beta
    return leaky(y, y > 0.0, negative_slope)
