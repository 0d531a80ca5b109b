"""The transformer units and blocks on JAX (bodies: `tests/transformer_tests.py`),
and what JAX keeps of a block for its backward pass."""

import contextlib
import io
import re

import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from transformer_tests import *  # noqa: F401,F403
from transformer_tests import _block_pair


def _residuals(block, x) -> list[tuple[str, int, str]]:
    """`(dtype, elements, source)` of what JAX keeps from the block's training
    forward for its backward pass (`print_saved_residuals`)."""
    frozen = [v.value for v in block.non_trainable_variables]

    def loss(trainable, x):
        out, _ = block.stateless_call(trainable, frozen, x, training=True)
        return out.sum()

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        print_saved_residuals(loss, [v.value for v in block.trainable_variables], x)
    found = []
    for line in text.getvalue().splitlines():
        match = re.match(r"(\w+)\[([\d,]*)\] (.*)", line)
        if match:
            dims = [int(d) for d in match.group(2).split(",") if d]
            found.append((match.group(1), int(np.prod(dims)), match.group(3)))
    return found


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_only_codes_and_per_row_floats_cross_into_the_backward(kind):
    """Beside the weights, a BLPA block keeps integer codes and per-row floats
    (a row: one token, or one token and head); KerasHub's keeps full floats."""
    stock, blpa, x = _block_pair(kind, bits=8, dropout=0.1)
    rows = x.shape[0] * x.shape[1] * 4  # tokens x heads
    kept = [r for r in _residuals(blpa, x) if "from the argument" not in r[2]]
    floats = [r for r in kept if r[0].startswith(("f", "bf"))]
    assert kept and all(size <= rows for _, size, _ in floats), floats
    assert {r[0] for r in kept} <= {"u32", "i32", "f32"}
    stock_floats = [r for r in _residuals(stock, x)
                    if r[0] == "f32" and r[1] > rows and "from the argument" not in r[2]]
    assert len(stock_floats) > 10  # the check can fail: stock keeps many
