"""The program JAX gives XLA for a BLPA training step, and what XLA:CPU makes of it.

The checks of `tests/test_xla_structure.py`, on the JAX unit (`tests/xla_checks.py`):

- before optimization (what the CPU, GPU and TPU compilers all receive): each
  unit's codes share an optimization barrier with its forward output and, in
  the backward, with the upstream gradient behind a gate computed from it.
  XLA:GPU and the TPU compiler keep barriers through fusion and scheduling.
- after optimization on CPU (which drops barriers before fusion): no
  backward instruction reads a full-precision forward activation (an encode
  re-fused into the backward would), and no float buffer of an activation's
  size lives from the forward into the backward (a decode hoisted before its
  upstream gradient exists would); only the packed words cross.

Both paths are compiled: the XLA custom calls (CPU's and CUDA's path, codes
uint8[N, B]) and the jnp quantizer (TPU's path, uint32 words). On the custom
calls, also: every encode runs before the backward begins and every decode
after it, with an operand computed from its upstream gradient.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import xla_checks

PROGRAM = os.path.join(os.path.dirname(__file__), "jax_program.py")


@pytest.fixture(scope="module",
                params=[("4", 0.0, "custom"), ("8", 0.0, "custom"), ("4", 0.1, "custom"),
                        ("none", 0.0, "custom"), ("4", 0.0, "jnp"), ("8", 0.0, "jnp"),
                        ("4", 0.1, "jnp")],
                ids=["bits4", "bits8", "bits4-leaky", "exact", "jnp-bits4", "jnp-bits8",
                     "jnp-bits4-leaky"])
def compiled(request, tmp_path_factory):
    bits, slope, kernels = request.param
    out = str(tmp_path_factory.mktemp(f"jax_{kernels}_bits{bits}"))
    flags = ["--jnp"] if kernels == "jnp" else []
    spec = xla_checks.compile_program(PROGRAM, out, "--bits", bits, "--negative-slope",
                                      str(slope), *flags, env=dict(os.environ))
    spec["kernels"] = kernels
    return spec


def _custom_calls(instructions, target):
    return [i for i in instructions
            if i.opcode == "custom-call" and f'custom_call_target="{target}"' in i.text]


def test_codes_bundled_with_forward_output_and_upstream_gradient(compiled):
    if compiled["kernels"] == "custom":
        pytest.skip("the jnp path's barriers (custom calls are opaque to fusion)")
    xla_checks.check_codes_bundled_with_forward_output_and_upstream_gradient(compiled)


def test_backward_reads_no_forward_activation(compiled):
    if compiled["bits"] is None:
        pytest.skip("bits=None keeps xhat itself: float by design")
    xla_checks.check_backward_reads_no_forward_activation(
        compiled, compiled["seed_parameter"], compiled["input_parameter"])


def test_only_codes_live_from_forward_into_backward(compiled):
    if compiled["kernels"] == "jnp":
        xla_checks.check_only_codes_live_from_forward_into_backward(
            compiled, compiled["seed_parameter"], compiled["input_parameter"])
        return
    if compiled["bits"] is None:
        pytest.skip("bits=None keeps xhat itself: float by design")
    bits = compiled["bits"]
    codes = Counter(
        (u["input_shape"][0], int(np.prod(u["input_shape"][1:])) * bits // 8)
        for u in compiled["units"]
    )
    xla_checks.check_only_codes_live_from_forward_into_backward(
        compiled, compiled["seed_parameter"], compiled["input_parameter"],
        codes_dtype="u8", expected=codes)


def test_encodes_run_in_the_forward_and_decodes_wait_for_their_gradient(compiled):
    if compiled["kernels"] == "jnp":
        pytest.skip("custom calls only")
    after = compiled["after"]
    exact = compiled["bits"] is None
    encode = "blpa_exact_forward" if exact else "blpa_encode"
    decode = "blpa_exact_relu" if exact else "blpa_decode_relu"
    seed, start = xla_checks.boundary(after, compiled["seed_parameter"],
                                      compiled["input_parameter"])
    position = {i.name: p for p, i in enumerate(after)}
    units = len(compiled["units"])
    encodes, decodes = _custom_calls(after, encode), _custom_calls(after, decode)
    assert len(encodes) == units and len(decodes) == units, (len(encodes), len(decodes))
    assert all(position[e.name] < start for e in encodes)
    for d in decodes:
        assert position[d.name] >= start, d.text
        assert xla_checks.depends_on(after, d.operands[-1], seed), d.text
    assert len(_custom_calls(after, "blpa_exact_sums" if exact else "blpa_bn_sums")) == units
