"""Every example runs end to end in a tiny configuration.

CIFAR and ImageNet go through the examples' real tfds loading code, with
`tfds.testing.mock_data` standing in for the download (no internet here).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


_HELP = """
import runpy, sys
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as done:
        assert done.code in (0, None), (path, done.code)
    print("== end of", path, flush=True)
"""


def test_help():
    """Each example's `--help`, run as a script (one process for all five)."""
    names = ["quickstart", "train_cifar", "train_imagenet", "convert_applications",
             "train_transformer"]
    out = subprocess.run([sys.executable, "-c", _HELP, *(str(EXAMPLES / f"{n}.py")
                                                           for n in names)],
                         capture_output=True, text=True, check=True).stdout
    parts = out.split("== end of")
    assert len(parts) == len(names) + 1
    assert all("--bits" in part for part in parts[:-1]), out


def test_train_transformer_tiny(load_example):
    """A byte-level GPT-2, stock and BLPA, on the shipped text: both learn.
    (Its memory figure needs the BFC allocator, which a process that imported
    TensorFlow already cannot switch to; the transformer memory is measured in
    `tests/jax_backend/test_jax_transformers.py`.)"""
    pytest.importorskip("keras_hub")
    module = load_example("train_transformer")
    result = module.main(["--steps", "12", "--layers", "1", "--hidden-dim", "32",
                          "--heads", "2", "--sequence-length", "32", "--batch-size", "8",
                          "--data", "subset", "--no-memory"])
    losses = result["test_bits_per_byte"]
    assert all(8 * 0.5 < v[0] < 8 for v in losses.values())  # below 8 bits: it learned


