"""Keras 3's JAX backend: the unit as a `jax.custom_vjp`, the quantizer in jnp.

Imported only when `keras.backend.backend() == "jax"` (see
`keras_blpa.backend`), and never imports TensorFlow.
"""
