"""A converted KerasHub GPT-2 backbone on two CPU devices (JAX), against one.

`transformer_distribution_child.py` (one fresh process with
`--xla_force_host_platform_device_count=2`; "1 device" is no distribution,
device 0) trains a 2-block GPT-2 two SGD steps of global batch 8 with `fit`:
stock, `transformer_bits=None` and 8 bits, under `DataParallel` (the batch
split) and a tensor-parallel `ModelParallel` (heads and MLP units split over
"model").

Tolerances come from stock KerasHub's own 1-vs-2-device spread in the same
run: the split changes the order of float sums (measured 1.2e-7 on the
weights after two steps, both layouts). `bits=None` computes the stock
gradient and must stay within 8x that spread. At 8 bits the codes are taken
from forward values that differ by that float order too, so a value within
an ulp of a rounding point (a bin edge, for the 3-bit derivative code) can
take the neighbouring code: measured, the first step's codes are
bit-identical under `DataParallel` (0 of 16,128 words differ) and one word
differs under `ModelParallel` (a code of v, one step); the weights then part
by 1.0e-5 (DP) and 2.5e-5 (MP) after two steps. The bound is a tenth of
what 8-bit quantization itself changes in the same run (8 bits against stock,
one device: 1.7e-3): a code or mask that the split corrupted wholesale
(words straddling the devices' rows, a redrawn dropout seed) moves the
weights by the order of that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

CHILD = os.path.join(os.path.dirname(__file__), "transformer_distribution_child.py")
RUNS = ("stock-1", "stock-dp", "stock-mp", "none-1", "none-dp", "8-1", "8-dp", "8-mp",
        "8-1-drop", "8-dp-drop")
FLOAT_ULP = 1.2e-7  # float32 ulp of 1.0: the floor of stock's spread
NONE_MARGIN = 8.0   # bits=None: within 8x stock's 1-vs-2-device spread
CODE_MARGIN = 10.0  # 8 bits: within a tenth of the quantization's own effect
MAX_FLIPPED_WORDS = 4  # of 16,128: float-order flips at a rounding point (measured 0 and 1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("transformer_distribution") / "run")
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, CHILD, "--runs", ",".join(RUNS), "--out", out],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out + ".json") as f:
        info = json.load(f)
    arrays = {}
    for run in RUNS:
        with np.load(f"{out}_{run}.npz") as data:
            arrays[run] = {k: data[k] for k in data.files}
    return info, arrays


def _weights(arrays, run: str, step: int) -> list:
    prefix = f"step{step}_"
    keys = sorted((k for k in arrays[run] if k.startswith(prefix)),
                  key=lambda k: int(k[len(prefix):]))
    return [arrays[run][k] for k in keys]


def _distance(arrays, a: str, b: str, step: int = 2) -> float:
    """Largest absolute weight difference after `step` SGD steps."""
    return max(float(np.max(np.abs(x - y)))
               for x, y in zip(_weights(arrays, a, step), _weights(arrays, b, step)))


def _flipped_words(arrays, a: str, b: str) -> int:
    """uint32 code words of the first step that differ between two runs."""
    codes = [k for k in arrays[a] if k.startswith("codes_")]
    # Per block: two norm codes, q, k, v, the mask, the MLP's derivative and
    # activation codes; and the final norm around the blocks.
    assert len(codes) == 2 * 8 + 1, codes
    return sum(int(np.sum(arrays[a][k] != arrays[b][k])) for k in codes)


@pytest.mark.parametrize("layout", ["dp", "mp"])
def test_two_devices_train_like_one(runs, layout):
    info, arrays = runs
    if layout == "mp":  # the layout map took: the MLP's kernel is split over "model"
        assert info["8-mp"]["kernel_sharding"] == ["P(None, 'model')"], info["8-mp"]
    stock = _distance(arrays, f"stock-{layout}", "stock-1")
    tolerance = NONE_MARGIN * max(stock, FLOAT_ULP)
    if layout == "dp":
        assert _distance(arrays, "none-dp", "none-1") <= tolerance
    # 8 bits: the forward is exact, so the first step's loss agrees as
    # stock's does; the codes agree but for float-order flips.
    np.testing.assert_allclose(info[f"8-{layout}"]["loss"][0], info["8-1"]["loss"][0],
                               rtol=1e-6)
    assert _flipped_words(arrays, f"8-{layout}", "8-1") <= MAX_FLIPPED_WORDS
    quantization = _distance(arrays, "8-1", "stock-1")
    assert quantization > 100 * tolerance  # the 8-bit bound is far from stock's
    assert _distance(arrays, f"8-{layout}", "8-1") <= quantization / CODE_MARGIN


def test_dropout_masks_are_the_same_on_two_devices(runs):
    """Dropout 0.1: each unit redraws its masks from the block's seed; the
    split draws the same bits (the first step's loss, an exact forward,
    agrees), and the weights part only by flipped codes."""
    info, arrays = runs
    loss_1, loss_2 = info["8-1-drop"]["loss"], info["8-dp-drop"]["loss"]
    assert np.all(np.isfinite(loss_2))
    np.testing.assert_allclose(loss_2[0], loss_1[0], rtol=1e-6)
    # Not the no-dropout run: the masks are in effect.
    assert abs(loss_1[0] - info["8-1"]["loss"][0]) > 1e-3
    quantization = _distance(arrays, "8-1", "stock-1")
    assert _distance(arrays, "8-dp-drop", "8-1-drop") <= quantization / CODE_MARGIN


def test_no_activation_sized_collective_in_the_step(runs):
    """The compiled 8-bit step's collectives (per device, global batch 8, 16
    tokens): nothing gathers an activation. Under DataParallel: the gradient
    all-reduces (weight-sized), 1-element all-reduces (each unit's data
    dependencies: `xla.tie` reads a code word, `xla.after` sums the upstream
    gradient), and halos of the 3-bit derivative code (10 rows per word, so
    the 64 rows of a device end inside a word: 6 rows of shifted codes go to
    the neighbour). Under ModelParallel: stock's all-reduces of the
    row-parallel products, and the per-row min and max of the MLP's split
    activation (one float per token)."""
    info, _ = runs
    tokens, hidden = 8 * 16, 32
    activation = tokens * hidden  # one [8, 16, 32] activation (q, k, v as well)
    for layout in ("dp", "mp"):
        collectives = info[f"8-{layout}"]["collectives"]
        assert collectives, layout
        assert not [c for c in collectives if c[0] in ("all-gather", "all-to-all")], layout
        for kind, dtype, elements, op_name in collectives:
            if kind == "collective-permute":
                assert layout == "dp" and dtype == "u32" and elements <= 6 * 64, op_name
            elif layout == "dp" or elements not in (activation, tokens):
                # weight-sized: the largest is the token embedding's gradient
                assert elements <= 100 * hidden, (layout, kind, dtype, elements, op_name)
        if layout == "mp":  # stock's row-parallel all-reduces, and per-token min/max
            sizes = sorted({c[2] for c in collectives if c[2] > 1})
            assert sizes == [tokens, activation], sizes
