"""`keras.distribution.DataParallel` on JAX, on two CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=2`, in fresh processes).

- A 2-device `fit` equals a 1-device `fit` on the same global batch: the
  batch statistics are the global batch's, as stock BN's are under jit.
- The step is partitioned along the batch: its per-device temp buffer at
  global batch 2B is about one device's at B, and no collective moves an
  activation-sized tensor (only weight-sized all-reduces). Over several
  devices the weight gradient runs over the whole shard at once (a batch
  slice would cross the shards), so both runs compute it that way
  (`KERAS_BLPA_JAX_WEIGHT_GRADIENT_CHUNKS=1`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

CHILD = os.path.join(os.path.dirname(__file__), "data_parallel_child.py")


def _run(tmp_path, devices: int, bits: str) -> tuple[dict, list]:
    out = str(tmp_path / f"dp{devices}_{bits}")
    # Two host (CPU) devices, also on a machine with a GPU.
    env = dict(os.environ, JAX_PLATFORMS="cpu", KERAS_BLPA_JAX_WEIGHT_GRADIENT_CHUNKS="1")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, CHILD, "--devices", str(devices), "--bits", bits,
                             "--out", out], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out + ".json") as f:
        info = json.load(f)
    with np.load(out + ".npz") as data:
        weights = [data[k] for k in data.files]
    return info, weights


@pytest.mark.parametrize("bits", ["none", "4"])
def test_two_devices_fit_like_one_device_on_the_global_batch(tmp_path, bits):
    one, w1 = _run(tmp_path, 1, bits)
    two, w2 = _run(tmp_path, 2, bits)
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
    # Two SGD steps. The batch sums are split across devices and round
    # differently (1 ulp); over more steps an element that close to a ReLU
    # kink or a bin edge can flip and the runs part by ~1e-4 (stock layers too
    # can), so the comparison stops at two steps. Measured on a ResNet-29 at
    # 16x16, batch 32 (issue 31): one ReLU mask element in 4.6M flipped
    # moves the gradients by ~1e-4 relative, stock and bits=None alike; which
    # model flips one depends on the seed (one step's gradients stay within
    # ~1e-5 for 8 of 15 seeds stock, 5 of 15 bits=None), and reversing the
    # batch on one device parts them as much as two devices do.
    for a, b in zip(w2, w1):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    per_device_2b = two["temp_bytes"]["128"]
    one_device_b = one["temp_bytes"]["64"]
    assert 0.8 * one_device_b < per_device_2b < 1.25 * one_device_b, (two, one)
    # Collectives: all-reduces of gradients and BN statistics (weight-sized),
    # nothing the size of a per-device activation (64 x 8 x 8 x 16 elements).
    activation = 64 * 8 * 8 * 16
    assert two["collectives"], "no collective in the 2-device step"
    assert all(elements < activation // 4 for _, elements in two["collectives"]), two
    assert all(kind != "all-gather" or elements < activation // 4
               for kind, elements in two["collectives"])
    # Every BLPA custom call (CPU) runs on its device's 64 rows of the 128,
    # none on the gathered batch.
    assert len(two["custom_call_rows"]) == len(one["custom_call_rows"]), (two, one)
    assert all(rows == 64 for _, rows in two["custom_call_rows"]), two["custom_call_rows"]


def test_converted_model_fits_on_two_devices_like_one(tmp_path):
    """`DataParallel` for a converted post-activation ResNet (BN units,
    ReLU-only units, ApproxBatchNormalization, PaddedMaxPooling2D), as for
    the builders: two SGD steps on two devices follow one device's. The
    batch sums round differently when split, and at 4 bits a value that
    close to a bin edge takes the neighbouring code (the ReLU-only units' grid
    comes from the batch's moments), so the weights part by up to ~2e-4
    relative after two steps (the issue measured 4.3e-4 on a 4-bit builder
    ResNet-29): a wrong global statistic would part them by far more."""
    one, w1 = _run(tmp_path, 1, "converted")
    two, w2 = _run(tmp_path, 2, "converted")
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
    for a, b in zip(w2, w1):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
