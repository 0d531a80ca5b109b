"""The custom-gradient seam of the transformer units (`keras_blpa.transformer`).

Those units are written once in `keras.ops`; what each backend supplies is
here, with the same names in `keras_blpa.backend.jax.autodiff`:

- `custom_vjp(forward, backward, name)`: a function whose backward pass reads
  only what `forward` chose to save (packed codes and small vectors);
- `vjp(fn, primals, cotangents)`: the vector-Jacobian product of a linear map
  at rebuilt inputs (weight and input gradients of Dense / EinsumDense heads);
- `pack(codes, bits)` / `unpack(words, shape, bits)`: integer codes of a 2-D
  `[rows, features]` tensor in uint32 words along the rows.

Here only: `compiled_codes()`, the one-pass CPU kernels of the row and
derivative codes (`row_kernels`) that `codes` uses where they apply.

The structure is that of the BN unit (`keras_blpa.backend.tensorflow.unit`):
the forward's inputs are cut from the outer tape, every code is finished
before any output is used, the backward reads them only once its upstream
gradient exists (control dependencies for graph executors, data
dependencies and barriers for XLA), and no gradient leaves a unit before
all of them exist (`tests/test_unit_order.py` says why).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf
from keras import ops

from keras_blpa.backend.tensorflow import quantizer, row_kernels, xla

try:  # Internal API, used only to save memory in eager mode.
    from tensorflow.python.eager import record as _record
except ImportError:  # pragma: no cover - other TF versions
    _record = None

# Batch slices (`slicing.slice_bounds`): the attention unit's backward keeps
# each slice's `s**2` float tensor within ATTENTION_SLICE_BYTES, the MLP
# unit (`norm_mlp`) each slice's 4x-wide float tensor within
# MLP_SLICE_BYTES; the executor would hold several of them at once over the
# whole batch. A 12-block GPT-2 at sequence 128 (both are 6 samples), batches
# 4 to 16: 6.6-7.2 -> 5.7 MiB per sample; step time at batch 12 and 16 1.05x
# and 1.04x stock's whole, 1.08x and 1.07x sliced (slices of 4 samples cost
# 1.18x). A 4-block GPT-2 at sequence 512, batches 4 and 8: 32.9 -> 22.1 MiB
# per sample (measured with two samples a slice; a sample's `s**2` tensor is
# 4 MiB there, so one a slice now).
ATTENTION_SLICE_BYTES = 3 * 2**19
MLP_SLICE_BYTES = 3 * 2**20

Forward = Callable[..., tuple[list[tf.Tensor], list[tf.Tensor], list[tf.Tensor]]]
Backward = Callable[[list[tf.Tensor], list[tf.Tensor], list[tf.Tensor]], list[tf.Tensor]]


def custom_vjp(forward: Forward, backward: Backward, name: str) -> Callable[..., list[tf.Tensor]]:
    """`f(*inputs) -> outputs` whose gradient is `backward(saved, kept, grads)`.

    Args:
      forward: `forward(*inputs) -> (outputs, saved, kept)`: `saved` are the
        per-sample tensors (codes) that the backward reads only once its
        upstream gradient exists (the outputs are tied to `saved[0]`, so the
        codes are finished in the forward pass); `kept` are tensors the model
        holds anyway (weights, seeds), passed through untouched.
      backward: `backward(saved, kept, grads) -> gradients`, one per input, of its
        shape, or None for an input without one (a mask, a seed); `grads` has
        one tensor per output. Each gradient is cast to its input's dtype (a
        backward computes in float32 under `mixed_bfloat16`).
      name: the layer's name, for the op recorded in eager mode.
    """

    def unit(*inputs):
        dtypes = [t.dtype for t in inputs]
        # Stop the outer tape from recording (and keeping alive) the forward's
        # full-precision intermediates in eager mode.
        outputs, saved, kept = forward(*(tf.stop_gradient(t) for t in inputs))
        # Finish the codes before any output is used: graph executors and XLA
        # could otherwise defer the encoder and keep its float inputs alive.
        # Every code, outside XLA: an executor runs the outputs' chain first
        # and a code off it waited for the backward pass (one inter-op
        # thread: each GPT-2 block's GELU output until its backward).
        saved = xla.optimization_barrier(*saved)
        with tf.control_dependencies(saved):
            outputs = [tf.identity(xla.tie(out, saved[0])) for out in outputs]
        # Only shapes and dtypes: capturing the outputs would keep them alive.
        specs = [(tf.shape(out), out.dtype) for out in outputs]

        def grad(*upstream, variables=None):
            del variables  # the layers pass their weights as inputs
            grads = [
                tf.zeros(shape, dtype) if g is None else g
                for g, (shape, dtype) in zip(upstream[: len(specs)], specs)
            ]
            # Decode only once the upstream gradient exists (the last output's:
            # an earlier output, such as a norm's residual branch, may have
            # none); the weights too, whose transposed copies would otherwise
            # be made in the forward pass and held until the backward.
            n, m = len(saved), len(kept)
            gated = xla.optimization_barrier(
                *(xla.after(s, grads[-1]) for s in (*saved, *kept)), *grads)
            saved_now, kept_now, grads = gated[:n], gated[n : n + m], gated[n + m :]
            with tf.control_dependencies(grads):
                saved_now = [tf.identity(s) for s in saved_now]
            results = [None if g is None else tf.cast(g, dtype)
                       for g, dtype in zip(backward(saved_now, kept_now, grads), dtypes)]
            # Hand no gradient on before all of them exist. An executor runs
            # the input gradients' chain first and queues the weight
            # gradients' products behind it (one inter-op thread: to the end
            # of the backward pass), each holding its decoded activation: a
            # 4-block GPT-2 kept 8.7 MiB per sample, 4.8 with this, 3.2 with
            # the codes' order above too.
            done = [g for g in results if g is not None]
            with tf.control_dependencies(done):
                return [None if g is None else tf.identity(g) for g in results]

        return outputs, grad

    def call(*inputs):
        inputs = [tf.convert_to_tensor(t) for t in inputs]
        if tf.executing_eagerly() and _record is not None:
            # Eager `tf.custom_gradient` keeps the forward's results alive on
            # the tape; record the same pair directly so only `grad`'s
            # captures (the codes) stay.
            outputs, grad = unit(*inputs)
            _record.record_operation(name, list(outputs), list(inputs), grad)
            return outputs
        return list(tf.custom_gradient(unit)(*inputs))

    return call


def vjp(
    fn: Callable[..., tf.Tensor], primals: Sequence[tf.Tensor], cotangent: tf.Tensor
) -> list[tf.Tensor]:
    """Gradients of `sum(fn(*primals) * cotangent)` with respect to `primals`.

    For linear maps: the forward product itself is not needed by the
    gradient and a traced function prunes it.
    """
    primals = list(primals)
    with tf.GradientTape() as tape:
        tape.watch(primals)
        out = fn(*primals)
    return tape.gradient(out, primals, output_gradients=cotangent)


def after_all(tensors: Sequence, gates: Sequence) -> list:
    """`tensors` (None stays None), computed only once every one of `gates`
    exists: control dependencies for the executor, data dependencies on the
    first gate under XLA."""
    gates = [g for g in gates if g is not None]
    with tf.control_dependencies(gates):
        return [None if t is None else tf.identity(xla.after(t, gates[0])) for t in tensors]


def logits(equation: str, a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """float32 `einsum(equation, a, b)`, from the product in the inputs'
    dtype, as Keras's TensorFlow `dot_product_attention` computes its logits
    (TensorFlow's einsum has no wider accumulator type). Through
    `keras.ops.einsum`, as `MultiHeadAttention` forms its scores: Keras runs
    the attention's equations as batched matmuls, whose gradients are
    batched matmuls too (`tf.einsum`'s are `_MklEinsum` ops, slower on CPU)."""
    return tf.cast(ops.einsum(equation, a, b), tf.float32)


def dropout_keep(seed: tf.Tensor, shape, rate: float, gate: tf.Tensor) -> tf.Tensor:
    """The keep mask of dropout at `rate`, a pure function of `seed` (two
    integers, from a `keras.random.SeedGenerator`): the backward pass draws
    the same mask again instead of keeping it. The random bits wait for
    `gate` (the tensor being dropped): seeds are known when the step starts,
    and executors would otherwise draw every layer's bits up front.

    As on JAX (`keras_blpa.backend.jax.autodiff.dropout_keep`), an element
    keeps when its 16 random bits are at least `round(rate * 2**16)`
    (`dropout_threshold`), two elements to a 32-bit word of Philox bits,
    read as two uint16 by a bitcast (no pass of its own): half the random
    words of a float `uniform`, whose generation was the most expensive op
    of the units' backward on a CPU (a 4-block GPT-2 step drew 26 masks,
    15 of its 246 ms of op time on one thread; the 16-bit halves take 45%
    less per mask). The words' buffer is half the float uniform's."""
    threshold = dropout_threshold(rate)
    with tf.control_dependencies([gate]):
        seed = xla.after(tf.reshape(tf.cast(seed, tf.int64), [2]), gate)
    shape = list(shape)
    if threshold >= 1 << 16:
        return tf.zeros(shape, tf.bool)
    if isinstance(shape[-1], int) and shape[-1] % 2 == 0:  # a word per pair along the last axis
        words = tf.random.stateless_uniform([*shape[:-1], shape[-1] // 2], seed, minval=None,
                                            maxval=None, dtype=tf.uint32)
        halves = tf.bitcast(words, tf.uint16)
    else:
        size = tf.reduce_prod(tf.convert_to_tensor(shape, tf.int64))
        words = tf.random.stateless_uniform(tf.reshape((size + 1) // 2, [1]), seed, minval=None,
                                            maxval=None, dtype=tf.uint32)
        halves = tf.reshape(tf.bitcast(words, tf.uint16), [-1])[:size]
    return tf.reshape(halves >= tf.constant(threshold, tf.uint16), shape)


def dropout_threshold(rate: float) -> int:
    """The 16-bit threshold of `dropout_keep`: the drop probability is
    `round(rate * 2**16) / 2**16`, within 2**-17 of `rate`."""
    return int(round(rate * 65536))


def bins(x: tf.Tensor, edges) -> tf.Tensor:
    """int32 `sum(x > edge)` over ascending float32 `edges`, in one op.

    A compare per edge would leave the executor that many full-size int32
    tensors to run in parallel (measured: +2.9 MiB per sample on a 4-block
    GPT-2 at 3 bits). `Bucketize` counts `edge <= value`; on the negated
    input and edges that is `edge >= x`, whose complement is `edge < x`."""
    flipped = [-float(e) for e in reversed(edges)]
    at_or_above = tf.raw_ops.Bucketize(input=-x, boundaries=flipped)
    return len(flipped) - at_or_above


def pack(codes: tf.Tensor, bits: int) -> tf.Tensor:
    """uint32 words of `[rows, features]` codes, packed along the rows.

    Under XLA with one reduce-window (`xla.sum_windows`), whose result is a
    buffer XLA:CPU never fuses into the backward pass. Outside XLA, 8-bit
    codes stay uint8 as they are: the same bytes, and no shifts to run
    (TensorFlow's executor runs each op as a pass of its own).
    """
    if not xla.in_xla_context():
        if bits == 8:
            return tf.cast(codes, tf.uint8)
        return quantizer.pack_words(codes, bits)
    return quantizer.pack_words(codes, bits, xla.sum_windows())


def unpack(words: tf.Tensor, shape: tf.Tensor | list, bits: int) -> tf.Tensor:
    """Inverse of `pack`: int32 codes of `shape` (`[rows, features]`)."""
    if words.dtype == tf.uint8:
        return tf.cast(words, tf.int32)
    return tf.cast(quantizer.unpack_words(words, shape, bits), tf.int32)


def compiled_codes():
    """`row_kernels` (one-pass CPU ops of the row and derivative codes) where
    they apply, else None: outside XLA, on a CPU, with the op library."""
    return row_kernels if row_kernels.compiled() else None
