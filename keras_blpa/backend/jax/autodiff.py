"""The custom-gradient seam of the transformer units on JAX.

Twin of `keras_blpa.backend.tensorflow.autodiff` (same names, same contract):
`custom_vjp` is a `jax.custom_vjp` whose residuals are exactly what the
forward saved, `vjp` is `jax.vjp`, and `pack` / `unpack` are the uint32 word
packers of `keras_blpa.backend.jax.quantizer`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from keras_blpa.backend.jax import quantizer, xla


def custom_vjp(forward: Callable, backward: Callable, name: str) -> Callable:
    """`f(*inputs) -> outputs` whose gradient is `backward(saved, kept, grads)`.

    Args, as `keras_blpa.backend.tensorflow.autodiff.custom_vjp`; `backward`
    returns a gradient of each input's shape, or None for an input without
    one (a mask, a seed), which is cast to the input's dtype: JAX would pass
    a float32 cotangent of a bfloat16 input on unchanged.
    """
    del name

    def apply(*inputs):
        dtypes = [jnp.result_type(t) for t in inputs]
        return list(_custom_vjp(forward, backward, dtypes)(*inputs))

    return apply


def _custom_vjp(forward: Callable, backward: Callable, dtypes: list) -> Callable:
    """`custom_vjp` for inputs of `dtypes` (what its backward is cast to)."""

    @jax.custom_vjp
    def call(*inputs):
        return tuple(forward(*inputs)[0])

    def fwd(*inputs):
        outputs, saved, kept = forward(*inputs)
        # Every schedule finishes the codes before an output is used, so the
        # encoder runs in the forward pass (XLA:CPU drops barriers).
        outputs = tuple(xla.tie(out, saved[0]) for out in outputs)
        return outputs, (list(saved), list(kept))

    def bwd(residuals, grads):
        saved, kept = residuals
        grads = list(grads)
        # Decode only once the upstream gradient exists (the last output's: an
        # earlier output, such as a norm's residual branch, may have none);
        # the weights too, whose transposed copies would otherwise be made in
        # the forward pass and held until the backward.
        saved, kept = ([xla.after(s, grads[-1]) for s in part] for part in (saved, kept))
        saved, kept, grads = xla.optimization_barrier((saved, kept, grads))
        return tuple(None if g is None else jnp.asarray(g, dtype)
                     for g, dtype in zip(backward(saved, kept, grads), dtypes))

    call.defvjp(fwd, bwd)
    return call


def vjp(fn: Callable, primals: Sequence, cotangent) -> list:
    """Gradients of `sum(fn(*primals) * cotangent)` with respect to `primals`
    (`fn` may return a list, with a list of cotangents)."""
    out, pull = jax.vjp(fn, *primals)
    return list(pull(jax.tree.map(lambda c, o: jnp.asarray(c, o.dtype), cotangent, out)))


def after_all(tensors: Sequence, gates: Sequence) -> list:
    """`tensors` (None stays None), made data-dependent on the first of
    `gates` (`xla.after`)."""
    gate = next(g for g in gates if g is not None)
    return [None if t is None else xla.after(t, gate) for t in tensors]


def logits(equation: str, a, b):
    """float32 `einsum(equation, a, b)`: bfloat16 products accumulated in
    float32, as Keras's JAX `dot_product_attention` computes its logits."""
    return jnp.einsum(equation, a, b, preferred_element_type=jnp.float32)


def dropout_keep(seed, shape, rate: float, gate):
    """The keep mask of dropout at `rate`, a pure function of `seed` (two
    integers, from a `keras.random.SeedGenerator`): the backward pass draws
    the same mask again instead of keeping it. The random bits wait for
    `gate` (the tensor being dropped): seeds are known when the step starts,
    and XLA would otherwise draw every layer's bits up front and hold them.

    Each element keeps when its 16 random bits are at least
    `round(rate * 2**16)` (`dropout_threshold`), two elements to a word of
    threefry bits: half the words of a float `uniform` (whose bits, float
    and mask XLA:CPU holds at 12 bytes an element: 0.75 MiB per sample for
    the attention mask of a GPT-2 block at sequence 128). Threefry, not
    XLA's RngBitGenerator: its bits are a function of the element's index
    alone, so the backward's mask is the forward's under any sharding."""
    key = xla.after(jnp.asarray(seed).astype(jnp.uint32).reshape(2), gate)
    shape = tuple(shape)
    size = int(np.prod(shape))
    words = jax.random.bits(jax.random.wrap_key_data(key, impl="threefry2x32"),
                            ((size + 1) // 2,), jnp.uint32)
    halves = jnp.stack([words & jnp.uint32(0xFFFF), words >> 16], axis=-1).reshape(-1)
    return (halves[:size] >= dropout_threshold(rate)).reshape(shape)


def dropout_threshold(rate: float) -> int:
    """The 16-bit threshold of `dropout_keep`: the drop probability is
    `round(rate * 2**16) / 2**16`, within 2**-17 of `rate`."""
    return int(round(rate * 65536))


def bins(x, edges):
    """int32 `sum(x > edge)` over ascending float32 `edges` (one compare per
    edge, which XLA fuses into one loop)."""
    code = jnp.zeros(x.shape, jnp.int32)
    for edge in edges:
        code = code + (x > float(edge)).astype(jnp.int32)
    return code


def pack(codes, bits: int):
    """uint32 words of `[rows, features]` codes, packed along the rows (the
    layout of `quantizer.pack_words`); 4- and 8-bit row codes by one
    reduction over each word's rows.

    A reduction, not `pack_words`'s reduce-window: XLA:CPU fuses the encode
    into a reduction's input (a reduce-window takes a full-size uint32
    operand of its own: 0.17 MiB per sample more on a GPT-2 of 4 or 12
    blocks), and fuses neither into a later consumer, so the words are a
    buffer of their own and the float32 input is not kept for the backward.
    """
    if bits not in (4, 8):
        # Words of 10 or 32 rows (3- and 1-bit codes) straddle the devices'
        # row boundary under DataParallel: the grouping reshape is then
        # all-gathered, where the reduce-window exchanges halos.
        return quantizer.pack_words(codes, bits)
    k = quantizer.codes_per_word(bits)
    rows, features = codes.shape
    padded = jnp.pad(codes.astype(jnp.uint32), ((0, -rows % k), (0, 0)))
    grouped = padded.reshape(-1, k, features)
    shift = jnp.asarray(np.arange(k) * bits, jnp.uint32).reshape(1, k, 1)
    return jnp.sum(grouped << shift, axis=1, dtype=jnp.uint32)


def unpack(words, shape, bits: int):
    """Inverse of `pack`: int32 codes of `shape` (`[rows, features]`)."""
    return quantizer.unpack_words(words, tuple(shape), bits).astype(jnp.int32)