def test_convert_applications_tiny(load_example):
    module = load_example("convert_applications")
    summary = module.main([
        "--model", "MobileNet", "--size", "32", "--steps", "2", "--batch-size", "4",
        "--no-memory", "--dataset", "fashion_mnist_subset",
    ])
    assert summary["fused"] == 26 and summary["left"] == 1  # the head's GAP -> Dropout
    assert len(summary["train_losses"]) == 2
    assert all(math.isfinite(loss) for loss in summary["train_losses"])
    assert summary["to_standard_max_difference"] < 1e-4
    # The memory figures' measuring process, on the model above (tiny batches:
    # the harness, not a figure).
    args = module.parse_args(["--size", "32", "--memory-batch-sizes", "2", "4",
                              "--memory-steps", "1"])
    result = module.measure_in_subprocess(args, "MobileNet", "4")
    assert result["variant"] == "4" and min(result["peak_bytes"]) > 0
    assert 0 < result["saved_mib_per_sample"] < 1


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
    """The notebook's TensorFlow route (its JAX route, the default, runs in
    tests/jax_backend/test_jax_examples.py)."""
    notebook = json.loads((EXAMPLES / "colab_tpu.ipynb").read_text())
    cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    assert "!pip install" in cells[0]
    monkeypatch.setenv("KERAS_BLPA_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("KERAS_BLPA_NOTEBOOK_ROUTE", "tensorflow")
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    with tfds.testing.mock_data(num_examples=8):
        for source in cells[1:]:
            exec(compile(source, "colab_tpu.ipynb", "exec"), namespace)
    assert namespace["summary"]["epochs"] == 1
    assert os.path.exists(tmp_path / "runs" / "colab" / "summary.json")


# --- Bad command-line values: argparse's error names the flag and the fix. ---

BAD_ARGS = [
    ("quickstart", ["--epochs", "0"], "argument --epochs: must be a positive integer; received 0"),
    ("quickstart", ["--batch-size", "-4"], "argument --batch-size: must be a positive integer"),
    ("quickstart", ["--depth", "30"], "argument --depth: must be 9n + 2 with n >= 1"),
    ("quickstart", ["--depth", "30"], "use 29 or 38"),
    ("quickstart", ["--depth", "5"], "use 11"),
    ("quickstart", ["--width", "nan"], "argument --width: must be a finite number"),
    ("quickstart", ["--width", "0"], "argument --width: must be a positive number"),
    ("quickstart", ["--bits", "3"], "argument --bits: invalid choice: 3"),
    ("quickstart", ["--train-size", "-1"], "argument --train-size: must be 0 or a positive"),
    ("quickstart", ["--memory-repeats", "0"], "argument --memory-repeats: must be a positive"),
    ("quickstart", ["--lr", "x"], "argument --lr: expected a number; received 'x'"),
    ("train_cifar", ["--epochs", "-1"], "argument --epochs: must be a positive integer"),
    ("train_cifar", ["--depth", "100"], "use 92 or 101"),
    ("train_cifar", ["--bits", "3"], "argument --bits: must be 4 or 8 (BLPA) or none"),
    ("train_cifar", ["--width", "inf"], "argument --width: must be a finite number"),
    ("train_cifar", ["--steps-per-epoch", "0"], "argument --steps-per-epoch: must be a positive"),
    ("train_cifar", ["--window", "0"], "argument --window: must be a positive number"),
    ("train_cifar", ["--window", "65"], "argument --window: must be in (0, 64]"),
    ("train_cifar", ["--bits", "none", "--naive"], "argument --naive: quantizes the forward"),
    ("train_cifar", ["--bits", "none", "--window", "8"], "argument --window: sets the quant"),
    ("train_cifar", ["--stock", "--naive"], "argument --naive: quantizes inside the fused"),
    ("train_cifar", ["--weight-decay=-1e-4"], "argument --weight-decay: must be 0 or a"),
    ("train_imagenet", ["--manual-dir", "m", "--image-size", "16"],
     "argument --image-size: must be at least 32"),
    ("train_imagenet", ["--manual-dir", "m", "--batch-size", "0"], "argument --batch-size:"),
    ("train_imagenet", ["--manual-dir", "m", "--depth", "34"], "argument --depth: invalid choice"),
    ("train_imagenet", ["--manual-dir", "m", "--width", "-1"], "argument --width: must be a pos"),
]


@pytest.mark.parametrize("name,argv,message", BAD_ARGS)
def test_bad_cli_values_exit_with_a_message_naming_the_flag(name, argv, message, load_example,
                                                            capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_example(name).parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_good_cli_values_parse(load_example):
    args = load_example("train_cifar").parse_args(["--depth", "29", "--bits", "exact",
                                                   "--width", "0.25"])
    assert (args.depth, args.bits, args.width) == (29, None, 0.25)
    args = load_example("quickstart").parse_args([])
    assert (args.depth, args.bits, args.out) == (29, [4], os.path.join("runs", "quickstart"))


# --- profiling: ValueErrors before any process starts. ---


@pytest.mark.parametrize("kwargs,message", [
    (dict(variant="5"), "`variant` must be one of"),
    (dict(variant="4", model="cifar", depth=30), "`depth` of model='cifar' must be 9n + 2"),
    (dict(variant="4", batch_sizes=(40, 8)), "`batch_sizes` must be at least two increasing"),
    (dict(variant="4", batch_sizes=(8,)), "`batch_sizes` must be at least two increasing"),
    (dict(variant="4", model="cifar", depth=11, width=float("nan")), "`width`"),
    (dict(variant="4", depth=0), "`depth` must be a positive integer"),
    (dict(variant="4", repeats=0), "`repeats` must be a positive integer"),
    (dict(variant="4", steps=0), "`steps` must be a positive integer"),
    (dict(variant="4", aggregate="mean"), "`aggregate` must be 'median' or 'min'"),
    (dict(variant="4", inter_op_threads=0), "`inter_op_threads` must be a positive integer"),
    (dict(variant="4", depht=20), "Unknown model arguments ['depht']"),
    (dict(variant="4", negative_slope=-0.1), "`negative_slope` must be a finite number"),
    (dict(variant="4", model="cifar", depth=11, negative_slope=0.1),
     "`negative_slope` (leaky ReLU units) applies to the stack models"),
])
def test_measure_in_subprocess_rejects_bad_arguments_up_front(kwargs, message, monkeypatch):
    from keras_blpa import profiling

    monkeypatch.setattr(profiling, "_run_once", lambda *a: pytest.fail("process started"))
    with pytest.raises(ValueError) as err:
        profiling.measure_in_subprocess(**kwargs)
    assert message in str(err.value)


def test_profiling_functions_and_cli_reject_bad_arguments(capsys):
    from keras_blpa import profiling

    with pytest.raises(ValueError, match="`batch_sizes`"):
        profiling.per_sample_slope((8, 8), variant="4")
    with pytest.raises(ValueError, match="`width`"):
        profiling.build_model("cifar", "4", depth=11, width=-1.0)
    with pytest.raises(ValueError, match="`shortcut`"):
        profiling.conv_stack("4", shortcut="dense")
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        profiling.peak_step_memory(None, 0)
    with pytest.raises(SystemExit):
        profiling.main(["--variant", "4", "--model", "cifar", "--depth", "12"])
    assert "--depth of model='cifar' must be 9n + 2" in capsys.readouterr().err


def test_measure_in_subprocess_repeats_and_takes_the_median_or_lowest(monkeypatch):
    from keras_blpa import profiling

    calls, slopes = [], iter([0.9, 0.5, 0.7])
    monkeypatch.setattr(profiling, "_run_once", lambda args, jit, env: calls.append(
        (args, env)) or {"mib_per_sample": next(slopes), "peak_bytes": [0, 0]})
    lines = []
    result = profiling.measure_in_subprocess(
        variant="none", depth=3, repeats=3, steps=5, inter_op_threads=-1, cpu_bfc=True,
        progress=lines.append,
    )
    assert result["mib_per_sample"] == 0.7 and result["mib_per_sample_runs"] == [0.9, 0.5, 0.7]
    args, env = calls[0]
    assert env == {"TF_CPU_ALLOCATOR_USE_BFC": "true"}
    assert " ".join(args).endswith("--variant none --depth 3 --inter-op-threads -1 --steps 5")
    assert len(lines) == 3 and "variant none, run 2/3: 0.500 MiB/sample" in lines[1]
    slopes = iter([0.9, 0.5, 0.7])
    assert profiling.measure_in_subprocess(
        variant="none", repeats=3, aggregate="min")["mib_per_sample"] == 0.5


def test_bfc_measurement_counts_tensors_under_256_kib():
    """Every tensor of this stack is under 256 KiB, which TensorFlow's default
    CPU allocator leaves out of its statistics (its slope here is about 0)."""
    from keras_blpa import profiling

    spec = dict(model="stack", variant="4", depth=4, channels=8, size=8)
    saved = profiling.saved_bytes_per_sample(profiling.build_model(**spec)) / 2**20
    measured = profiling.measure_in_subprocess(steps=2, inter_op_threads=-1, cpu_bfc=True,
                                               **spec)["mib_per_sample"]
    # Codes, plus one unit's float32 working memory (2 KiB per sample each).
    assert saved < measured < saved + 20 * 2048 / 2**20


def test_saved_bytes_per_sample_is_exact():
    from keras_blpa import profiling
    from keras_blpa.models import preact_resnet_cifar

    # Three 6x6x4 unit inputs: 432 elements per sample.
    for variant, per_element in (("4", 0.5), ("8", 1), ("none", 4)):
        stack = profiling.conv_stack(variant, depth=3, channels=4, size=6)
        assert profiling.saved_bytes_per_sample(stack) == 432 * per_element
    # ResNet-11 on 28x28x1: one bottleneck block per stage plus the head, by
    # hand. A projection head shares its unit's code; strided 3x3s read the
    # unstrided map.
    elements = (784 * (16 + 16 + 16) + 784 * 64 + 784 * 32 + 196 * 32
                + 196 * 128 + 196 * 64 + 49 * 64 + 49 * 256)
    model = preact_resnet_cifar(11, input_shape=(28, 28, 1), bits=4)
    assert profiling.saved_bytes_per_sample(model) == elements / 2
    with pytest.raises(ValueError, match="no fused BLPA layers"):
        profiling.saved_bytes_per_sample(profiling.conv_stack("stock", depth=1))


# --- The quickstart's output. ---


def test_quickstart_data_line_counts_the_images(load_example):
    quickstart = load_example("quickstart")
    data = quickstart.load(quickstart.parse_args(
        ["--dataset", "fashion_mnist_subset", "--train-size", "1000"]))
    assert data["line"].endswith(": 1,000 of 4,000 training images, 1,000 test images")
    assert data["steps"] == 8  # ceil(1000 / 128): fit's last batch is partial
    data = quickstart.load(quickstart.parse_args(
        ["--dataset", "fashion_mnist_subset", "--train-size", "0"]))
    assert "all 4,000 training images" in data["line"]


def test_quickstart_report_sets_measured_memory_beside_the_saved_part(load_example):
    summary = {
        "depth": 29,
        "variants": {
            "BLPA 4-bit": dict(test_accuracy=0.82, train_seconds=60, saved_mib_per_sample=0.2,
                               activation_mib_per_sample=0.6),
            "exact (bits=None)": dict(test_accuracy=0.83, train_seconds=70,
                                      saved_mib_per_sample=1.6,
                                      activation_mib_per_sample=1.8),
        },
        "stock_keras_mib_per_sample": 3.6,
        "memory_method": "median of 3",
        "projection": {"depth": 164, "saved_mib_per_sample": {"BLPA 4-bit": 1.0,
                                                              "exact (bits=None)": 8.0}},
    }
    text = load_example("quickstart").report(summary)
    assert "| BLPA 4-bit | 0.8200 | 0.600 | 0.200 | 60 |" in text
    assert "| stock Keras layers (not trained) | - | 3.600 | - | - |" in text
    assert "BLPA 4-bit: 3.0x less than exact, 6.0x less than stock Keras layers." in text
    assert "| BLPA 4-bit | 0.200 | 1.000 |" in text  # saved at depth 29 and 164
    assert "| exact (bits=None) | 1.600 | 8.000 |" in text
    assert "BLPA 4-bit saves 8.0x less than exact at any depth" in text


def test_progress_log_prints_lines_during_an_epoch(capsys):
    import keras
    import numpy as np

    from keras_blpa import training

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    x, y = np.zeros((32, 3), "float32"), np.zeros((32, 2), "float32")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[training.ProgressLog(every_seconds=0)])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" - ")[0] for line in lines] == [
        f"  epoch 1/1, step {i}/4" for i in range(1, 5)]
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[training.ProgressLog(every_seconds=3600)])
    assert len(capsys.readouterr().out.splitlines()) == 1  # the first step only


