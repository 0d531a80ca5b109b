"""The paper's training recipe for `model.fit`, shared by the examples.

Also what the example scripts share around it: a progress log that stays
readable in a log file, and argparse types that reject bad values up front
with a message naming the fix (instead of a traceback from inside TensorFlow).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import keras


def step_schedule(
    base_lr: float, steps_per_epoch: int, epochs: int, milestones=(0.5, 0.75), factor=0.1
) -> keras.optimizers.schedules.LearningRateSchedule:
    """Step learning rate: divided by 10 at 50% and 75% of training (as in the paper)."""
    boundaries = [max(1, int(m * epochs * steps_per_epoch)) for m in milestones]
    values = [base_lr * factor**i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def backend_jit_compile(jit_compile: bool | str | None = None) -> bool | str:
    """`jit_compile`, or for None each backend's best: "auto" (XLA) on JAX,
    False on TensorFlow (see `compile_for_training`)."""
    if jit_compile is None:
        return "auto" if keras.backend.backend() == "jax" else False
    return jit_compile


def compile_for_training(
    model: keras.Model,
    steps_per_epoch: int,
    epochs: int,
    base_lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    jit_compile: bool | str | None = None,
) -> keras.Model:
    """SGD with momentum, weight decay and the step schedule; logits + accuracy.

    `jit_compile=None` picks each backend's best: Keras's "auto" on JAX (XLA;
    without it every JAX step runs op by op, 4-bit then took twice the time
    of exact), False on TensorFlow (the compiled op in a tf.function; XLA on
    TensorFlow uses the pure-TF word layout instead).
    """
    jit_compile = backend_jit_compile(jit_compile)
    optimizer = keras.optimizers.SGD(
        step_schedule(base_lr, steps_per_epoch, epochs), momentum=momentum,
        weight_decay=weight_decay,
    )
    model.compile(
        optimizer,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return model


class ProgressLog(keras.callbacks.Callback):
    """A line of training progress every `every_seconds`, for `fit(verbose=2)`.

    Keras's progress bar redraws one line in a terminal but writes a new line
    per update into a log; `verbose=2` alone stays silent for a whole epoch.
    This prints after the first step (which includes tracing) and then at
    most every `every_seconds`; `verbose=2` adds the epoch's summary line.
    """

    def __init__(self, every_seconds: float = 15.0, stream=None):
        super().__init__()
        self.every_seconds = float(every_seconds)
        self.stream = stream
        self._epoch = 0
        self._epoch_start = 0.0
        self._last = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start = self._last = time.time()

    def on_train_batch_end(self, batch, logs=None):
        now = time.time()
        if batch and now - self._last < self.every_seconds:
            return
        self._last = now
        steps = (self.params or {}).get("steps")
        epochs = (self.params or {}).get("epochs")
        metrics = " - ".join(f"{k}: {float(v):.4f}" for k, v in (logs or {}).items())
        of_steps = f"/{steps}" if steps else ""
        line = (f"  epoch {self._epoch + 1}/{epochs}, step {batch + 1}{of_steps}"
                f" - {metrics} ({now - self._epoch_start:.0f} s)")
        print(line, file=self.stream or sys.stdout, flush=True)


def callbacks(csv_path: str | None, progress_seconds: float | None = None) -> list:
    """A CSV log of every epoch, and with `progress_seconds` a `ProgressLog`."""
    result: list = [keras.callbacks.CSVLogger(csv_path)] if csv_path else []
    if progress_seconds is not None:
        result.append(ProgressLog(progress_seconds))
    return result


# argparse types. argparse reports their ArgumentTypeError as
# "argument --NAME: MESSAGE", so each message says what is allowed.


def _number(text: str, kind: type):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}; received {text!r}"
        ) from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; received {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; received {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer; received {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (rejects NaN and inf)."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number; received {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (rejects NaN and inf)."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive number; received {text}")
    return value


def cifar_depth(text: str) -> int:
    """argparse type: a CIFAR pre-activation ResNet depth, 9n + 2 with n >= 1."""
    value = _number(text, int)
    if value < 11 or (value - 2) % 9:
        lower = 9 * ((value - 2) // 9) + 2
        near = [d for d in (lower, lower + 9) if d >= 11] or [11]
        raise argparse.ArgumentTypeError(
            f"must be 9n + 2 with n >= 1 (11, 20, 29, ..., 164, ...); received {value}: "
            f"use {' or '.join(map(str, near))}"
        )
    return value


def check_quantizer_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`parser.error` for contradictory --bits / --naive / --window / --stock."""
    if args.naive and args.stock:
        parser.error("argument --naive: quantizes inside the fused layers; drop --stock "
                     "or --naive")
    if args.naive and args.bits is None:
        parser.error("argument --naive: quantizes the forward pass and needs --bits 4 or 8; "
                     "received --bits none")
    if args.window is not None:
        if args.bits is None:
            parser.error("argument --window: sets the quantizer's range and needs --bits 4 "
                         "or 8; received --bits none")
        if args.window > 64:
            parser.error("argument --window: must be in (0, 64] standard deviations; "
                         f"received {args.window:g}")


def bits_or_none(text: str) -> int | None:
    """argparse type: 4 or 8 (BLPA), or none / exact (bits=None)."""
    if text.strip().lower() in ("none", "exact"):
        return None
    if text.strip() in ("4", "8"):
        return int(text)
    raise argparse.ArgumentTypeError(
        f"must be 4 or 8 (BLPA) or none (exact activations); received {text!r}"
    )


def fit_and_summarize(
    model: keras.Model,
    train,
    test,
    epochs: int,
    out_dir: str,
    steps_per_epoch: int | None = None,
    verbose: int | str = "auto",
    extra: dict | None = None,
) -> dict:
    """`model.fit` with a CSV log, then a JSON summary of the test metrics.

    Returns and writes (`<out_dir>/summary.json`) the final loss, accuracy and
    error, the wall time and `extra`.
    """
    import json
    import os
    import time

    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    # shuffle=False: `train` is a tf.data pipeline that shuffles itself
    # (`datasets.cifar`, `datasets.imagenet`); fit's default shuffle=True only
    # applies to arrays and warns for datasets.
    history = model.fit(
        train, epochs=epochs, steps_per_epoch=steps_per_epoch, validation_data=test,
        callbacks=callbacks(os.path.join(out_dir, "log.csv")), verbose=verbose,
        shuffle=False,
    )
    metrics = model.evaluate(test, verbose=0, return_dict=True)
    summary = {
        "model": model.name,
        "parameters": model.count_params(),
        "epochs": epochs,
        **{f"test_{name}": float(value) for name, value in metrics.items()},
        "test_error_percent": 100.0 * (1.0 - float(metrics["accuracy"])),
        "train_seconds": time.time() - start,
        "final_train_loss": float(history.history["loss"][-1]),
        **(extra or {}),
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return summary
