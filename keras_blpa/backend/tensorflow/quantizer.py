"""Sign-preserving low-bit quantizer for BN-normalized activations (pure TF).

Everything here is plain TensorFlow so that it runs eagerly, inside
`tf.function`, and under XLA (`jit_compile=True`, TPU). The compiled custom op
(`custom_ops/`) implements the same arithmetic and must stay bit-exact with it.

Grid. With `b` bits there are `n = 2**b` bins of width `w = R / n` over a
window of `R` standard deviations in normalized units (`xhat`). The paper uses
`R = 6`; that is our default at 4 bits. At 8 bits the same window makes
clipping (about 1% of a trained ResNet's activations lie beyond 3 sigma), not
rounding, the main error, so the default there is `R = 12` (see
`DEFAULT_WINDOW`). A channel's ReLU threshold in those units is
`t = -beta / gamma`. When `-R/2 < t < R/2` the grid is shifted by less than
one bin so that `t` falls on a bin edge `k`
(`1 <= k <= n - 1`): codes on one side of `k` mean "ReLU on", codes on the
other "ReLU off", so the mask rebuilt from a code is exact. Encoding also
clamps each code onto the side that the forward pass's own `y > 0` says, so
float rounding at the threshold and values outside the window can never flip
the mask. A threshold outside the window (or `gamma == 0`) means the whole
window is on one side: those channels keep the centered grid `[-R/2, R/2)`, so an
always-on channel still gets a good `xhat` for the BN backward, and their mask
is a per-channel constant (exact for every value inside the window).

Decoding returns the bin centre, within half a bin of the true value inside
the window. 4-bit codes are packed two per byte (element `2j` in the low
nibble), 8-bit codes one per byte, over the flattened tensor whose last axis
is the channel axis.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_blpa.grid import (  # noqa: F401  (re-exported: the public names live here too)
    DEFAULT_WINDOW,
    PAPER_WINDOW,
    SUPPORTED_BITS,
    CapParams,
    QuantParams,
    bin_width,
    check_bits,
    check_window,
    codes_per_word,
    resolve_max_value,
    resolve_window,
    word_axis,
)


def quantizer_params(
    gamma: tf.Tensor,
    beta: tf.Tensor,
    bits: int,
    window: float | None = None,
    max_value: float | None = None,
) -> QuantParams:
    """Computes the threshold-aligned grid of each channel from BN's gamma and beta.

    Args:
      gamma: BN scale, shape `[C]` (any float dtype; computed in float32).
      beta: BN offset, shape `[C]`.
      bits: 4 or 8.
      window: grid range in standard deviations; None for `DEFAULT_WINDOW[bits]`.
      max_value: a capped ReLU's cap (see `cap_params`), or None. With a cap
        the threshold edge keeps two bins from either end of the grid, so
        that the cap's edge always finds a bin on each of its sides.

    Returns:
      A `QuantParams` of float32 `[C]` tensors and the resolved window.
    """
    window = resolve_window(bits, window)
    n = float(1 << bits)
    w = bin_width(bits, window)
    gamma = tf.cast(gamma, tf.float32)
    beta = tf.cast(beta, tf.float32)
    nonzero = tf.not_equal(gamma, 0.0)
    t = -beta / tf.where(nonzero, gamma, 1.0)
    half = window / 2
    # A channel gets the aligned grid iff the ReLU mask changes inside the
    # window. Decided from y at both edges, computed as the forward computes
    # y (float32 multiply, then add; monotonic in xhat), not from t: t rounds
    # independently of y, and a t one ulp outside the window beside a y that
    # rounds to 0 on the edge would get a constant mask that is wrong there.
    aligned = (-half * gamma + beta > 0.0) != (half * gamma + beta > 0.0)
    t_in = tf.where(aligned, tf.clip_by_value(t, -half, half), 0.0)
    margin = 1.0 if max_value is None else 2.0
    k_aligned = tf.clip_by_value(tf.round((t_in + half) / w), margin, n - margin)
    lo = tf.where(aligned, t_in - k_aligned * w, -half)
    # Constant channels: on everywhere in the window iff y(xhat=0) = beta > 0.
    k_const = tf.where(beta > 0.0, 0.0, n)
    k = tf.where(aligned, k_aligned, k_const)
    flip = tf.cast(aligned & (gamma < 0.0), tf.float32)
    return QuantParams(lo, k, flip, tf.cast(aligned, tf.float32), window)


def cap_params(
    gamma: tf.Tensor, beta: tf.Tensor, params: QuantParams, bits: int, max_value: float
) -> CapParams:
    """The grid's second edge, for a ReLU capped at `max_value` (ReLU6: 6).

    The cap's kink lies at `t1 = (max_value - beta) / gamma` in normalized
    units, in general inside a bin of the grid aligned to the ReLU's
    threshold. Its edge `kc` is the bin edge nearest `t1`, kept on the
    unsaturated side of the threshold edge with at least one bin between
    them, and encoding clamps every code onto the side of `kc` that the
    forward's own `y >= max_value` says: the saturated mask is exact for
    every value. A value clamped over that edge decodes within 1.5 bins
    (1.5 where the on-region is narrower than a bin) instead of half a bin;
    keeping the threshold edge two bins from the grid's ends shifts the grid
    by up to 1.5 bins against the window. Channels whose kink lies outside the window
    have a constant saturated mask (exact inside the window), as the
    threshold's unaligned channels do.

    Args:
      gamma, beta: BN's `[C]` scale and offset.
      params: the channel's grid, `quantizer_params(..., max_value=max_value)`.
      bits: 4 or 8.
      max_value: the cap, > 0.

    Returns:
      A `CapParams` of float32 `[C]` tensors and the cap as a float32 float.
    """
    cap = resolve_max_value(max_value)
    n = float(1 << bits)
    w = bin_width(bits, params.window)
    half = params.window / 2
    gamma = tf.cast(gamma, tf.float32)
    beta = tf.cast(beta, tf.float32)
    # Saturated iff y >= cap, decided from y at the window's edges as the
    # forward computes y (see `quantizer_params`).
    aligned = (-half * gamma + beta >= cap) != (half * gamma + beta >= cap)
    t1 = (cap - beta) / tf.where(tf.not_equal(gamma, 0.0), gamma, 1.0)
    edge = tf.round((tf.clip_by_value(t1, params.lo, params.lo + n * w) - params.lo) / w)
    # The unsaturated "on" codes lie between the two edges: at least one bin.
    k_aligned = params.aligned > 0.5
    low_side = gamma < 0.0  # saturated below the kink
    lower = tf.where(~low_side & k_aligned, params.k + 1.0, 1.0)
    upper = tf.where(low_side & k_aligned, params.k - 1.0, n - 1.0)
    kc_aligned = tf.clip_by_value(edge, lower, upper)
    kc_const = tf.where(beta >= cap, 0.0, n)
    kc = tf.where(aligned, kc_aligned, kc_const)
    flip = tf.cast(aligned & low_side, tf.float32)
    return CapParams(kc, flip, tf.cast(aligned, tf.float32), cap)


def _channel_count(x: tf.Tensor) -> int:
    c = x.shape[-1]
    if c is None:
        raise ValueError("The channel (last) axis must have a static size.")
    return int(c)


def encode_codes(
    xhat: tf.Tensor,
    on: tf.Tensor,
    params: QuantParams,
    bits: int,
    cap: CapParams | None = None,
    saturated: tf.Tensor | None = None,
) -> tf.Tensor:
    """Unpacked integer codes (float32 values in `[0, n)`) for `xhat`.

    `on` is the forward pass's ReLU mask `y > 0`; the code is clamped onto the
    matching side of the threshold edge so that `decode` rebuilds it exactly.
    With a `cap` (`cap_params`), `saturated` is the forward's `y >= max_value`
    and the code is clamped onto its side of the cap's edge as well.
    """
    n = float(1 << bits)
    inv_w = 1.0 / bin_width(bits, params.window)
    u = tf.floor((xhat - params.lo) * inv_w)
    u = tf.clip_by_value(tf.where(tf.math.is_nan(u), 0.0, u), 0.0, n - 1.0)
    # Side ranges: [k, n-1] and [0, k-1]; unaligned channels are unconstrained.
    hi_side_on = params.flip < 0.5
    want_hi = tf.equal(on, hi_side_on)
    aligned = params.aligned > 0.5
    lower = tf.where(aligned & want_hi, params.k, 0.0)
    upper = tf.where(aligned & ~want_hi, params.k - 1.0, n - 1.0)
    u = tf.minimum(tf.maximum(u, lower), upper)
    if cap is None:
        return u
    want_hi = tf.equal(saturated, cap.flip < 0.5)
    aligned = cap.aligned > 0.5
    lower = tf.where(aligned & want_hi, cap.kc, 0.0)
    upper = tf.where(aligned & ~want_hi, cap.kc - 1.0, n - 1.0)
    return tf.minimum(tf.maximum(u, lower), upper)


def pack(codes: tf.Tensor, bits: int) -> tf.Tensor:
    """Packs float or integer codes into a flat uint8 tensor."""
    flat = tf.reshape(tf.cast(codes, tf.uint8), [-1])
    if bits == 8:
        return flat
    size = tf.size(flat)
    flat = tf.pad(flat, [[0, size % 2]])
    pairs = tf.reshape(flat, [-1, 2])
    return tf.bitwise.bitwise_or(
        pairs[:, 0], tf.bitwise.left_shift(pairs[:, 1], tf.constant(4, tf.uint8))
    )


def unpack(packed: tf.Tensor, shape: tf.TensorShape | list, bits: int) -> tf.Tensor:
    """Inverse of `pack`: uint8 codes of the given shape."""
    if bits == 8:
        return tf.reshape(packed, shape)
    low = tf.bitwise.bitwise_and(packed, tf.constant(15, tf.uint8))
    high = tf.bitwise.right_shift(packed, tf.constant(4, tf.uint8))
    flat = tf.reshape(tf.stack([low, high], axis=1), [-1])
    size = tf.reduce_prod(shape)
    return tf.reshape(flat[:size], shape)


def encode(xhat: tf.Tensor, on: tf.Tensor, params: QuantParams, bits: int) -> tf.Tensor:
    """Quantizes normalized activations and packs them.

    Args:
      xhat: float32 normalized activations `(x - mean) / std`, channels last.
      on: bool, the ReLU mask `gamma * xhat + beta > 0` of the forward pass.
      params: from `quantizer_params`.
      bits: 4 or 8.

    Returns:
      Flat uint8 tensor of `ceil(size * bits / 8)` bytes.
    """
    check_bits(bits, allow_none=False)
    _channel_count(xhat)
    return pack(encode_codes(xhat, on, params, bits), bits)


def decode(
    packed: tf.Tensor, params: QuantParams, shape: tf.TensorShape | list, bits: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """Rebuilds `(xhat, mask)` from packed codes.

    Args:
      packed: output of `encode`.
      params: the `QuantParams` used to encode.
      shape: shape of the encoded tensor (channels last).
      bits: 4 or 8.

    Returns:
      float32 bin centres (within half a bin of `xhat` inside the window) and
      the bool ReLU mask, both of `shape`.
    """
    check_bits(bits, allow_none=False)
    return _centres_and_mask(unpack(packed, shape, bits), params, bits)


def _centres_and_mask(codes: tf.Tensor, params: QuantParams, bits: int):
    q = tf.cast(codes, tf.float32)
    xhat = (q + 0.5) * bin_width(bits, params.window) + params.lo
    mask = tf.not_equal(q >= params.k, params.flip > 0.5)
    return xhat, mask


def centres_and_masks_capped(codes: tf.Tensor, params: QuantParams, cap: CapParams, bits: int):
    """`(xhat, mask, saturated)` from unpacked codes of a capped ReLU: bin
    centres, the exact gradient mask `0 < y < max_value` and the exact
    saturated mask `y >= max_value`."""
    xhat, on = _centres_and_mask(codes, params, bits)
    saturated = tf.not_equal(tf.cast(codes, tf.float32) >= cap.kc, cap.flip > 0.5)
    return xhat, on & ~saturated, saturated


def normalize_relu_capped(x, mean, inv_std, gamma, beta, max_value: float):
    """`(xhat, on, saturated, a)` of a ReLU capped at `max_value`: the
    normalized input, `y > 0`, `y >= max_value` and `a = min(max(y, 0),
    max_value)`, which lets NaN through (as `_normalize_relu` does)."""
    xhat = (x - mean) * inv_std
    y = xhat * gamma + beta
    return xhat, y > 0.0, y >= max_value, _capped(y, max_value)


def _capped(y, max_value: float) -> tf.Tensor:
    """`min(max(y, 0), max_value)`, letting NaN through."""
    return tf.where(y <= 0.0, 0.0, tf.where(y >= max_value, max_value, y))


def bn_relu_encode_capped(
    x, mean, inv_std, gamma, beta, params: QuantParams, cap: CapParams, bits: int,
    words: bool = False, sum_windows=None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """`(a, codes)` of a capped unit: the exact capped ReLU output and the
    codes, flat bytes (`pack`) or, with `words`, the word layout."""
    check_bits(bits, allow_none=False)
    xhat, on, saturated, a = normalize_relu_capped(x, mean, inv_std, gamma, beta, cap.max_value)
    codes = encode_codes(xhat, on, params, bits, cap, saturated)
    return a, pack_words(codes, bits, sum_windows) if words else pack(codes, bits)


def decode_capped(saved, params: QuantParams, cap: CapParams, shape, bits: int,
                  words: bool = False):
    """`(xhat, mask, saturated)` from a capped unit's codes (bytes or words)."""
    check_bits(bits, allow_none=False)
    codes = unpack_words(saved, shape, bits) if words else unpack(saved, shape, bits)
    return centres_and_masks_capped(codes, params, cap, bits)


