"""The Colab notebook's JAX route (its default), every code cell but the
`pip install`, on CPU: one device, `SMOKE=1`, and a stand-in for the
CIFAR-10 download (no internet here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import keras
import numpy as np

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"


def _fake_cifar10():
    rng = np.random.default_rng(0)
    return ((rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
             rng.integers(0, 10, (40, 1), dtype=np.uint8)),
            (rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8),
             rng.integers(0, 10, (12, 1), dtype=np.uint8)))


def test_colab_notebook_jax_route_runs_on_cpu(tmp_path, monkeypatch, capsys):
    notebook = json.loads((EXAMPLES / "colab_tpu.ipynb").read_text())
    cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    assert "!pip install" in cells[0]
    monkeypatch.setenv("KERAS_BLPA_NOTEBOOK_SMOKE", "1")
    monkeypatch.delenv("KERAS_BLPA_NOTEBOOK_ROUTE", raising=False)
    monkeypatch.setenv("KERAS_BACKEND", "jax")  # restored after the cells set it
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", _fake_cifar10)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for source in cells[1:]:
        exec(compile(source, "colab_tpu.ipynb", "exec"), namespace)
    assert namespace["ROUTE"] == "jax"
    assert namespace["summary"]["backend"] == "jax"
    assert namespace["summary"]["epochs"] == 1
    assert os.path.exists(tmp_path / "runs" / "colab" / "summary.json")
    # The memory cell measured both models from their compiled steps.
    slopes = namespace["slopes"]
    assert set(slopes) == {"stock Keras", "BLPA 4-bit"} and slopes["stock Keras"] > 0
    assert "less activation memory than stock Keras" in capsys.readouterr().out


def test_quickstart_trains_and_measures_on_jax(tmp_path, capsys, load_example):
    """The README's main job on JAX: every step jit-compiled, memory from
    XLA's temp buffer (TensorFlow's allocator is not there to measure)."""
    quickstart = load_example("quickstart")
    summary = quickstart.main([
        "--dataset", "fashion_mnist_subset", "--depth", "11", "--epochs", "1",
        "--train-size", "256", "--batch-size", "64", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "XLA custom calls: ready" in out and "XLA's temp buffer" in out
    four, exact = summary["variants"]["BLPA 4-bit"], summary["variants"]["exact (bits=None)"]
    stock = summary["stock_keras_mib_per_sample"]
    assert 0 < four["activation_mib_per_sample"] < exact["activation_mib_per_sample"] < stock
    assert 0 <= four["test_accuracy"] <= 1
