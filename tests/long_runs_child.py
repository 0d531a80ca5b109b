"""Training process for tests/test_long_runs.py (run as a fresh Python process).

Trains a small 4-bit BLPA pre-activation ResNet on a slice of the Fashion-MNIST
subset with `model.fit` and saves every model and optimizer variable to an
.npz file. Options add `keras.callbacks.BackupAndRestore`, a stop at a given
batch (write a marker file, then block until the parent SIGKILLs us),
`tf.config.experimental.enable_op_determinism()`, and the data order.

Data order ("--order"):
- "epoch": the training order of epoch `e` is a permutation drawn from
  `np.random.default_rng([seed, e])`, fed through a `keras.utils.PyDataset`
  told the epoch by `on_epoch_begin`. Every epoch has its own order, and a
  process resumed at epoch `e` by BackupAndRestore sees exactly the batches
  of epoch `e` (BackupAndRestore saves no random state, so the order must be
  a function of the epoch number).
- "keras": `model.fit(x, y, shuffle=True)`. Under `keras.utils.set_random_seed`
  Keras 3.15 (TensorFlow backend) draws the same permutation in every epoch
  (its shuffle is a seeded op inside the tf.data pipeline, which restarts
  with each epoch's iterator), so a resumed process sees the same order too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_blpa import datasets, ops  # noqa: E402
from keras_blpa.models import preact_resnet_cifar  # noqa: E402


class EpochOrder(keras.utils.PyDataset):
    """Batches of `(x, y)` in a permutation that depends on (seed, epoch) only."""

    def __init__(self, x, y, batch_size: int, seed: int):
        super().__init__()
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.seen: list[list[int]] = []  # [epoch, batch, first row] of each batch served
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.order = np.random.default_rng([self.seed, epoch]).permutation(len(self.x))

    def __len__(self) -> int:
        return len(self.x) // self.batch_size

    def __getitem__(self, index: int):
        rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        self.seen.append([self.epoch, int(index), int(rows[0])])
        return self.x[rows], self.y[rows]


class SetEpoch(keras.callbacks.Callback):
    def __init__(self, data: EpochOrder):
        super().__init__()
        self.data = data

    def on_epoch_begin(self, epoch, logs=None):
        self.data.set_epoch(epoch)


class StopAt(keras.callbacks.Callback):
    """After batch `batch` of epoch `epoch`: write `marker`, then block (the
    parent kills this process with SIGKILL when it sees the marker)."""

    def __init__(self, epoch: int, batch: int, marker: Path):
        super().__init__()
        self.epoch, self.batch, self.marker = epoch, batch, marker
        self.current = -1

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.current, batch) == (self.epoch, self.batch):
            self.marker.write_text(f"{os.getpid()} {self.epoch} {self.batch}\n")
            while True:
                time.sleep(60)


def state(model: keras.Model) -> dict[str, np.ndarray]:
    """Every model variable (BN moving statistics included) and optimizer variable."""
    out = {f"model/{i}/{v.path}": np.asarray(v) for i, v in enumerate(model.weights)}
    out.update({f"optimizer/{i}/{v.path}": np.asarray(v)
                for i, v in enumerate(model.optimizer.variables)})
    return out


def train(args: argparse.Namespace, out: Path) -> None:
    """One seeded training run; saves `state(model)` to `out` and run info
    (quantizer path, epochs run, losses, batches seen) beside it as .json."""
    keras.utils.set_random_seed(args.seed)
    (x, y), _, _ = datasets.load_fashion_mnist("subset")
    x, y = x[:args.train_size], y[:args.train_size]
    model = preact_resnet_cifar(11, width=0.25, classes=10, input_shape=x.shape[1:],
                                bits=args.bits)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callbacks = []
    if args.backup_dir:
        save_freq = args.save_freq if args.save_freq == "epoch" else int(args.save_freq)
        callbacks.append(keras.callbacks.BackupAndRestore(args.backup_dir, save_freq=save_freq))
    if args.stop_at:
        epoch, batch = map(int, args.stop_at.split(":"))
        callbacks.append(StopAt(epoch, batch, Path(args.marker)))
    seen = None
    if args.order == "epoch":
        data = EpochOrder(x, y, args.batch_size, args.seed)
        history = model.fit(data, epochs=args.epochs, shuffle=False, verbose=0,
                            callbacks=[SetEpoch(data), *callbacks])
        seen = data.seen
    else:
        history = model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs,
                            shuffle=True, verbose=0, callbacks=callbacks)
    np.savez(out, **state(model))
    out.with_suffix(".json").write_text(json.dumps({
        "implementation": ops.implementation(),
        "epochs_run": len(history.history["loss"]),
        "loss": history.history["loss"],
        "seen": seen,
    }))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-size", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--order", choices=("epoch", "keras"), default="epoch")
    p.add_argument("--backup-dir", default=None)
    p.add_argument("--save-freq", default="epoch", help='"epoch" or a number of batches')
    p.add_argument("--stop-at", default=None, help="EPOCH:BATCH, with --marker")
    p.add_argument("--marker", default=None)
    p.add_argument("--determinism", action="store_true")
    p.add_argument("--pure-tf-too", action="store_true",
                   help="then train again with KERAS_BLPA_DISABLE_CUSTOM_OPS=1, saving to "
                   "<out>_pure_tf.npz (one process start for both paths)")
    args = p.parse_args(argv)
    if args.determinism:
        tf.config.experimental.enable_op_determinism()
    out = Path(args.out)
    train(args, out)
    if args.pure_tf_too:
        # Checked whenever a step is traced: the new model's step takes pure TF.
        os.environ["KERAS_BLPA_DISABLE_CUSTOM_OPS"] = "1"
        train(args, out.with_name(f"{out.stem}_pure_tf.npz"))


if __name__ == "__main__":
    main(sys.argv[1:])
