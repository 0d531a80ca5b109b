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


def logits(equation: str, a, b):
    """float32 `einsum(equation, a, b)`: bfloat16 products accumulated in
    float32, as Keras's JAX `dot_product_attention` computes its logits."""
    return jnp.einsum(equation, a, b, preferred_element_type=jnp.float32)


def dropout_keep(seed, shape, rate: float, gate):
    """The keep mask of dropout at `rate`, a pure function of `seed` (two
    integers, from a `keras.random.SeedGenerator`): the backward pass draws
    the same mask again instead of keeping it. The random bits wait for
    `gate` (the tensor being dropped): seeds are known when the step starts,
    and XLA would otherwise draw every layer's bits up front and hold them."""
    key = xla.after(jnp.asarray(seed).astype(jnp.uint32).reshape(2), gate)
    return jax.random.uniform(key, tuple(shape), jnp.float32) >= rate


def bins(x, edges):
    """int32 `sum(x > edge)` over ascending float32 `edges` (one compare per
    edge, which XLA fuses into one loop)."""
    code = jnp.zeros(x.shape, jnp.int32)
    for edge in edges:
        code = code + (x > float(edge)).astype(jnp.int32)
    return code


def pack(codes, bits: int):
    """uint32 words of `[rows, features]` codes, packed along the rows by one
    reduce-window (a buffer XLA:CPU never fuses into the backward pass)."""
    return quantizer.pack_words(codes, bits)


def unpack(words, shape, bits: int):
    """Inverse of `pack`: int32 codes of `shape` (`[rows, features]`)."""
    return quantizer.unpack_words(words, tuple(shape), bits).astype(jnp.int32)
