"""Measured activation memory: peak training-step memory per sample.

Each variant runs `python -m keras_blpa.profiling` in a fresh process; the
slope of peak memory against batch size is the activation memory per sample
of a stack of 20 BN -> ReLU -> 3x3 conv units (32 channels, 32x32).
"""

import json
import os
import subprocess
import sys

import pytest


def _slope(variant, *extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-m", "keras_blpa.profiling", "--variant", variant,
         "--batch-sizes", "8", "40", *extra],
        check=True, capture_output=True, text=True, env=env,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["mib_per_sample"]


@pytest.fixture(scope="module")
def slopes():
    return {v: _slope(v) for v in ("stock", "none", "8", "4")}


def test_four_bit_keeps_under_a_third_of_stock_memory(slopes):
    print("MiB/sample:", slopes)
    assert slopes["4"] < slopes["stock"] / 3


def test_exact_mode_keeps_less_than_stock(slopes):
    assert slopes["none"] < slopes["stock"]


def test_fewer_bits_keep_less(slopes):
    assert slopes["4"] <= slopes["8"] < slopes["none"]