def quantize_relu_capped(x, mean, inv_std, gamma, beta, params: QuantParams, cap: CapParams,
                         bits: int) -> tf.Tensor:
    """The capped ReLU output rebuilt from the codes without packing (the
    naive forward), bit for bit what decoding the packed codes gives."""
    xhat, on, saturated, _ = normalize_relu_capped(x, mean, inv_std, gamma, beta, cap.max_value)
    codes = encode_codes(xhat, on, params, bits, cap, saturated)
    centres, mask, saturated = centres_and_masks_capped(codes, params, cap, bits)
    return relu_from_decoded_capped(centres, mask, saturated, gamma, beta, cap.max_value)


def exact_masks_capped(xhat, gamma, beta, max_value: float):
    """`(mask, saturated)` of a capped ReLU from the exact `xhat`, bit for
    bit the forward's: `0 < y < max_value` and `y >= max_value`."""
    y = xhat * gamma + beta
    return (y > 0.0) & (y < max_value), y >= max_value


def relu_exact_capped(xhat, gamma, beta, max_value: float) -> tf.Tensor:
    """The capped ReLU output rebuilt from the exact `xhat`."""
    return _capped(xhat * gamma + beta, max_value)


def relu_from_decoded_capped(
    xhat: tf.Tensor,
    mask: tf.Tensor,
    saturated: tf.Tensor,
    gamma: tf.Tensor,
    beta: tf.Tensor,
    max_value: float,
) -> tf.Tensor:
    """The capped ReLU output rebuilt from decoded `(xhat, mask, saturated)`:
    `max_value` where saturated, the rebuilt `y` (at most `max_value`) where
    on, else 0. The masks decide, not the rebuilt `y`."""
    y = tf.minimum(xhat * gamma + beta, max_value)
    return tf.where(saturated, max_value, tf.where(mask, y, 0.0))


