"""The paper's training recipe for `model.fit`, shared by the examples."""

from __future__ import annotations

import keras


def step_schedule(
    base_lr: float, steps_per_epoch: int, epochs: int, milestones=(0.5, 0.75), factor=0.1
) -> keras.optimizers.schedules.LearningRateSchedule:
    """Step learning rate: divided by 10 at 50% and 75% of training (as in the paper)."""
    boundaries = [max(1, int(m * epochs * steps_per_epoch)) for m in milestones]
    values = [base_lr * factor**i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def compile_for_training(
    model: keras.Model,
    steps_per_epoch: int,
    epochs: int,
    base_lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    jit_compile: bool | str = False,
) -> keras.Model:
    """SGD with momentum, weight decay and the step schedule; logits + accuracy."""
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


def callbacks(csv_path: str | None) -> list:
    """A CSV log of every epoch (the progress bar comes from `fit` itself)."""
    return [keras.callbacks.CSVLogger(csv_path)] if csv_path else []


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
    history = model.fit(
        train, epochs=epochs, steps_per_epoch=steps_per_epoch, validation_data=test,
        callbacks=callbacks(os.path.join(out_dir, "log.csv")), verbose=verbose,
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
