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
"""

from __future__ import annotations

import os

import pytest
import xla_checks

PROGRAM = os.path.join(os.path.dirname(__file__), "jax_program.py")


@pytest.fixture(scope="module", params=[("4", 0.0), ("8", 0.0), ("4", 0.1)],
                ids=["bits4", "bits8", "bits4-leaky"])
def compiled(request, tmp_path_factory):
    bits, slope = request.param
    out = str(tmp_path_factory.mktemp(f"jax_bits{bits}"))
    return xla_checks.compile_program(PROGRAM, out, "--bits", bits, "--negative-slope",
                                      str(slope), env=dict(os.environ))


def test_codes_bundled_with_forward_output_and_upstream_gradient(compiled):
    xla_checks.check_codes_bundled_with_forward_output_and_upstream_gradient(compiled)


def test_backward_reads_no_forward_activation(compiled):
    xla_checks.check_backward_reads_no_forward_activation(
        compiled, compiled["seed_parameter"], compiled["input_parameter"])


def test_only_codes_live_from_forward_into_backward(compiled):
    xla_checks.check_only_codes_live_from_forward_into_backward(
        compiled, compiled["seed_parameter"], compiled["input_parameter"])
