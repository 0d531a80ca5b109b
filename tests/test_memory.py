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
