"""The transformer units' exact gradient oracle, in float64 NumPy.

Given what a unit saved (`keras_blpa.transformer.codes.recording()`), the
codes are unpacked and decoded here independently of the library's
decoders, checked against the values they code (derivative bins exactly;
row codes within half a step), and the unit's backward pass is computed by
hand in float64: the gradient the unit must return for those codes.
"""

from __future__ import annotations

import math

import numpy as np

from keras_blpa.transformer import derivative


def unpack(words, rows: int, bits: int) -> np.ndarray:
    """int64 codes `[rows, features]` of uint32 words packed along the rows:
    row r sits in word r // k at bit (r % k) * bits, k = 32 // bits."""
    if np.asarray(words).dtype == np.uint8:  # TensorFlow outside XLA keeps 8-bit codes so
        return np.asarray(words).astype(np.int64)
    words = np.asarray(words).astype(np.uint64)
    k = 32 // bits
    r = np.arange(rows)
    shifts = ((r % k) * bits).astype(np.uint64)[:, None]
    return ((words[r // k] >> shifts) & np.uint64((1 << bits) - 1)).astype(np.int64)


def decode_rows(words, lo, scale, rows: int, bits: int) -> np.ndarray:
    codes = unpack(words, rows, bits)
    return np.asarray(lo, np.float64)[:, None] + codes * np.asarray(scale, np.float64)[:, None]


def check_rows(decoded: np.ndarray, values, scale) -> None:
    """Row codes decode within half a step (and a float32 rounding) of `values`."""
    values = np.asarray(values, np.float64).reshape(decoded.shape)
    step = np.asarray(scale, np.float64)[:, None]
    error = np.abs(decoded - values) - 0.5 * step
    assert np.all(error <= 1e-6 * (1 + np.abs(values))), f"worst {error.max():.3g}"


def activation(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if name == "gelu":
        return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if name == "silu":
        return x / (1 + np.exp(-x))
    if name == "relu":
        return np.maximum(x, 0)
    return x


def slope(name: str, x: np.ndarray) -> np.ndarray:
    """The exact derivative, by central differences of `activation` in float64
    (independent of `derivative.derivative`); ReLU's at 0 is 0 as in Keras."""
    x = np.asarray(x, np.float64)
    if name == "relu":
        return (x > 0).astype(np.float64)
    if name == "linear":
        return np.ones_like(x)
    eps = 1e-5
    return (activation(name, x + eps) - activation(name, x - eps)) / (2 * eps)


def derivative_levels(h, words, name: str, derivative_bits, near: float = 0.0) -> np.ndarray:
    """float64 `f'` levels of the derivative code `words` of `[rows, features]`
    `h`, checked to be the bins of `h` (except within `near` of an edge)."""
    fit = derivative.fit(name, derivative_bits if name != "relu" else 1)
    width = max(1, (len(fit.levels) - 1).bit_length())
    code = unpack(words, h.shape[0], width)
    expected = np.sum(h[..., None] > fit.edges[None, None, :], axis=-1)
    far = np.min(np.abs(h[..., None] - fit.edges[None, None, :]), axis=-1) >= near
    assert np.array_equal(code[far], expected[far]), "derivative codes are not the bins of h"
    return fit.levels.astype(np.float64)[code]


def activation_dense(h, kernel, bias, g, name: str, bits, derivative_bits, saved) -> list:
    """`[g_h, d_kernel, d_bias]` of `dense(f(h))` for upstream `g`, from `saved`."""
    h = np.asarray(h, np.float32)
    features = h.shape[-1]
    rows = h.size // features
    h2 = h.reshape(rows, features)
    if bits is None:
        a = activation(name, h2)
        d = slope(name, h2)
    else:
        words, lo, scale = saved[-3:]
        a = decode_rows(words, lo, scale, rows, bits)
        check_rows(a, activation(name, h2), scale)
        d = np.ones_like(a) if name == "linear" else \
            derivative_levels(h2, saved[0], name, derivative_bits)
    g2 = np.asarray(g, np.float64).reshape(rows, -1)
    kernel = np.asarray(kernel, np.float64)
    g_a = g2 @ kernel.T
    grads = [(g_a * d).reshape(h.shape), a.T @ g2]
    if bias is not None:
        grads.append(g2.sum(0))
    return grads


def dense_activation(x, kernel, bias, g, name: str, bits, derivative_bits, saved) -> list:
    """`[g_x, d_kernel, d_bias]` of `f(x @ kernel + bias)` for upstream `g`, from
    `saved`: a row code of `x` and the derivative code of the pre-activation
    (with `bits=None`, `x` itself and the exact `f'`)."""
    x = np.asarray(x, np.float32)
    features = x.shape[-1]
    rows = x.size // features
    x2 = x.reshape(rows, features)
    kernel = np.asarray(kernel, np.float64)
    h = x2.astype(np.float64) @ kernel + (0.0 if bias is None else np.asarray(bias, np.float64))
    if bits is None:
        d = np.ones_like(h) if name == "linear" else slope(name, h)
        xq = x2.astype(np.float64)
    else:
        words, lo, scale = saved[-3:]
        xq = decode_rows(words, lo, scale, rows, bits)
        check_rows(xq, x2, scale)
        # The unit bins its float32 pre-activation; this float64 `h` may sit
        # on the other side of an edge only within rounding of it.
        d = np.ones_like(h) if name == "linear" else \
            derivative_levels(h, saved[0], name, derivative_bits, near=1e-5)
    g_h = np.asarray(g, np.float64).reshape(rows, -1) * d
    grads = [(g_h @ kernel.T).reshape(x.shape), xq.T @ g_h]
    if bias is not None:
        grads.append(g_h.sum(0))
    return grads


def gated_dense(gate, up, kernel, g, name: str, bits, derivative_bits, saved) -> list:
    """`[g_gate, g_up, d_kernel]` of `dense(f(gate) * up)` (no bias) for upstream
    `g`, from `saved`: the derivative code of `gate` and row codes of `f(gate)`
    and `up` (or, with `bits=None`, `gate` and `up` themselves)."""
    gate = np.asarray(gate, np.float32)
    features = gate.shape[-1]
    rows = gate.size // features
    gate2 = gate.reshape(rows, features).astype(np.float64)
    up2 = np.asarray(up, np.float64).reshape(rows, features)
    if bits is None:
        np.testing.assert_array_equal(np.asarray(saved[0], np.float64), gate2)
        np.testing.assert_array_equal(np.asarray(saved[1], np.float64), up2)
        f_gate, d = activation(name, gate2), slope(name, gate2)
    else:
        fit = derivative.fit(name, derivative_bits if name != "relu" else 1)
        code = unpack(saved[0], rows, max(1, (len(fit.levels) - 1).bit_length()))
        expected = np.sum(gate2[..., None] > fit.edges[None, None, :], axis=-1)
        assert np.array_equal(code, expected), "derivative codes are not the bins of gate"
        d = fit.levels.astype(np.float64)[code]
        f_gate = decode_rows(*saved[1:4], rows, bits)
        check_rows(f_gate, activation(name, gate2).astype(np.float32), saved[3])
        up_exact = up2
        up2 = decode_rows(*saved[4:7], rows, bits)
        check_rows(up2, up_exact, saved[6])
    g2 = np.asarray(g, np.float64).reshape(rows, -1)
    g_a = g2 @ np.asarray(kernel, np.float64).T
    return [(g_a * up2 * d).reshape(gate.shape), (g_a * f_gate).reshape(gate.shape),
            (f_gate * up2).T @ g2]


def norm_dense(x, gamma, beta, kernels, g_y, g_outs, norm: str, epsilon: float, bits,
               saved) -> list:
    """`[g_x, d_gamma, d_beta, *d_kernels]` of `dense_i(norm(x))` (no biases)."""
    x = np.asarray(x, np.float64)
    features = x.shape[-1]
    rows = x.size // features
    x2 = x.reshape(rows, features)
    if norm == "rms":
        inv_true = 1 / np.sqrt(np.mean(x2**2, -1) + epsilon)
        xhat_true = x2 * inv_true[:, None]
    else:
        inv_true = 1 / np.sqrt(np.var(x2, -1) + epsilon)
        xhat_true = (x2 - x2.mean(-1, keepdims=True)) * inv_true[:, None]
    inv = np.asarray(saved[-1], np.float64)
    np.testing.assert_allclose(inv, inv_true, rtol=1e-5)
    if bits is None:  # x itself, normalized again by the backward
        np.testing.assert_array_equal(np.asarray(saved[0], np.float64), x2)
        xhat = xhat_true
    else:
        xhat = decode_rows(*saved[:3], rows, bits)
        check_rows(xhat, xhat_true.astype(np.float32), saved[2])
    gamma, beta = np.asarray(gamma, np.float64), np.asarray(beta, np.float64)
    y = xhat * gamma + (0 if norm == "rms" else beta)
    g_y2 = np.asarray(g_y, np.float64).reshape(rows, features)
    d_kernels = []
    for kernel, g_out in zip(kernels, g_outs):
        shape = np.shape(kernel)
        kernel = np.asarray(kernel, np.float64).reshape(features, -1)
        g_out = np.asarray(g_out, np.float64).reshape(rows, -1)
        d_kernels.append((y.T @ g_out).reshape(shape))
        g_y2 = g_y2 + g_out @ kernel.T
    g_xhat = g_y2 * gamma
    proj = np.mean(g_xhat * xhat, -1, keepdims=True)
    centred = g_xhat if norm == "rms" else g_xhat - g_xhat.mean(-1, keepdims=True)
    g_x = inv[:, None] * (centred - xhat * proj)
    d_beta = np.zeros_like(beta) if norm == "rms" else g_y2.sum(0)
    return [g_x.reshape(x.shape), (g_y2 * xhat).sum(0), d_beta, *d_kernels]


def attention(q, k, v, mask, kernel, g, scale: float, bits, saved, soft_cap=None) -> list:
    """`[g_q, g_k, g_v, d_kernel]` of `einsum(softmax(scale q k^T, mask) v, kernel)`;
    k and v may have fewer heads (grouped-query: each serves consecutive q heads);
    with `soft_cap`, the scaled logits are capped at `cap tanh(logits / cap)`."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    batch, length, heads, dim = q.shape
    if bits is not None:
        coded = []
        for i, t in enumerate((q, k, v)):
            # Words `[tokens / k, heads * dim]`, `lo` and `scale` `[tokens, heads]`:
            # a row per token and head.
            words, lo, step = saved[3 * i: 3 * i + 3]
            # k and v: their own length (cross-attention) and head size.
            codes = unpack(words, t.shape[0] * t.shape[1], bits).reshape(-1, t.shape[-1])
            lo, step = (np.asarray(p, np.float64).reshape(-1) for p in (lo, step))
            decoded = lo[:, None] + codes * step[:, None]
            check_rows(decoded, t.astype(np.float32), step)
            coded.append(decoded.reshape(t.shape))
        q, k, v = coded
    groups = heads // k.shape[2]
    k, v = (np.repeat(t, groups, axis=2) for t in (k, v))
    if mask is not None:
        bits_kept = unpack(saved[-1], batch * length, 1).reshape(np.shape(mask))
        assert np.array_equal(bits_kept.astype(bool), np.asarray(mask)), "mask bits differ"
        keep = np.asarray(mask)[:, None]
    else:
        keep = np.ones((batch, 1, length, k.shape[1]), bool)
    logits = scale * np.einsum("bqhd,bkhd->bhqk", q, k)
    capped = 1.0 if soft_cap is None else 1 - np.tanh(logits / soft_cap) ** 2  # its slope
    if soft_cap is not None:
        logits = soft_cap * np.tanh(logits / soft_cap)
    scores = np.where(keep, logits, -1e9)
    soft = np.exp(scores - scores.max(-1, keepdims=True))
    soft /= soft.sum(-1, keepdims=True)
    probs = np.where(keep, soft, 0)
    o = np.einsum("bhqk,bkhd->bqhd", probs, v)
    kernel = np.asarray(kernel, np.float64)
    g = np.asarray(g, np.float64)
    d_kernel = np.einsum("bqhd,bqe->hde", o, g)
    g_o = np.einsum("bqe,hde->bqhd", g, kernel)
    g_v = np.einsum("bhqk,bqhd->bkhd", probs, g_o)
    g_probs = np.where(keep, np.einsum("bqhd,bkhd->bhqk", g_o, v), 0)
    g_scores = soft * (g_probs - np.sum(g_probs * soft, -1, keepdims=True))
    g_scores = np.where(keep, g_scores, 0) * capped
    g_q = scale * np.einsum("bhqk,bkhd->bqhd", g_scores, k)
    g_k = scale * np.einsum("bhqk,bqhd->bkhd", g_scores, q)
    g_k, g_v = (t.reshape(batch, -1, heads // groups, groups, dim).sum(3) for t in (g_k, g_v))
    return [g_q, g_k, g_v, d_kernel]


def worst_error(got, want) -> float:
    """Largest |got - want| relative to the largest |want|."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
