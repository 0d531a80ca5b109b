"""Deep-model process for tests/test_models.py (run as a fresh Python process).

Builds or loads one pre-activation ResNet at Python's default recursion
limit (1000, set explicitly after every import, so that a package that raises
it on import, as IPython's jedi does, cannot hide a RecursionError), then runs
the actions asked for, in order:

- `summary`: `model.summary()`;
- `save`: `model.save(--path)` and the inference outputs on a fixed batch to
  `--path` + ".npz";
- `check`: the inference outputs equal those of the `.npz` saved beside
  `--path` (after `--load`);
- `fit`: one epoch of `model.fit` on two samples, loss finite;
- `to_standard` / `convert`: the stock twin of a fused model, or the fused
  (4-bit) version of a stock one, with the same inference outputs.

Prints one line "DONE <actions>" at the end; any exception fails the process.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_blpa  # noqa: E402
from keras_blpa.models import preact_resnet_cifar, preact_resnet_imagenet  # noqa: E402

DEFAULT_RECURSION_LIMIT = 1000


def _batch(model) -> np.ndarray:
    shape = model.input_shape[1:]
    return np.random.default_rng(0).normal(size=(2, *shape)).astype("float32")


def _outputs(model, x) -> np.ndarray:
    return keras.ops.convert_to_numpy(model(x, training=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--builder", choices=["cifar", "imagenet"], default="cifar")
    parser.add_argument("--depth", type=int, default=1001)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--stock", action="store_true")
    parser.add_argument("--load", action="store_true", help="load --path instead of building")
    parser.add_argument("--after-stdin-line", action="store_true",
                        help="after the imports, wait for a line on stdin (the caller "
                             "writes it once --path is saved) before building or loading")
    parser.add_argument("--path", required=True)
    parser.add_argument("actions", nargs="*",
                        choices=["summary", "save", "check", "fit", "to_standard", "convert"])
    args = parser.parse_args()
    sys.setrecursionlimit(DEFAULT_RECURSION_LIMIT)
    if args.after_stdin_line and not sys.stdin.readline():
        raise SystemExit("stdin closed before the go-ahead line")

    if args.load:
        model = keras.models.load_model(args.path)
    else:
        build = preact_resnet_cifar if args.builder == "cifar" else preact_resnet_imagenet
        shape = (8, 8, 3) if args.builder == "cifar" else (32, 32, 3)
        model = build(args.depth, width=args.width, classes=3, input_shape=shape,
                      stock=args.stock)
    x = _batch(model)
    for action in args.actions:
        if action == "summary":
            lines: list = []
            model.summary(print_fn=lambda *a, _lines=lines, **k: _lines.append(a))
            assert lines, "summary printed nothing"
        elif action == "save":
            model.save(args.path)
            np.save(args.path + ".npy", _outputs(model, x))
        elif action == "check":
            np.testing.assert_array_equal(_outputs(model, x), np.load(args.path + ".npy"))
        elif action == "fit":
            model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            history = model.fit(x, np.array([0, 1]), epochs=1, batch_size=2, verbose=0)
            assert np.isfinite(history.history["loss"]).all(), history.history
        else:
            twin = (keras_blpa.to_standard(model) if action == "to_standard"
                    else keras_blpa.convert(model, bits=4))
            np.testing.assert_allclose(_outputs(twin, x), _outputs(model, x),
                                       rtol=1e-4, atol=1e-4)
    print("DONE", " ".join(args.actions), flush=True)


if __name__ == "__main__":
    main()
