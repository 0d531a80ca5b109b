"""The quantizer's second edge for a capped ReLU (`min(max(y, 0), m)`, ReLU6):
both masks rebuilt exactly from the codes, the decoded values close, and the
jnp twin bit for bit the TensorFlow quantizer.

The grid's own guarantees (the compiled op is checked bit for bit against
it in `tests/test_capped_op.py`, the layers in `tests/test_capped_layers.py`),
on random channels whose kinks lie inside and outside the window, on
either side of each other, within a bin of each other, with values on and
one ulp beside both kinks, beyond the window, NaN and Inf.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from keras_blpa import grid
from keras_blpa.backend.tensorflow import quantizer


def _channels(rng, c: int, bits: int, window: float, cap: float):
    """gamma, beta of `c` channels of every kind for one `cap`."""
    w = window / (1 << bits)
    # the cap's kink from the threshold: a fraction of a bin to beyond the window
    span = np.exp(rng.uniform(np.log(0.2 * w), np.log(1.5 * window), c))
    gamma = rng.choice([-1, 1], c) * cap / span
    t0 = rng.uniform(-1.3, 1.3, c) * window / 2  # threshold in or beside the window
    beta = -t0 * gamma
    gamma[:4] = [1e-30, -1e-30, 0.0, 2.0]  # degenerate scales, one wide channel
    beta[:4] = [0.5, 7.0, 3.0, -1.0]
    return gamma.astype(np.float32), beta.astype(np.float32)


def _values(rng, gamma, beta, cap, n: int, window: float):
    """xhat [n, C]: uniform over twice the window, plus each channel's two
    kinks and their float32 neighbours, NaN and Inf."""
    c = gamma.size
    x = rng.uniform(-window, window, (n, c)).astype(np.float32)
    safe = np.where(gamma != 0, gamma, 1).astype(np.float32)
    for row, t in enumerate([-beta / safe, (np.float32(cap) - beta) / safe]):
        t = t.astype(np.float32)
        for k, v in enumerate([t, np.nextafter(t, np.inf), np.nextafter(t, -np.inf)]):
            x[3 * row + k] = v
    x[6, :4] = [np.nan, np.inf, -np.inf, np.nan]
    return x


def _encode(x, gamma, beta, bits, cap, window, q=quantizer, clamp=True):
    params = q.quantizer_params(gamma, beta, bits, window, max_value=cap)
    caps = q.cap_params(gamma, beta, params, bits, cap)
    if not clamp:  # the check below must catch a grid without the cap's clamp
        caps = caps._replace(aligned=caps.aligned * 0)
    with np.errstate(invalid="ignore"):
        y = np.asarray(x * gamma + beta, np.float32)  # float32 multiply, then add
    codes = q.encode_codes(x, y > 0, params, bits, caps, y >= np.float32(cap))
    return params, caps, codes, y


def _violations(bits: int, seed: int, cap: float, clamp: bool = True,
                window: float = 6.0) -> dict:
    rng = np.random.default_rng(seed)
    gamma, beta = _channels(rng, 2048, bits, window, cap)
    x = _values(rng, gamma, beta, cap, 96, window)
    params, caps, codes, y = _encode(x, gamma, beta, bits, cap, window, clamp=clamp)
    m = np.float32(cap)
    assert caps.max_value == m
    xhat, mask, saturated = (np.asarray(t) for t in
                             quantizer.centres_and_masks_capped(codes, params, caps, bits))
    inside = np.abs(x) <= window / 2
    both = (np.asarray(params.aligned) > 0.5) & (np.asarray(caps.aligned) > 0.5)
    exact = (inside | both) & np.isfinite(y)  # unaligned kinks: exact inside the window
    a = np.asarray(quantizer.relu_from_decoded_capped(xhat, mask, saturated, gamma, beta, cap))
    assert np.all(a[saturated] == m) and np.all(a[~(mask | saturated)] == 0)
    assert np.all((a >= 0) & (a <= m))
    w = window / (1 << bits)
    err = np.abs(xhat - x) / w * 0.9999  # in bins, float rounding aside
    lo = np.asarray(params.lo)
    in_grid = inside & (x >= lo) & (x <= lo + (1 << bits) * w)
    # codes move only across the two edges: a bin beside neither stays put
    edges = [lo + np.asarray(params.k) * w, lo + np.asarray(caps.kc) * w]
    far = np.minimum(np.abs(x - edges[0]), np.abs(x - edges[1])) > w
    return {
        "mask": int(np.sum((mask != ((y > 0) & (y < m))) & exact)),
        "saturated": int(np.sum((saturated != (y >= m)) & exact)),
        # half a bin away from the edges; a code clamped over an edge: 1.5
        # bins (an on-region narrower than a bin); inside the window beyond
        # the grid (shifted by up to 1.5 bins): 2.5
        "xhat_far": int(np.sum((err > 0.5) & in_grid & far)),
        "xhat_grid": int(np.sum((err > 1.5) & in_grid)),
        "xhat_window": int(np.sum((err > 2.5) & inside)),
        "aligned_both": int(np.sum(both)),
    }


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cap", [6.0, 0.37])
def test_both_masks_are_exact_and_values_within_a_bin(bits, cap):
    found = _violations(bits, seed=bits, cap=cap)
    assert found.pop("aligned_both") > 500  # both kinks in the window: the hard case
    assert found == {"mask": 0, "saturated": 0, "xhat_far": 0, "xhat_grid": 0,
                     "xhat_window": 0}


def test_the_check_catches_a_grid_without_the_caps_clamp():
    found = _violations(4, seed=4, cap=6.0, clamp=False)
    assert found["mask"] > 0 and found["saturated"] > 0


@pytest.mark.parametrize("bits", [4, 8])
def test_the_on_region_keeps_a_bin_between_the_edges(bits):
    # cap kink within a fraction of a bin of the threshold, at both window ends
    n = 1 << bits
    gamma = np.float32([1, -1, 1, -1, 1])
    beta = np.float32([2.99, 2.99, -2.99, -2.99, 0.0])
    params = quantizer.quantizer_params(gamma, beta, bits, 6.0, max_value=0.01)
    caps = quantizer.cap_params(gamma, beta, params, bits, 0.01)
    k, kc = np.asarray(params.k), np.asarray(caps.kc)
    assert np.all((k >= 2) & (k <= n - 2))
    on_codes = np.where(gamma > 0, kc - k, k - kc)
    assert np.all(on_codes[np.asarray(caps.aligned) > 0.5] >= 1)


def test_the_cap_moves_only_threshold_edges_next_to_the_grids_ends():
    rng = np.random.default_rng(3)
    gamma = rng.normal(size=4096).astype(np.float32)
    beta = (rng.uniform(-1, 1, 4096) * 3.2 * np.abs(gamma)).astype(np.float32)
    for bits in (4, 8):
        n = 1 << bits
        plain = quantizer.quantizer_params(gamma, beta, bits, 6.0)
        capped = quantizer.quantizer_params(gamma, beta, bits, 6.0, max_value=6.0)
        k = np.asarray(plain.k)
        aligned = np.asarray(plain.aligned) > 0.5
        same = ~aligned | ((k >= 2) & (k <= n - 2))
        assert np.any(aligned & ~same)  # the case exists in this sample
        for a, b in zip(plain[:4], capped[:4]):
            np.testing.assert_array_equal(np.asarray(a)[same], np.asarray(b)[same])
        moved = np.asarray(capped.k)[aligned & ~same]
        assert set(moved.tolist()) <= {2.0, n - 2.0}


@pytest.mark.parametrize("bad", [0, -6.0, float("nan"), float("inf"), "6", True, 1e39])
def test_a_bad_max_value_names_the_argument(bad):
    with pytest.raises(ValueError, match="max_value.*finite number > 0"):
        grid.check_max_value(bad)
    with pytest.raises(ValueError, match="max_value"):
        quantizer.cap_params(tf.ones([2]), tf.zeros([2]),
                             quantizer.quantizer_params(tf.ones([2]), tf.zeros([2]), 4), 4, bad)


def test_jnp_twin_is_bit_exact():
    jax = pytest.importorskip("jax")
    jq = pytest.importorskip("keras_blpa.backend.jax.quantizer")
    rng = np.random.default_rng(9)
    for bits in (4, 8):
        m = 6.0
        gamma, beta = _channels(rng, 256, bits, 6.0, m)
        x = _values(rng, gamma, beta, m, 64, 6.0)
        params, caps, codes, _ = _encode(x, gamma, beta, bits, m, 6.0)

        def twin(x, gamma, beta, bits=bits, m=m):
            p = jq.quantizer_params(gamma, beta, bits, 6.0, max_value=m)
            c = jq.cap_params(gamma, beta, p, bits, m)
            y = jq.rounded(x * gamma) + beta
            q = jq.encode_codes(x, y > 0, p, bits, c, y >= m)
            xhat, mask, sat = jq.centres_and_masks_capped(q, p, c, bits)
            return p[:4], c[:3], q, jq.relu_from_decoded_capped(xhat, mask, sat, gamma, beta, m)

        got = jax.jit(twin)(x, gamma, beta)
        xhat, mask, sat = quantizer.centres_and_masks_capped(codes, params, caps, bits)
        a = quantizer.relu_from_decoded_capped(xhat, mask, sat, gamma, beta, m)
        for mine, theirs in zip([*got[0], *got[1], got[2], got[3]],
                                [*params[:4], *caps[:3], codes, a]):
            np.testing.assert_array_equal(np.asarray(mine).view(np.uint32),
                                          np.asarray(theirs).view(np.uint32))
