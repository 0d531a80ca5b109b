"""How many batch slices a unit's passes run over, one after another."""

from __future__ import annotations

import os

from keras_blpa.transformer import codes

UNITS = ("attention", "mlp")


def slice_bounds(batch, sample_bytes: int | None, unit: str) -> list[tuple]:
    """`(first, last)` of each batch slice that `unit`'s passes run on, one
    after another: `KERAS_BLPA_<UNIT>_SLICES` slices (read at trace time),
    else as many as keep one slice's largest float tensor within the
    backend's `autodiff.<UNIT>_SLICE_BYTES`, and one where that is None or
    the batch is unknown when traced.

    Args:
      batch: the batch size, an int or a scalar tensor (TensorFlow, traced
        without a static batch).
      sample_bytes: one sample's largest float32 tensor in the unit (the
        attention's `s**2` probabilities, the MLP's 4x-wide activations), in
        bytes; None if unknown (one slice unless the variable says otherwise).
      unit: "attention" or "mlp".
    """
    if unit not in UNITS:
        raise ValueError(f"`unit` must be one of {UNITS}; received unit={unit!r}.")
    variable = f"KERAS_BLPA_{unit.upper()}_SLICES"
    value = os.environ.get(variable, "").strip()
    budget = getattr(codes.autodiff(), f"{unit.upper()}_SLICE_BYTES", None)
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(
                f"{variable}={value!r}: use a positive integer (1: the whole batch at "
                "once; unset: the backend's default)."
            )
        count = int(value)
    elif budget is None or sample_bytes is None or not isinstance(batch, int):
        count = 1
    else:
        count = -(-batch * sample_bytes // budget)
    if isinstance(batch, int):
        count = max(1, min(count, batch))
    bounds = [batch * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))
