"""Real training runs on real data (Fashion-MNIST subset shipped with the package)."""


import numpy as np
import pytest

from keras_blpa import datasets


def test_shipped_subset_is_real_fashion_mnist():
    (x, y), (x_test, y_test), _ = datasets.load_fashion_mnist("subset")
    assert x.shape == (4000, 28, 28, 1) and x_test.shape == (1000, 28, 28, 1)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert set(np.unique(y)) == set(range(10))
    # Classes are roughly balanced, as in Fashion-MNIST.
    assert np.bincount(y).min() > 300


def test_debian_fashion_mnist_when_installed():
    if not datasets.FASHION_MNIST_DIR.exists():
        pytest.skip("dataset-fashion-mnist is not installed")
    (x, y), (x_test, _), description = datasets.load_fashion_mnist("debian")
    assert x.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    assert "fashion-mnist" in description


def test_quickstart_trains_blpa_and_exact_resnets_well_above_chance(tmp_path, load_example):
    """The README's main job in a small configuration: a real ResNet training run."""
    summary = load_example("quickstart").main([
        "--dataset", "fashion_mnist_subset", "--depth", "11", "--epochs", "2",
        "--batch-size", "64", "--lr", "0.05", "--no-memory", "--out", str(tmp_path),
    ])
    accuracy = {k: v["test_accuracy"] for k, v in summary["variants"].items()}
    print(accuracy)
    assert accuracy["BLPA 4-bit"] > 0.6  # chance: 0.1
    assert accuracy["exact (bits=None)"] > 0.6
    assert abs(accuracy["BLPA 4-bit"] - accuracy["exact (bits=None)"]) < 0.08
    assert (tmp_path / "train_4.csv").read_text().count("\n") == 3  # header + 2 epochs
    assert (tmp_path / "summary.json").exists()
