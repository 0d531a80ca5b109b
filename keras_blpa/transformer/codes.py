"""The codes the transformer units keep, written once in `keras.ops`.

- Row codes: a `bits`-bit affine code of each row (token) of a `[rows,
  features]` tensor, `v ~ lo + code * scale` with `lo` and `scale` per row
  (the row's minimum and `(max - min) / (2**bits - 1)`), rounded to nearest:
  within half a step of the value. A row keeps `features * bits / 8` bytes
  plus two floats.
- Derivative codes: the bin of `h` among the edges of
  `keras_blpa.transformer.derivative.fit` (`sum(h > edge)`), whose level is
  the backward's `f'(h)`.

Both pack into uint32 words along the rows through the backend's
`autodiff.pack` (a reduce-window under XLA, which keeps the float input from
being fused into the backward pass).
"""

from __future__ import annotations

import contextlib

import numpy as np
from keras import ops

from keras_blpa import backend

ROW_BITS = (4, 8)
_recorders: list[list] = []


def autodiff():
    """The backend's custom-gradient seam (`keras_blpa.backend.*.autodiff`)."""
    return backend.module("autodiff")


def compiled_codes():
    """The backend's compiled kernels of these codes where they apply, else None:
    `keras_blpa.backend.tensorflow.row_kernels` on a CPU outside XLA (the same
    codes bit for bit, each in one pass instead of an op per step)."""
    compiled = getattr(autodiff(), "compiled_codes", None)
    return None if compiled is None else compiled()


@contextlib.contextmanager
def recording():
    """Collects `(unit, saved)` for every unit run inside, in order: what each
    unit keeps for its backward pass (tests decode it independently). Eager
    only (TensorFlow eager, JAX outside `jit`): traced values are not
    collected."""
    saved: list = []
    _recorders.append(saved)
    try:
        yield saved
    finally:
        _recorders.remove(saved)


def record(unit: str, saved: list) -> None:
    """Hands a unit's saved tensors to every active `recording()`."""
    for recorder in _recorders:
        recorder.append((unit, list(saved)))


def check_bits(bits: int | None) -> None:
    """Raises a ValueError naming `bits` unless it is 4, 8 or None."""
    if bits is not None and not (isinstance(bits, int) and not isinstance(bits, bool)
                                 and bits in ROW_BITS):
        raise ValueError(
            f"`bits` must be one of {ROW_BITS} or None (exact); received bits={bits!r}. "
            "8 is the default for the transformer units; 4 saves more and loses more."
        )


def compute_linear(linear, dtype):
    """`linear(a, *weights)` with the weights cast to `dtype`, the activations'
    compute dtype, as Keras autocasts a layer's variables under a mixed
    policy (`mixed_bfloat16`: bfloat16 products of float32 variables). The
    outputs come back in `dtype`, and the cast's vjp returns each weight's
    gradient in the weight's own dtype. A no-op inside a block, whose
    `__call__` has cast them already."""

    def cast_linear(a, *weights):
        return linear(a, *(ops.cast(w, dtype) for w in weights))

    return cast_linear


def rows(x, features: int):
    """`x` as `[rows, features]` (all leading axes are rows)."""
    return ops.reshape(x, (-1, features))


def encode_rows(v, bits: int) -> list:
    """`[words, lo, scale]` of a float32 `[rows, features]` tensor, or of
    `[rows, groups, features]` (a code per row and group: a token's heads),
    whose words hold the groups side by side, `[rows / k, groups * features]`:
    no axis is merged into the rows, so a mesh axis that splits the groups
    (the heads, under tensor parallelism) needs no gather."""
    compiled = compiled_codes()
    if compiled is not None and v.dtype == "float32":
        return compiled.encode_rows(v, bits)
    top = float(2**bits - 1)
    lo = ops.min(v, axis=-1)
    span = ops.max(v, axis=-1) - lo
    scale = ops.where(span > 0, span / top, ops.ones((), span.dtype))  # not ones_like: `zero`
    code = ops.clip(ops.round((v - lo[..., None]) / scale[..., None]), 0.0, top)
    columns = int(np.prod(v.shape[1:]))
    return [autodiff().pack(ops.reshape(ops.cast(code, "int32"), (-1, columns)), bits), lo, scale]


def decode_rows(words, lo, scale, shape, bits: int):
    """float32 `shape` (`[rows, features]` or `[rows, groups, features]`) from
    `encode_rows`'s result."""
    compiled = compiled_codes()
    if compiled is not None:
        return compiled.decode_rows(words, lo, scale, shape, bits)
    columns = int(np.prod(shape[1:]))
    code = ops.cast(autodiff().unpack(words, (shape[0], columns), bits), "float32")
    if len(shape) > 2:
        code = ops.reshape(code, (-1, *shape[1:]))
    return lo[..., None] + code * scale[..., None]


def rows_per_word(words, bits: int | None) -> int:
    """Rows of `encode_rows`'s codes in one row of `words` (uint8: one)."""
    return 1 if bits is None or words.dtype == "uint8" else 32 // bits


def decode_row_slice(words, lo, scale, group: tuple, bits: int, first, last):
    """float32 rows `first:last` (`[rows, *group]`) of `encode_rows`'s codes;
    `first` on a word's first row (a multiple of `rows_per_word`)."""
    per_word = rows_per_word(words, bits)
    words = words[first // per_word: -(-last // per_word)]
    lo, scale = lo[first:last], scale[first:last]
    return decode_rows(words, lo, scale, (ops.shape(lo)[0], *group), bits)


def encode_derivative(h, edges: np.ndarray):
    """int32 bin indices `sum(h > edge)` of float32 `h` (any shape)."""
    return autodiff().bins(h, edges)


def decode_derivative(code, levels: np.ndarray):
    """float32 `f'` levels of int32 bin indices."""
    return ops.take(ops.convert_to_tensor(levels, "float32"), code)


def pack_derivative(h, edges: np.ndarray, bits: int):
    """`autodiff().pack(encode_derivative(h, edges), bits)` of float32 `h`
    `[rows, features]` (`bits` < 8)."""
    compiled = compiled_codes()
    if compiled is not None:
        return compiled.encode_bins(h, edges, bits)
    return autodiff().pack(encode_derivative(h, edges), bits)


def scale_by_derivative(g, words, shape, levels: np.ndarray, bits: int):
    """`g * f'` with `f'` the levels of `pack_derivative`'s `words`; float32 `g`
    of `shape` (`[rows, features]`)."""
    compiled = compiled_codes()
    if compiled is not None:
        return compiled.scale_by_bins(g, words, levels, bits)
    return g * decode_derivative(autodiff().unpack(words, shape, bits), levels)


def dropout(x, seed, rate: float):
    """`x` with dropout at `rate` whose mask is a pure function of `seed`
    (`autodiff.dropout_keep`); also the backward's gradient map. `rate` 0: `x`."""
    if not rate:
        return x
    return apply_keep(x, autodiff().dropout_keep(seed, ops.shape(x), rate, x), rate)


def apply_keep(x, keep, rate: float):
    """`x` with dropout at `rate` of keep mask `keep` (bool, `x`'s shape)."""
    return ops.where(keep, x / ops.cast(1.0 - rate, x.dtype), zero(x))


def zero(x):
    """A scalar zero of `x`'s dtype, for `ops.where` to broadcast. Not
    `zeros_like(x)`: of a static shape, TensorFlow's graph optimizer folds
    that into a constant the function holds from step to step (an `s**2`
    tensor per batch for the attention's mask)."""
    return ops.zeros((), x.dtype)
