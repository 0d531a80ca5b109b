"""keras_blpa.layers.MultiHeadAttention on JAX (bodies: `tests/mha_tests.py`), and
what JAX keeps of it for the backward pass."""

import contextlib
import io
import re

import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from mha_tests import *  # noqa: F401,F403
from mha_tests import _call_args, _pair


def _residuals(layer, inputs, call) -> list[tuple[str, int, str]]:
    """`(dtype, elements, source)` of what JAX keeps from the layer's training
    forward for its backward pass (`print_saved_residuals`)."""
    frozen = [v.value for v in layer.non_trainable_variables]

    def loss(trainable, *tensors):
        out, _ = layer.stateless_call(trainable, frozen, *_call_args(list(tensors)),
                                      training=True, **call)
        return out.sum()

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        print_saved_residuals(loss, [v.value for v in layer.trainable_variables], *inputs)
    found = []
    for line in text.getvalue().splitlines():
        match = re.match(r"(\w+)\[([\d,]*)\] (.*)", line)
        if match:
            dims = [int(d) for d in match.group(2).split(",") if d]
            found.append((match.group(1), int(np.prod(dims)), match.group(3)))
    return found


@pytest.mark.parametrize("case", ["causal", "cross"])
def test_only_codes_and_per_row_floats_cross_into_the_backward(case):
    """Beside the weights and inputs, the layer keeps integer codes and
    per-row floats (a row: one token, or one token and head); Keras's keeps
    full floats (q, k, v, the probabilities, ...)."""
    stock, blpa, inputs, call = _pair(case, bits=8, dropout=0.1)
    tokens = sum(x.shape[0] * x.shape[1] for x in inputs)
    rows = tokens * blpa.num_heads
    kept = [r for r in _residuals(blpa, inputs, call) if "from the argument" not in r[2]]
    floats = [r for r in kept if r[0].startswith(("f", "bf"))]
    assert kept and all(size <= rows for _, size, _ in floats), floats
    assert {r[0] for r in kept} <= {"u32", "i32", "f32"}
    stock_floats = [r for r in _residuals(stock, inputs, call)
                    if r[0] == "f32" and r[1] > rows and "from the argument" not in r[2]]
    assert len(stock_floats) >= 4  # the check can fail: stock keeps many
