"""Measured activation memory on JAX: XLA's temp buffer of the compiled step.

The slope of `memory_analysis().temp_size_in_bytes` of Keras's jitted
`train_step` between two batch sizes, for a stack of 20 BN -> ReLU -> 3x3
conv units (32 channels, 32x32), against stock Keras layers on JAX. The
thresholds guard the savings with room for compiler changes; the measured
figures are in the README and `benchmarks/results/cpu/jax_memory_*.md`.
"""

import pytest

from keras_blpa import profiling


@pytest.fixture(scope="module")
def slopes():
    return {
        v: profiling.jax_temp_slope(model="stack", variant=v, depth=20, channels=32)
        for v in ("stock", "none", "8", "4")
    }


def test_four_bit_keeps_under_a_fifth_of_stock_memory(slopes):
    mib = {v: r["mib_per_sample"] for v, r in slopes.items()}
    print("MiB/sample:", mib)
    assert mib["4"] < mib["stock"] / 5
    assert mib["4"] < mib["8"] < mib["none"] < mib["stock"]


def test_four_bit_keeps_its_codes_and_two_activations_of_working_memory(slopes):
    """Codes (20 units x 32x32x32 x 0.5 byte) plus the backward's working set
    of two float32 activations (0.125 MiB each), independent of depth: the
    upstream gradient and the conv's input gradient. The weight gradient runs
    over four batch slices, so its decoded activation and XLA:CPU's
    transposed copies of its operands (three activations more at once over
    the whole batch) are a slice's size, and the input gradient waits for it."""
    codes = 20 * 32 * 32 * 32 * 0.5 / 2**20
    assert slopes["4"]["mib_per_sample"] <= codes + 2.5 * 0.125


def test_the_weight_gradient_over_batch_slices_is_what_saves_the_working_memory(
        slopes, monkeypatch):
    """The same stack with the weight gradient over the whole batch at once
    keeps at least one and a half activations more (the decoded activation
    and the transposed copies)."""
    monkeypatch.setenv("KERAS_BLPA_JAX_WEIGHT_GRADIENT_CHUNKS", "1")
    whole = profiling.jax_temp_slope(model="stack", variant="4", depth=20, channels=32)
    print("MiB/sample, whole batch:", whole["mib_per_sample"],
          "slices:", slopes["4"]["mib_per_sample"])
    assert whole["mib_per_sample"] >= slopes["4"]["mib_per_sample"] + 1.5 * 0.125


def test_temp_bytes_grow_with_the_batch_and_need_the_jax_backend(monkeypatch):
    model = profiling.build_model("stack", "4", depth=2, channels=8, size=8)
    small, large = (profiling.jax_step_temp_bytes(model, b) for b in (4, 12))
    assert large > small > 0
    with pytest.raises(ValueError, match="batch_size"):
        profiling.jax_step_temp_bytes(model, 0)
    monkeypatch.setattr("keras.backend.backend", lambda: "tensorflow")
    with pytest.raises(RuntimeError, match="needs KERAS_BACKEND=jax"):
        profiling.jax_step_temp_bytes(model, 4)


@pytest.mark.parametrize("tool", ["memory_device", "peak_step_memory", "measure_in_subprocess"])
def test_tensorflow_memory_tools_name_the_jax_ones(tool):
    model = profiling.build_model("stack", "4", depth=1, channels=4, size=4)
    args = {"memory_device": (), "peak_step_memory": (model, 4),
            "measure_in_subprocess": ()}[tool]
    with pytest.raises(RuntimeError, match="KERAS_BACKEND=tensorflow.*jax_temp_slope"):
        getattr(profiling, tool)(*args)
