"""CI sets KERAS_BLPA_REQUIRE_KERNELS=1: there a compiled library (the TF op,
the JAX custom calls) that is missing or fails to load fails the tests that
need it, instead of skipping them."""

import os

import pytest

REQUIRE_KERNELS = os.environ.get("KERAS_BLPA_REQUIRE_KERNELS", "") == "1"


def kernels_unavailable(reason: str) -> None:
    """Skips the test, or fails it under KERAS_BLPA_REQUIRE_KERNELS=1."""
    if REQUIRE_KERNELS:
        pytest.fail(f"{reason} (KERAS_BLPA_REQUIRE_KERNELS=1)")
    pytest.skip(reason)
