"""Paired training runs of a byte-level GPT-2, stock against BLPA.

Shared by `examples/train_transformer.py` and
`benchmarks/transformer_fidelity.py`: the model (KerasHub `GPT2CausalLM`,
random weights, one token per byte), the batches (random windows of a byte
array and their next-byte targets), the test loss in bits per byte, and the
95% Student t interval of a paired difference over seeds,

    mean(d) +- t_{0.975, n-1} * std(d, ddof=1) / sqrt(n).
"""

from __future__ import annotations

import math

import numpy as np

# Student's t, two-sided 95%, by degrees of freedom (about 2 beyond the table).
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def byte_gpt(seed: int, *, layers: int, hidden_dim: int, heads: int, sequence_length: int,
             dropout: float = 0.1):
    """A `GPT2CausalLM` over bytes (vocabulary 256, MLP 4 * hidden_dim) whose
    weights depend on `seed` only."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=256, num_layers=layers, num_heads=heads, hidden_dim=hidden_dim,
        intermediate_dim=4 * hidden_dim, max_sequence_length=sequence_length,
        dropout=dropout)
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def compile_lm(model, learning_rate: float) -> None:
    """Adam and the next-byte cross-entropy; XLA on JAX, graph mode on TensorFlow."""
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile="auto" if keras.backend.backend() == "jax" else False)


def windows(data: np.ndarray, count: int, length: int, rng: np.random.Generator):
    """`count` random windows of `length + 1` bytes: GPT-2 inputs and next-byte targets."""
    starts = rng.integers(0, len(data) - length - 1, count)
    chunk = np.stack([data[s: s + length + 1] for s in starts]).astype("int32")
    x = {"token_ids": chunk[:, :-1], "padding_mask": np.ones((count, length), bool)}
    return x, chunk[:, 1:]


def bits_per_byte(model, test) -> float:
    """The model's mean next-byte cross-entropy on `test = (x, y)`, in bits."""
    x, y = test
    loss = model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)["loss"]
    return float(loss) / math.log(2)


def paired_interval(differences) -> tuple[float, float]:
    """`(mean, half width of the 95% t interval)` of paired differences
    (half width NaN for a single pair)."""
    d = np.asarray(differences, "float64")
    if d.size < 2:
        return float(d.mean()), float("nan")
    return float(d.mean()), T95.get(d.size - 1, 2.0) * float(d.std(ddof=1)) / math.sqrt(d.size)
