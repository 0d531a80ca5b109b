"""Every example runs end to end in a tiny configuration.

CIFAR and ImageNet go through the examples' real tfds loading code, with
`tfds.testing.mock_data` standing in for the download (no internet here).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", ["quickstart", "train_cifar", "train_imagenet"])
def test_help(name):
    out = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--bits" in out


def test_train_cifar_tiny(tmp_path, load_example):
    with tfds.testing.mock_data(num_examples=8):
        summary = load_example("train_cifar").main([
            "--dataset", "cifar100", "--depth", "11", "--width", "0.25", "--bits", "8",
            "--naive", "--window", "9", "--epochs", "1", "--steps-per-epoch", "2",
            "--batch-size", "4", "--out", str(tmp_path),
        ])
    assert summary["parameters"] > 0 and summary["naive"] and summary["bits"] == 8
    assert summary["window"] == 9.0
    assert (tmp_path / "log.csv").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["dataset"] == "cifar100"


def test_train_imagenet_tiny(tmp_path, load_example):
    with tfds.testing.mock_data(num_examples=4):
        summary = load_example("train_imagenet").main([
            "--manual-dir", str(tmp_path), "--depth", "50", "--width", "0.0625",
            "--image-size", "32", "--epochs", "1", "--steps-per-epoch", "2",
            "--batch-size", "2", "--out", str(tmp_path),
        ])
    assert "test_top5" in summary


def test_colab_notebook_cells_run_without_tpu(tmp_path, monkeypatch):
    notebook = json.loads((EXAMPLES / "colab_tpu.ipynb").read_text())
    cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    assert cells[0].lstrip().startswith("!pip")
    monkeypatch.setenv("KERAS_BLPA_NOTEBOOK_SMOKE", "1")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    with tfds.testing.mock_data(num_examples=8):
        for source in cells[1:]:
            exec(compile(source, "colab_tpu.ipynb", "exec"), namespace)
    assert namespace["summary"]["epochs"] == 1
    assert os.path.exists(tmp_path / "runs" / "colab" / "summary.json")
