"""Compiled CPU kernels of the transformer units' codes (`keras_blpa.transformer.codes`).

TensorFlow's graph executor runs each op as a pass of its own: the pure
row code is a dozen passes over the tensor (min, max, subtract, divide,
round, clip, cast...), its decode three. The ops of
`custom_ops/tf_op/row_codes.cc` do each in one pass, with the same results
bit for bit as a `tf.function` (or XLA) runs them, where `span / (2**bits - 1)`
becomes a product with the constant's float32 reciprocal (eager TensorFlow
divides, which can differ in the scale's last bit):

- `encode_rows(v, bits)` / `decode_rows(words, lo, scale, shape, bits)`: the
  row code, `code = clip(round((v - lo) / scale), 0, 2**bits - 1)` and
  `v_q = lo + code * scale`;
- `encode_bins(x, edges, bits)`: the packed derivative code,
  `pack(sum(x > edge))`;
- `scale_by_bins(g, words, levels, bits)`: `g * levels[code]`.

`compiled()` says whether to use them: not when
`KERAS_BLPA_DISABLE_CUSTOM_OPS` is set (silently), not inside an
XLA-compiled function (no XLA kernel; the pure ops compile and fuse there),
not where a GPU is visible (CPU kernels only: placing them on the host
would copy every activation), and not when the op library is missing or
predates these ops (one `RuntimeWarning`, from `kernels.load` or here).
"""

from __future__ import annotations

import functools
import warnings

import tensorflow as tf

from keras_blpa.backend.tensorflow import kernels, xla

_ROW_OPS = ("blpa_row_encode", "blpa_row_decode", "blpa_bins_packed", "blpa_bins_scale")
_warned_stale = False


@functools.cache
def _gpu_visible() -> bool:
    return bool(tf.config.list_logical_devices("GPU"))


def _module():
    """The op module when the compiled kernels apply here, else None."""
    global _warned_stale
    if kernels.disabled() or xla.in_xla_context() or _gpu_visible():
        return None
    module = kernels.load()  # None after its one warning when unavailable
    if module is None:
        return None
    if not all(hasattr(module, name) for name in _ROW_OPS):
        if not _warned_stale:
            _warned_stale = True
            warnings.warn(
                "keras_blpa: the compiled op library has no row-code ops (built from older "
                "sources, e.g. KERAS_BLPA_OP_LIBRARY); the transformer units use the "
                "pure-TensorFlow codes instead (same results, slower). Rebuild with "
                "`python -m keras_blpa.build_ops`.",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    return module


def compiled() -> bool:
    """True when the codes run as the compiled ops here (module docstring)."""
    return _module() is not None


def encode_rows(v: tf.Tensor, bits: int) -> list[tf.Tensor]:
    """`[words, lo, scale]` of float32 `v`, `[rows, features]` or `[rows, groups,
    features]`: uint8 `[rows, columns]` at 8 bits, uint32 words of 8 rows at 4."""
    words_type = tf.uint8 if bits == 8 else tf.uint32
    return list(_module().blpa_row_encode(v, bits=bits, words_type=words_type))


def decode_rows(words: tf.Tensor, lo: tf.Tensor, scale: tf.Tensor, shape, bits: int) -> tf.Tensor:
    """float32 `shape` (`[rows, features]` or `[rows, groups, features]`)."""
    v = _module().blpa_row_decode(words, lo, scale, bits=bits)
    return tf.reshape(v, [-1, *shape[1:]]) if len(shape) > 2 else v


def encode_bins(x: tf.Tensor, edges, bits: int) -> tf.Tensor:
    """uint32 words (`pack`'s layout) of `sum(x > edge)` for float32 `[rows, features]`."""
    return _module().blpa_bins_packed(x, edges=[float(e) for e in edges], bits=bits)


def scale_by_bins(g: tf.Tensor, words: tf.Tensor, levels, bits: int) -> tf.Tensor:
    """`g * levels[code]` for float32 `g` `[rows, features]` and `encode_bins`'s words."""
    return _module().blpa_bins_scale(g, words, levels=[float(v) for v in levels], bits=bits)
