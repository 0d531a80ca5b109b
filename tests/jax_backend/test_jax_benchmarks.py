"""The JAX benchmarks that `benchmarks/device_check_jax.sh` runs, on tiny sizes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent.parent / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_jax_memory_table(tmp_path, capsys):
    out = tmp_path / "memory.json"
    rows = _load("jax_memory").main(["--depth", "3", "--channels", "8", "--size", "8",
                                     "--variants", "stock", "4", "--out", str(out)])
    assert [r["variant"] for r in rows] == ["stock", "4"]
    assert rows[1]["mib_per_sample"] < rows[0]["mib_per_sample"]
    assert json.loads(out.read_text())[1]["saved_mib_per_sample"] > 0
    assert "| 4 |" in capsys.readouterr().out
    assert out.with_suffix(".md").exists()


def test_jax_pack_bench_rows(tmp_path):
    rows = _load("jax_pack_bench").main(["--sizes-mib", "1", "--bits", "4", "--rounds", "1",
                                         "--out", str(tmp_path / "pack.json")])
    ops = {"encode", "decode_relu", "decode_bn_backward"}
    # the custom calls run by default on CPU, next to the jnp quantizer
    assert {r["op"] for r in rows} == ops | {f"{op} (custom call)" for op in ops} | {
        "copy (2 * x)"}
    assert all(r["gb_per_s"] > 0 for r in rows)


def test_step_time_on_jax(tmp_path):
    result = _load("step_time").main(["--depth", "11", "--batch-size", "4", "--size", "8",
                                      "--rounds", "1", "--steps", "1",
                                      "--variants", "stock", "4", "4-jnp"])
    assert set(result["median_s"]) == {"stock", "4", "4-jnp"}
    assert result["implementation"].startswith("JAX")


def test_capped_memory_rows():
    rows = _load("jax_capped_memory").main(["--depth", "4", "--channels", "16", "--size", "16"])
    assert [(r["max_value"], r["bits"]) for r in rows] == [(None, None), (None, 4),
                                                           (6.0, None), (6.0, 4)]
    by = {(r["max_value"], r["bits"]): r["mib_per_sample"] for r in rows}
    assert by[(6.0, 4)] < by[(6.0, None)] and by[(None, 4)] < by[(None, None)]


TINY_TRANSFORMERS = ["--layers", "1", "--hidden-dim", "16", "--heads", "2",
                     "--sequence-length", "16", "--batch-size", "4", "--steps", "3",
                     "--test-windows", "8", "--data", "subset"]


def test_transformer_fidelity_gradients(tmp_path):
    """The fidelity benchmark's gradient piece on a tiny GPT: exact against
    exact agrees to float rounding with the same dropout masks, a 4/1 BLPA
    gradient does not."""
    pytest.importorskip("keras_hub")
    fidelity = _load("transformer_fidelity")
    cos = fidelity.main(["cosine", "--settings", "exact", "4/1", "--batches", "1",
                         "--pretrain-steps", "0", *TINY_TRANSFORMERS,
                         "--out", str(tmp_path / "fidelity.json")])["cosine"]
    for phase in ("init", "trained"):
        exact, lean = (cos["phases"][phase]["settings"][s] for s in ("exact", "4/1"))
        assert exact["loss_gap"] < 1e-6 and lean["loss_gap"] < 1e-5  # the same masks
        assert min(fidelity.unit_stats(exact, unit)[0] for unit in fidelity.UNITS) > 1 - 1e-6
        assert max(v["rel_err"] for v in exact["variables"]) < 1e-5
        assert {v["unit"] for v in lean["variables"]} == set(fidelity.UNITS)
        worst = min(fidelity.unit_stats(lean, unit)[0] for unit in fidelity.UNITS)
        assert 0.5 < worst < 0.999


@pytest.mark.slow
def test_transformer_fidelity_training_and_report(tmp_path):
    """The training and sweep pieces pair their runs up in the report, and a
    results file of another configuration is refused."""
    pytest.importorskip("keras_hub")
    fidelity = _load("transformer_fidelity")
    out = str(tmp_path / "fidelity.json")
    common = [*TINY_TRANSFORMERS, "--out", out]
    fidelity.main(["train", "--seeds", "0", *common])
    results = fidelity.main(["sweep", "--settings", "8/3", *common])  # exact; 8/3 is train's
    assert sorted(results["runs"]) == ["8/3 seed 0", "exact seed 0", "stock seed 0"]
    assert all(0 < r["test_bits_per_byte"] < 9 for r in results["runs"].values())
    text = fidelity.main(["report", "--out", out])["markdown"]
    assert "| test bits/byte |" in text and "Bits sweep" in text and "| exact |" in text
    with pytest.raises(SystemExit, match="another --out"):  # no mixing of configurations
        fidelity.main(["train", "--seeds", "0", *common, "--steps", "4"])
