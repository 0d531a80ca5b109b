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

import glob
import json
import os
import subprocess
import sys

import pytest
import xla_checks

from keras_blpa import xla_dump

PROGRAM = os.path.join(os.path.dirname(__file__), "jax_program.py")


@pytest.fixture(scope="module", params=[("4", 0.0), ("8", 0.0), ("4", 0.1)],
                ids=["bits4", "bits8", "bits4-leaky"])
def compiled(request, tmp_path_factory):
    bits, slope = request.param
    out = str(tmp_path_factory.mktemp(f"jax_bits{bits}"))
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, PROGRAM, out, "--bits", bits, "--negative-slope", str(slope)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(out, "spec.json")) as f:
        spec = json.load(f)
    (before,) = glob.glob(os.path.join(out, "*blpa_step*before_optimizations.txt"))
    with open(before) as f:
        spec["before"] = xla_dump.entry_instructions(f.read())
    assignment = xla_dump.load(out, "blpa_step")[-1]
    spec["assignment"] = assignment
    spec["after"] = xla_dump.entry_instructions(xla_dump.optimized_hlo(assignment))
    return spec


def test_codes_bundled_with_forward_output_and_upstream_gradient(compiled):
    xla_checks.check_codes_bundled_with_forward_output_and_upstream_gradient(compiled)


def test_backward_reads_no_forward_activation(compiled):
    xla_checks.check_backward_reads_no_forward_activation(
        compiled, compiled["seed_parameter"], compiled["input_parameter"])


def test_only_codes_live_from_forward_into_backward(compiled):
    xla_checks.check_only_codes_live_from_forward_into_backward(
        compiled, compiled["seed_parameter"], compiled["input_parameter"])