def test_fit_and_summarize_does_not_pass_shuffle_with_a_dataset(tmp_path):
    import warnings

    import keras
    import tensorflow as tf

    from keras_blpa import training

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    data = tf.data.Dataset.from_tensor_slices(
        (tf.zeros((8, 3)), tf.zeros((8,), tf.int32))).batch(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        training.fit_and_summarize(model, data, data, 1, str(tmp_path), verbose=0)
    assert not [w for w in caught if "shuffle" in str(w.message)]


def test_build_ops_runs_as_a_module_without_runpy_warning():
    """`keras_blpa` imports build_ops (via the op loader); `-m` must then not
    run a second copy of it (runpy's 'found in sys.modules' RuntimeWarning)."""
    result = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "keras_blpa.build_ops", "--help"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: python -m keras_blpa.build_ops" in result.stdout


def test_quickstart_comparison_is_paired_and_says_what_it_cannot_show(load_example):
    import numpy as np

    quickstart = load_example("quickstart")
    exact = np.arange(1000) < 600
    blpa = exact.copy()
    blpa[:30] = False  # 30 right -> wrong
    blpa[600:610] = True  # 10 wrong -> right
    c = quickstart.compare({("BLPA 4-bit", 0): blpa, (quickstart.EXACT, 0): exact}, [0], True)
    c = c["BLPA 4-bit"]
    per_image = blpa.astype(float) - exact
    assert c["difference"] == pytest.approx(-0.02)
    assert c["test_half_width_95"] == pytest.approx(1.96 * per_image.std(ddof=1) / np.sqrt(1000))
    (line,) = quickstart.comparison_lines({"BLPA 4-bit": c})
    assert "-0.020 test accuracy (1 seed, paired: same initial weights and data order" in line
    assert "--seeds 3" in line and "cannot tell" not in line  # 0.020 > 0.012

    even = exact.copy()
    even[:10], even[600:610] = False, True
    two = quickstart.compare({("BLPA 4-bit", 0): even, (quickstart.EXACT, 0): exact,
                              ("BLPA 4-bit", 1): blpa, (quickstart.EXACT, 1): exact}, [0, 1],
                             False)
    (line,) = quickstart.comparison_lines(two)
    assert two["BLPA 4-bit"]["by_seed"] == pytest.approx([0.0, -0.02])
    assert "2 seeds, paired: same initial weights," in line
    assert "over seeds it ranged from -0.020 to +0.000" in line
