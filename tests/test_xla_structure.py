"""The program XLA is given, and the program XLA:CPU makes of it.

GPU and TPU cannot run here, so these tests inspect what XLA compiles:

- before optimization (what every backend receives): each unit's codes are
  bundled with its forward output in an optimization barrier, and in the
  backward pass with the upstream gradient, behind a gate computed from that
  gradient. Backends that keep barriers through fusion (GPU, TPU) rely on
  this; it must not be lost by later changes.
- after optimization on CPU (whose pipeline drops barriers before fusion):
  no backward instruction reads a full-precision forward activation, and no
  buffer of an activation's size lives from the forward into the backward.
  Only the packed codes (uint32 words) cross.
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

PROGRAM = os.path.join(os.path.dirname(__file__), "xla_program.py")
# The step's parameters: (x, seed).
SEED, INPUTS = "1", "0"


# (bits, negative_slope): the leaky ReLU must keep the same structure.
@pytest.fixture(scope="module", params=[(4, 0.0), (8, 0.0), (4, 0.1)],
                ids=["bits4", "bits8", "bits4-leaky"])
def compiled(request, tmp_path_factory):
    bits, slope = request.param
    out = str(tmp_path_factory.mktemp(f"xla_bits{bits}"))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, PROGRAM, out, "--bits", str(bits), "--negative-slope", str(slope)],
        capture_output=True, text=True, env=env,
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
    xla_checks.check_backward_reads_no_forward_activation(compiled, SEED, INPUTS)


def test_only_codes_live_from_forward_into_backward(compiled):
    xla_checks.check_only_codes_live_from_forward_into_backward(compiled, SEED, INPUTS)
