"""Few-bit codes of an activation's derivative (the MLP unit's backward).

The backward pass of `a = f(h)` needs only `f'(h)`. For a smooth `f` (GELU,
SiLU) the unit keeps a `bits`-bit bin index of `h` and the backward reads
`f'(h)` as that bin's level: a piecewise-constant `q(h)` with `2**bits`
pieces. The edges and levels minimize the expected squared error

    E[(f'(h) - q(h))**2],   h ~ prior (about N(0, 1), below),

the distribution of a pre-activation whose Dense input is normalized (the
MLP follows a LayerNorm), widened to an equal mixture of N(0, s**2) for s
in 1, 1.5, 2 and 3, since training widens it (`_SCALES`). Each level is its
bin's conditional mean of `f'`, which also makes the approximation unbiased
over the prior. The edges come
from an exact dynamic program over a fine grid (optimal contiguous
partition), computed once per (activation, bits) in NumPy. For ReLU the
derivative is a step: one bit, edge 0, levels 0 and 1, exact.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

SUPPORTED = ("gelu", "gelu_tanh", "silu", "relu")
DERIVATIVE_BITS = (1, 2, 3, 4)
# The dynamic program's grid: bins narrower than this are not resolved.
_GRID = np.linspace(-8.0, 8.0, 1601)
# The prior's scales: a normalized Dense input gives unit-variance
# pre-activations at initialization, but training grows the kernels (a
# 4-block byte GPT after 1000 steps: wider, mostly negative). Fitted to
# N(0, 1) alone, every edge sat inside [-1, 1] and the outer levels (about
# -0.1, GELU's dip) applied to the whole far tail, where f' is 0: 3- and
# 4-bit codes did worse there than 2-bit ones.
_SCALES = (1.0, 1.5, 2.0, 3.0)


def prior(x: np.ndarray) -> np.ndarray:
    """The fitting prior's density (unnormalized) at `x`: an equal mixture of
    N(0, s**2) over `_SCALES`."""
    return sum(np.exp(-0.5 * (x / s) ** 2) / s for s in _SCALES)


class DerivativeCode(NamedTuple):
    """`edges` (float32, ascending, `levels - 1`) and `levels` (float32)."""

    edges: np.ndarray
    levels: np.ndarray

    @property
    def bits(self) -> int:
        return max(1, int(len(self.levels) - 1).bit_length())


def check_activation(activation: str, argument: str = "activation") -> str:
    """The activation's canonical name, or a ValueError naming `argument`."""
    names = {"gelu": "gelu", "gelu_tanh": "gelu_tanh", "gelu_approximate": "gelu_tanh",
             "silu": "silu", "swish": "silu", "relu": "relu"}
    if not isinstance(activation, str) or activation not in names:
        raise ValueError(
            f"`{argument}` must be one of {sorted(names)} (the units keep a code of its "
            f"derivative); received {argument}={activation!r}. For another activation keep "
            "the stock keras.layers.Dense."
        )
    return names[activation]


def check_derivative_bits(bits: int) -> None:
    """Raises a ValueError naming `derivative_bits` unless it is 1 to 4."""
    if not (isinstance(bits, int) and not isinstance(bits, bool) and bits in DERIVATIVE_BITS):
        raise ValueError(
            f"`derivative_bits` must be one of {DERIVATIVE_BITS}; received "
            f"derivative_bits={bits!r}. 2 or 3 keep GELU/SiLU gradients close (see "
            "docs/transformers.md); use bits=None for the exact derivative."
        )


def derivative(activation: str, x: np.ndarray) -> np.ndarray:
    """`f'(x)` in float64, for the activations in `SUPPORTED`."""
    x = np.asarray(x, np.float64)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
        return cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    if activation == "gelu_tanh":
        c = math.sqrt(2.0 / math.pi)
        inner = c * (x + 0.044715 * x**3)
        t = np.tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)
    if activation == "silu":
        s = 1.0 / (1.0 + np.exp(-x))
        return s * (1.0 + x * (1.0 - s))
    if activation == "relu":
        return (x > 0).astype(np.float64)
    raise ValueError(check_activation(activation))


@functools.cache
def fit(activation: str, bits: int) -> DerivativeCode:
    """The optimal `bits`-bit piecewise-constant code of `f'` (module docstring)."""
    activation = check_activation(activation)
    check_derivative_bits(bits)
    if activation == "relu":
        return DerivativeCode(np.zeros(1, np.float32), np.array([0.0, 1.0], np.float32))
    x = _GRID
    weight = prior(x)
    values = derivative(activation, x)
    # Prefix sums: the weighted squared error of any contiguous run in O(1).
    w = np.concatenate([[0.0], np.cumsum(weight)])
    s1 = np.concatenate([[0.0], np.cumsum(weight * values)])
    s2 = np.concatenate([[0.0], np.cumsum(weight * values * values)])
    n = len(x)
    start = np.arange(n + 1)[:, None]
    stop = np.arange(n + 1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        mass = w[stop] - w[start]
        first = s1[stop] - s1[start]
        cost = s2[stop] - s2[start] - np.where(mass > 0, first * first / mass, 0.0)
    cost = np.where(stop > start, cost, np.inf)
    # best[j]: least error of the first j points in `pieces` runs.
    best = cost[0].copy()
    splits = []
    for _ in range(2**bits - 1):
        total = best[:, None] + cost
        splits.append(np.argmin(total, axis=0))
        best = total[splits[-1], np.arange(n + 1)]
    # Walk back from all n points to the run boundaries.
    bounds = [n]
    for split in reversed(splits):
        bounds.append(int(split[bounds[-1]]))
    bounds = [0] + bounds[::-1]
    levels = [(s1[b] - s1[a]) / (w[b] - w[a]) for a, b in zip(bounds[:-1], bounds[1:])]
    edges = [0.5 * (x[b - 1] + x[b]) for b in bounds[1:-1]]
    return DerivativeCode(np.asarray(edges, np.float32), np.asarray(levels, np.float32))


def expected_error(activation: str, bits: int) -> float:
    """Root of `E[(f'(h) - q(h))**2]` under the fitting prior (for docs/tests)."""
    code = fit(activation, bits)
    x = _GRID
    weight = prior(x)
    q = code.levels[np.searchsorted(code.edges, x.astype(np.float32), side="left")]
    err = (derivative(activation, x) - q) ** 2
    return float(np.sqrt(np.sum(weight * err) / np.sum(weight)))
