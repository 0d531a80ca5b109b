"""The benchmarks' logic: the accuracy benchmark end to end (tiny), the max-batch search."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def accuracy():
    return _load("accuracy")


@pytest.mark.parametrize("search", ["fit", "bisect"])
def test_max_batch_search_finds_the_boundary_to_3_percent(search):
    find = _load("max_batch").find_max_batch
    for true in (1, 2, 5, 20, 33, 100, 275, 1000):
        for guess in (1, true // 3 + 1, int(true * 0.98) + 1, true, int(true * 1.05) + 1,
                      4 * true):
            calls = []

            def fits(batch, true=true, calls=calls):
                calls.append(batch)
                return batch <= true

            found = find(fits, guess, search)
            assert found <= true and true - found <= max(1, found // 33), (true, guess, found)
            assert len(calls) < 20
    # A good fit costs two compiled steps with "fit".
    if search == "fit":
        calls = []
        assert find(lambda b: calls.append(b) or b <= 200, 198, "fit") == 198
        assert calls == [198, 204]
    with pytest.raises(ValueError, match="search"):
        find(lambda b: True, 4, "linear")


def test_accuracy_table_resume_and_report(tmp_path, accuracy, monkeypatch):
    # The shipped subset (1,000 test images), as elsewhere in the tests: with
    # the Debian package installed each run would evaluate 10,000.
    load = accuracy.datasets.load_fashion_mnist
    monkeypatch.setattr(accuracy.datasets, "load_fashion_mnist", lambda: load("subset"))
    args = ["--depths", "11", "--epochs", "1", "--train-size", "256", "--batch-size", "64",
            "--val-size", "0", "--out", str(tmp_path)]
    accuracy.main(args + ["--seeds", "1", "--variants", "exact"])
    # Resume skips the finished run and adds the new seed and variant only.
    accuracy.main(args + ["--seeds", "1", "--variants", "exact", "naive8", "--resume"])
    runs = json.loads((tmp_path / "accuracy.json").read_text())["runs"]
    assert sorted((r["variant"], r["seed"]) for r in runs) == [("exact", 0), ("naive8", 0)]
    assert all(len(r["batch_loss"]) == 4 and 0 <= r["test_error"] <= 100 for r in runs)
    (tmp_path / "accuracy.md").unlink()
    accuracy.main(["--report-only", "--out", str(tmp_path)])
    table = (tmp_path / "accuracy.md").read_text()
    assert "| exact | " in table and "(n=1)" in table and "| naive8 | " in table


def test_gradient_fidelity_orders_the_variants(tmp_path, accuracy):
    """On a partly trained net, BLPA's weight gradients agree with exact ones far
    better than naive quantization's, and 8 bits (12 sigma) better than 4."""
    accuracy.main(["--fidelity", "--depths", "11", "--train-size", "512", "--batch-size", "64",
                   "--out", str(tmp_path)])
    stats = json.loads((tmp_path / "gradient_fidelity.json").read_text())["stats"]
    assert stats["blpa8"]["median_cos"] > 0.999
    assert stats["blpa4"]["median_cos"] > 0.97
    assert stats["blpa8"]["median_rel_err"] < stats["blpa8_w6"]["median_rel_err"]
    assert stats["blpa8_w6"]["median_rel_err"] < stats["blpa4"]["median_rel_err"]
    assert stats["naive8"]["median_cos"] < stats["blpa4"]["median_cos"]
    assert "| s1b1_1 |" in (tmp_path / "gradient_fidelity.md").read_text()


def test_gradient_bias_report(tmp_path, accuracy):
    accuracy.main(["--bias", "--bias-batches", "3", "--depths", "11", "--train-size", "512",
                   "--batch-size", "32", "--out", str(tmp_path)])
    stats = json.loads((tmp_path / "gradient_bias.json").read_text())["stats"]
    for variant in ("blpa8", "blpa8_w6", "blpa4"):
        s = stats[variant]
        # The error of a mean is at most the mean error (triangle inequality).
        assert 0 < s["ratio"] <= 1 + 1e-6 and s["per_batch"] > 0
    assert stats["blpa8"]["per_batch"] < stats["blpa4"]["per_batch"]


def test_named_windows_and_unknown_variants(accuracy, capsys):
    assert accuracy.variant_options("blpa4_w7") == {"bits": 4, "window": 7.0}
    assert accuracy.variant_options("blpa8_w9.5") == {"bits": 8, "window": 9.5}
    assert accuracy.variant_options("naive8")["naive"] is True
    for bad in ("blpa3_w7", "blpa4_w", "blpa4_wide", "exact8"):
        with pytest.raises(SystemExit):
            accuracy.main(["--variants", bad])
        assert "blpaB_wW" in capsys.readouterr().err


def test_pooled_differences_and_interval(accuracy):
    """Paired differences pooled over depths: mean, t interval, sign count."""
    runs = [{"variant": "exact", "depth": d, "seed": s, "test_error": 20.0}
            for d, s in ((29, 0), (29, 1), (56, 0))]
    runs += [{"variant": "naive8", "depth": d, "seed": s, "test_error": 20.0 + diff}
             for (d, s), diff in zip(((29, 0), (29, 1), (56, 0)), (1.0, 2.0, 3.0))]
    runs.append({"variant": "blpa4_w7", "depth": 56, "seed": 7, "test_error": 1.0})  # unpaired
    table = "\n".join(accuracy._pooled(runs))
    # mean 2, sample std 1, t(0.975, 2 dof) = 4.303: half-width 2.48
    assert "| naive8 | 3 | +2.00 | [-0.48, +4.48] | 3 of 3 |" in table
    assert "blpa4_w7" not in table and "| exact |" not in table
