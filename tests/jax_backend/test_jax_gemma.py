"""Gemma's decoder block on JAX (bodies: `tests/gemma_tests.py`), and what JAX
keeps of a BLPA Gemma block for its backward pass."""

import pytest
from gemma_tests import *  # noqa: F401,F403
from gemma_tests import _pair
from test_jax_transformers import _residuals


@pytest.mark.parametrize("config", ["gemma1", "gemma2"])
def test_gemma_block_keeps_codes_per_row_floats_and_the_rotary_tables(config):
    """Beside the weights, the 8-bit block keeps integer codes, per-row floats
    (a row: a token, or a token and head), the norms' `1 + scale` and the
    rotary embedding's cos and sin tables (`[sequence, head_dim]`, whatever
    the batch). KerasHub's keeps full floats."""
    stock, blpa, x = _pair(config, bits=8, dropout=0.1)
    rows = x.shape[0] * x.shape[1] * 4  # tokens x query heads
    kept = [r for r in _residuals(blpa, x) if "from the argument" not in r[2]]
    assert kept and {r[0] for r in kept} <= {"u32", "i32", "f32"}, kept
    floats = [r for r in kept if r[0].startswith(("f", "bf"))]
    tables = [r for r in floats if r[2].startswith(("output of cos", "output of sin"))]
    assert [size for _, size, _ in tables] == [x.shape[1] * 16] * 4, tables  # q's and k's
    others = [r for r in floats if r not in tables]
    assert others and all(size <= rows for _, size, _ in others), others
    stock_floats = [r for r in _residuals(stock, x)
                    if r[0] == "f32" and r[1] > rows and "from the argument" not in r[2]]
    assert len(stock_floats) > 10  # the check can fail: stock keeps many
