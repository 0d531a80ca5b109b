"""The quantizer's settings, shared by every backend: bit widths, windows,
bin widths, the per-channel grid parameters and the word layout's geometry.

No tensor library is imported here: the TensorFlow quantizer
(`keras_blpa.backend.tensorflow.quantizer`), the JAX one (`keras_blpa.backend.jax.quantizer`)
and the layers' argument checks all use these, so that every path draws the
same grid from the same numbers. See `keras_blpa.backend.tensorflow.quantizer` for the method.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import numpy as np

PAPER_WINDOW = 6.0
# Grid window (standard deviations) per bit width when the caller gives none.
# Measured on partly trained ResNets (benchmarks/results/accuracy/): at 8 bits
# a 12-sigma window cuts the weight-gradient error about 8x against the
# paper's 6. At 4 bits rounding and clipping balance between 6 and 8 (7 is at
# most 7% better per layer; 6 and 8 train alike over 11 paired runs), so the
# paper's 6 stays.
DEFAULT_WINDOW = {4: 6.0, 8: 12.0}
SUPPORTED_BITS = (4, 8)


class QuantParams(NamedTuple):
    """Per-channel grid parameters, all float32 of shape `[C]`.

    lo: lower edge of the grid in normalized units.
    k: index of the bin edge at the ReLU threshold; codes `>= k` are on
      when `flip == 0`. Constant channels use `k = 0` (on) or `k = n` (off).
    flip: 1.0 where gamma < 0 (codes `< k` are on), else 0.0.
    aligned: 1.0 where the threshold lies inside the window (mask exact for
      every value), 0.0 for constant-mask channels.
    window: the grid window in standard deviations (a Python float, already
      rounded to float32 so that the custom op's attribute sees the same value).
    """

    lo: Any
    k: Any
    flip: Any
    aligned: Any
    window: float = PAPER_WINDOW


class CapParams(NamedTuple):
    """Per-channel grid parameters of a capped ReLU's second kink
    (`min(max(y, 0), max_value)`: saturated where `y >= max_value`), float32
    `[C]` but `max_value`.

    kc: index of the bin edge nearest the cap's kink; the saturated codes are
      those `>= kc` when `flip == 0` (`< kc` when 1). Channels whose cap kink
      lies outside the window use `kc = 0` (saturated) or `kc = n` (not).
    flip: 1.0 where gamma < 0 and the kink lies inside the window.
    aligned: 1.0 where the kink lies inside the window: encoding clamps each
      code onto the side of `kc` that the forward's `y >= max_value` says, so
      the saturated mask rebuilt from a code is exact for every value.
    max_value: the cap (a Python float, rounded to float32).
    """

    kc: Any
    flip: Any
    aligned: Any
    max_value: float


def check_max_value(max_value: float | None) -> None:
    """Raises a ValueError naming `max_value` unless it is None or a finite
    number > 0 (the cap of `keras.layers.ReLU(max_value=...)`, 6 for ReLU6)."""
    is_number = isinstance(max_value, numbers.Real) and not isinstance(max_value, bool)
    finite = is_number and np.isfinite(max_value)
    if max_value is not None and not (finite and 0 < max_value <= float(np.finfo(np.float32).max)):
        raise ValueError(
            "`max_value` caps the ReLU (`keras.layers.ReLU(max_value=...)`; 6.0 for ReLU6) "
            f"and must be a finite number > 0, or None for no cap; received "
            f"max_value={max_value!r}."
        )


def resolve_max_value(max_value: float | None, negative_slope: float = 0.0) -> float | None:
    """`max_value` checked and rounded to float32 (None stays None). A cap
    with a nonzero `negative_slope` (a capped leaky ReLU) is a ValueError."""
    check_max_value(max_value)
    if max_value is not None and negative_slope:
        raise ValueError(
            f"`max_value={max_value!r}` with `negative_slope={negative_slope!r}`: a "
            "capped leaky ReLU is not supported. Use one of them, or stock layers."
        )
    return None if max_value is None else float(np.float32(max_value))


def check_bits(bits: int | None, allow_none: bool = True) -> None:
    """Raises a ValueError naming `bits` unless it is 4, 8 (or None)."""
    allowed = SUPPORTED_BITS + ((None,) if allow_none else ())
    is_int = isinstance(bits, numbers.Integral) and not isinstance(bits, bool)
    if not (bits is None and allow_none) and not (is_int and bits in SUPPORTED_BITS):
        exact = ", or bits=None to keep exact activations" if allow_none else ""
        raise ValueError(
            f"`bits` must be one of {allowed}; received bits={bits!r}. Use "
            f"bits=4 or bits=8 for BLPA{exact}."
        )


def check_window(window: float | None) -> None:
    """Raises a ValueError naming `window` unless it is None or a number in (0, 64]."""
    is_number = isinstance(window, numbers.Real) and not isinstance(window, bool)
    if window is not None and not (is_number and 0.0 < float(window) <= 64.0):
        raise ValueError(
            "`window` is the quantization range in standard deviations and must be "
            f"a number in (0, 64], or None for the default per bit width "
            f"{DEFAULT_WINDOW}; received window={window!r}."
        )


def resolve_window(bits: int, window: float | None = None) -> float:
    """The window for `bits`: `window` rounded to float32, or the default."""
    check_bits(bits, allow_none=False)
    check_window(window)
    value = DEFAULT_WINDOW[bits] if window is None else window
    return float(np.float32(value))


def bin_width(bits: int, window: float | None = None) -> float:
    """Width of one bin in normalized units: `window / 2**bits`."""
    return resolve_window(bits, window) / (1 << bits)



def codes_per_word(bits: int) -> int:
    """How many `bits`-bit codes one uint32 word of `pack_words` holds.

    Any width from 1 to 8 packs (the transformer units keep 1- to 4-bit
    derivative codes); the BN units' grid itself takes only `SUPPORTED_BITS`.
    """
    if not (isinstance(bits, numbers.Integral) and not isinstance(bits, bool) and 1 <= bits <= 8):
        raise ValueError(f"codes pack at 1 to 8 bits; received bits={bits!r}.")
    return 32 // bits


def word_axis(rank: int) -> int:
    """The axis `pack_words` packs along: 1 (rows) for rank >= 4, else 0."""
    return 1 if rank >= 4 else 0


def words_shape(shape, bits: int) -> tuple[int, ...]:
    """Static shape of the word layout for codes of a static `shape`: the
    word axis (`word_axis`) shrinks to `ceil(size / codes_per_word(bits))`."""
    dims = [int(d) for d in shape]
    axis = word_axis(len(dims))
    dims[axis] = -(-dims[axis] // codes_per_word(bits))
    return tuple(dims)
