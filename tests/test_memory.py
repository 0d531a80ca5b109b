"""Measured activation memory: peak training-step memory per sample.

Each variant runs `python -m keras_blpa.profiling` in a fresh process; the
slope of peak memory against batch size is the activation memory per sample
of a stack of 20 BN -> ReLU -> 3x3 conv units (32 channels, 32x32).
"""

import pytest

from keras_blpa.profiling import measure_in_subprocess


@pytest.fixture(scope="module")
def slopes():
    return {
        v: measure_in_subprocess(model="stack", variant=v, depth=20)["mib_per_sample"]
        for v in ("stock", "none", "8", "4")
    }


def test_four_bit_keeps_under_a_third_of_stock_memory(slopes):
    print("MiB/sample:", slopes)
    assert slopes["4"] < slopes["stock"] / 3


def test_exact_mode_keeps_less_than_stock(slopes):
    assert slopes["none"] < slopes["stock"]


def test_fewer_bits_keep_less(slopes):
    assert slopes["4"] <= slopes["8"] < slopes["none"]


def test_projection_head_keeps_no_full_precision_copy():
    """A projection shortcut reading the unit's activation shares its 4-bit code.

    Ten units with a 1x1 projection head against ten with an identity
    shortcut: a full-precision copy of each activation would add
    10 x 128 KiB = 1.25 MiB per sample.
    """
    identity = measure_in_subprocess(model="residual_stack", variant="4", depth=10)
    projection = measure_in_subprocess(model="projection_stack", variant="4", depth=10)
    stock = measure_in_subprocess(model="projection_stack", variant="stock", depth=10)
    print("MiB/sample identity, projection, stock-projection:",
          identity["mib_per_sample"], projection["mib_per_sample"], stock["mib_per_sample"])
    assert projection["mib_per_sample"] - identity["mib_per_sample"] < 0.4
    assert projection["mib_per_sample"] < stock["mib_per_sample"] / 2