# Word layout, used under XLA. Codes go into uint32 words along one axis that
# is neither the channel axis nor (for NHWC) the width: the rows of an NHWC
# tensor, the batch of an `[N, C]` one. Element `i` of that axis lands in
# word `i // k` at bit `(i % k) * bits`, `k = 32 // bits`. Why this shape:
# - the channel axis stays minor at full width, so the words tile like the
#   activation itself (TPU pads the two minor dimensions to (8, 128) tiles;
#   codes packed along C would shrink the minor dimension and be padded back);
# - no reshape flattens NHWC (a relayout copy on TPU); unpacking only splits
#   the row axis, which no tile spans;
# - 32-bit integer shifts and ors, the native width everywhere (TPU emulates
#   8-bit integer arithmetic).
# The flat byte layout of `pack` stays the public format shared with the
# compiled op; both hold the same codes.


def words_shape(shape: tf.TensorShape | list, bits: int) -> list[int | None]:
    """Static shape of `pack_words`'s result for codes of `shape`."""
    dims = list(tf.TensorShape(shape).as_list())
    axis = word_axis(len(dims))
    if dims[axis] is not None:
        dims[axis] = -(-dims[axis] // codes_per_word(bits))
    return dims


def _along(axis: int, rank: int, values: tf.Tensor) -> tf.Tensor:
    """`values` (1-D) reshaped to broadcast along `axis` of a rank-`rank` tensor."""
    shape = [1] * rank
    shape[axis] = -1
    return tf.reshape(values, shape)


def _sum_windows_plain(t: tf.Tensor, axis: int, k: int) -> tf.Tensor:
    """Sums non-overlapping windows of `k` along `axis` (zero-padded): plain TF."""
    rank = t.shape.rank
    size = tf.shape(t)[axis]
    pad = tf.one_hot(axis, rank, on_value=-size % k, off_value=0, dtype=tf.int32)
    t = tf.pad(t, tf.stack([tf.zeros([rank], tf.int32), pad], axis=1))
    dims = tf.unstack(tf.shape(t))
    split = tf.stack(dims[:axis] + [dims[axis] // k, k] + dims[axis + 1 :])
    return tf.reduce_sum(tf.reshape(t, split), axis + 1)


def pack_words(codes: tf.Tensor, bits: int, sum_windows=None) -> tf.Tensor:
    """Packs integer codes (values in `[0, 2**bits)`) into uint32 words.

    Args:
      codes: codes of a channels-last tensor of known rank, any numeric dtype.
      bits: 4 or 8.
      sum_windows: `f(t, axis, k)` summing (or or-ing) non-overlapping windows
        of `k` along `axis` with zero padding, e.g. from `xla.sum_windows()`
        (an XLA reduce-window, which XLA:CPU never fuses into a later
        consumer); None for plain TF.

    Returns:
      uint32 words of shape `words_shape(codes.shape, bits)`.
    """
    rank = codes.shape.rank
    axis = word_axis(rank)
    k = codes_per_word(bits)
    size = tf.shape(codes)[axis]
    shift = tf.cast((tf.range(size) % k) * bits, tf.uint32)
    shifted = tf.bitwise.left_shift(tf.cast(codes, tf.uint32), _along(axis, rank, shift))
    words = (sum_windows or _sum_windows_plain)(shifted, axis, k)
    words.set_shape(words_shape(codes.shape, bits))
    return words


def unpack_words(words: tf.Tensor, shape: tf.Tensor | list, bits: int) -> tf.Tensor:
    """Inverse of `pack_words`: uint32 codes of `shape` (a list or an int tensor)."""
    rank = words.shape.rank
    axis = word_axis(rank)
    k = codes_per_word(bits)
    shift = tf.constant(np.arange(k, dtype=np.uint32) * bits)
    codes = tf.bitwise.bitwise_and(
        tf.bitwise.right_shift(tf.expand_dims(words, axis + 1), _along(axis + 1, rank + 1, shift)),
        tf.constant((1 << bits) - 1, tf.uint32),
    )
    # Merge (words, k) into the packed axis, then drop the zero padding.
    dims = tf.unstack(tf.shape(words))
    codes = tf.reshape(codes, tf.stack(dims[:axis] + [dims[axis] * k] + dims[axis + 1 :]))
    shape = tf.cast(shape, tf.int32)
    return tf.slice(codes, tf.zeros([rank], tf.int32), shape)


def encode_words(
    xhat: tf.Tensor, on: tf.Tensor, params: QuantParams, bits: int, sum_windows=None
) -> tf.Tensor:
    """`encode` into the word layout (`pack_words`): the same codes."""
    check_bits(bits, allow_none=False)
    _channel_count(xhat)
    return pack_words(encode_codes(xhat, on, params, bits), bits, sum_windows)


def decode_words(
    words: tf.Tensor, params: QuantParams, shape: tf.Tensor | list, bits: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """`decode` from the word layout: `(xhat, mask)` of `shape`."""
    check_bits(bits, allow_none=False)
    return _centres_and_mask(unpack_words(words, shape, bits), params, bits)


def bn_relu_encode(
    x: tf.Tensor,
    mean: tf.Tensor,
    inv_std: tf.Tensor,
    gamma: tf.Tensor,
    beta: tf.Tensor,
    params: QuantParams,
    bits: int,
    negative_slope: float = 0.0,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Fused forward of one unit: normalize, ReLU and quantize.

    All inputs float32; per-channel tensors of shape `[C]`.

    Returns:
      `(a, packed)`: the exact (leaky) ReLU output of `y = gamma * xhat + beta`
      (`y` where `y > 0`, else `negative_slope * y`) and the packed codes of
      `xhat`. The codes do not depend on the slope: the kink is at `y = 0`.
    """
    xhat, on, a = _normalize_relu(x, mean, inv_std, gamma, beta, negative_slope)
    return a, encode(xhat, on, params, bits)


def leaky(y: tf.Tensor, on: tf.Tensor, negative_slope: float) -> tf.Tensor:
    """`where(on, y, negative_slope * y)`; slope 0 gives an exact 0.0 (never
    -0.0 or NaN), as `tf.nn.relu` does. Used for activations and gradients."""
    return tf.where(on, y, 0.0 if negative_slope == 0.0 else y * negative_slope)


def _normalize_relu(x, mean, inv_std, gamma, beta, negative_slope=0.0):
    xhat = (x - mean) * inv_std
    y = xhat * gamma + beta
    on = y > 0.0
    # `a` lets NaN through (as tf.nn.relu does): a non-finite input must show
    # in the layer's output, not hide behind finite codes. (Not `leaky(y,
    # ~(y <= 0))`: grappler rewrites that negation into `y > 0`, dropping NaN.)
    off = 0.0 if negative_slope == 0.0 else y * negative_slope
    return xhat, on, tf.where(y <= 0.0, off, y)


def quantize_relu(
    x: tf.Tensor,
    mean: tf.Tensor,
    inv_std: tf.Tensor,
    gamma: tf.Tensor,
    beta: tf.Tensor,
    params: QuantParams,
    bits: int,
    negative_slope: float = 0.0,
) -> tf.Tensor:
    """`decode_relu(bn_relu_encode(...))` without packing: the ReLU output
    rebuilt from the codes (the naive forward), bit for bit."""
    check_bits(bits, allow_none=False)
    xhat, on, _ = _normalize_relu(x, mean, inv_std, gamma, beta)
    centres, mask = _centres_and_mask(encode_codes(xhat, on, params, bits), params, bits)
    return relu_from_decoded(centres, mask, gamma, beta, negative_slope)


def relu_from_decoded(
    xhat: tf.Tensor,
    mask: tf.Tensor,
    gamma: tf.Tensor,
    beta: tf.Tensor,
    negative_slope: float = 0.0,
) -> tf.Tensor:
    """The (leaky) ReLU output rebuilt from decoded `(xhat, mask)`: the mask,
    not the sign of the rebuilt `y`, decides (it is exact; `y` is approximate)."""
    return leaky(xhat * gamma + beta, mask, negative_slope)


def bn_relu_encode_words(
    x: tf.Tensor,
    mean: tf.Tensor,
    inv_std: tf.Tensor,
    gamma: tf.Tensor,
    beta: tf.Tensor,
    params: QuantParams,
    bits: int,
    sum_windows=None,
    negative_slope: float = 0.0,
) -> tuple[tf.Tensor, tf.Tensor]:
    """`bn_relu_encode` into the word layout: `(a, words)`, see `pack_words`."""
    xhat, on, a = _normalize_relu(x, mean, inv_std, gamma, beta, negative_slope)
    return a, encode_words(xhat, on, params, bits, sum_windows)


def relu_bn_backward(
    g_a: tf.Tensor,
    xhat: tf.Tensor,
    mask: tf.Tensor,
    gamma: tf.Tensor,
    inv_std: tf.Tensor,
    negative_slope: float = 0.0,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Backward of `a = relu(gamma * xhat + beta)`, `xhat` from batch statistics.

    With `negative_slope`, of the leaky ReLU: `g_y = where(mask, g_a, s * g_a)`.

    Args:
      g_a: float32 gradient w.r.t. `a`, channels last.
      xhat: float32 normalized input (exact or decoded), same shape.
      mask: bool ReLU mask, same shape.
      gamma, inv_std: float32 `[C]`; `inv_std = 1 / sqrt(var + epsilon)`.

    Returns:
      `(g_x, d_gamma, d_beta)`: the input gradient (float32, shape of `g_a`)
      and the `[C]` parameter gradients.
    """
    axes = list(range(g_a.shape.rank - 1))
    count = tf.cast(tf.reduce_prod(tf.shape(g_a)[:-1]), tf.float32)
    g_y = leaky(g_a, mask, negative_slope)
    d_beta = tf.reduce_sum(g_y, axes)
    d_gamma = tf.reduce_sum(g_y * xhat, axes)
    g_x = (gamma * inv_std) * (g_y - d_beta / count - xhat * (d_gamma / count))
    return g_x, d_gamma, d_beta


def bn_relu_exact(
    x: tf.Tensor,
    mean: tf.Tensor,
    inv_std: tf.Tensor,
    gamma: tf.Tensor,
    beta: tf.Tensor,
    negative_slope: float = 0.0,
) -> tuple[tf.Tensor, tf.Tensor]:
    """`(a, xhat)`: the exact path's forward (bits=None), which keeps `xhat`.

    `xhat = (x - mean) * inv_std`, `a = relu(xhat * gamma + beta)` (NaN passes;
    leaky with `negative_slope`).
    """
    xhat, _, a = _normalize_relu(x, mean, inv_std, gamma, beta, negative_slope)
    return a, xhat


def exact_mask(xhat: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor) -> tf.Tensor:
    """The forward's ReLU mask rebuilt from the exact `xhat`, bit for bit."""
    return xhat * gamma + beta > 0.0


def relu_exact(
    xhat: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor, negative_slope: float = 0.0
) -> tf.Tensor:
    """The ReLU output rebuilt from the exact `xhat`: `where(y > 0, y, 0)`
    (`s * y` instead of 0 with `negative_slope` s)."""
    y = xhat * gamma + beta
    return leaky(y, y > 0.0, negative_slope)


def bn_backward_exact(
    g_a: tf.Tensor,
    xhat: tf.Tensor,
    gamma: tf.Tensor,
    beta: tf.Tensor,
    inv_std: tf.Tensor,
    negative_slope: float = 0.0,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """`relu_bn_backward` with the mask rebuilt from the exact `xhat`."""
    mask = exact_mask(xhat, gamma, beta)
    return relu_bn_backward(g_a, xhat, mask, gamma, inv_std, negative_slope)


def decode_bn_backward(
    g_a: tf.Tensor,
    packed: tf.Tensor,
    params: QuantParams,
    gamma: tf.Tensor,
    inv_std: tf.Tensor,
    bits: int,
    negative_slope: float = 0.0,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """`relu_bn_backward` with `xhat` and the mask decoded from packed codes."""
    xhat, mask = decode(packed, params, tf.shape(g_a), bits)
    return relu_bn_backward(g_a, xhat, mask, gamma, inv_std, negative_slope)
