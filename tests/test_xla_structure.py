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

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import xla_checks

PROGRAM = os.path.join(os.path.dirname(__file__), "xla_program.py")
# The step's parameters: (x, seed).
SEED, INPUTS = "1", "0"


# (bits, negative_slope): the leaky ReLU must keep the same structure.
SETTINGS = [(4, 0.0), (8, 0.0), (4, 0.1)]


@pytest.fixture(scope="module")
def programs(request, tmp_path_factory):
    """The selected tests' settings' programs, compiled in fresh processes run
    side by side, one per core (each spends seconds importing TensorFlow on
    one core)."""
    selected = {item.callspec.params["compiled"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")
                and "compiled" in item.callspec.params}

    def compile_one(bits, slope):
        out = str(tmp_path_factory.mktemp(f"xla_bits{bits}"))
        return xla_checks.compile_program(PROGRAM, out, "--bits", str(bits), "--negative-slope",
                                          str(slope),
                                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        yield {setting: pool.submit(compile_one, *setting) for setting in SETTINGS
               if setting in selected}


@pytest.fixture(scope="module", params=SETTINGS, ids=["bits4", "bits8", "bits4-leaky"])
def compiled(request, programs):
    return programs[request.param].result()


def test_codes_bundled_with_forward_output_and_upstream_gradient(compiled):
    xla_checks.check_codes_bundled_with_forward_output_and_upstream_gradient(compiled)


def test_backward_reads_no_forward_activation(compiled):
    xla_checks.check_backward_reads_no_forward_activation(compiled, SEED, INPUTS)


def test_only_codes_live_from_forward_into_backward(compiled):
    xla_checks.check_only_codes_live_from_forward_into_backward(compiled, SEED, INPUTS)
