"""The JAX backend's tests: collected only when Keras runs on JAX.

    KERAS_BACKEND=jax python -m pytest tests/jax_backend

Under the TensorFlow suite (`python -m pytest`) this folder is skipped; the
bit-exactness of the jnp quantizer against the TensorFlow one and the
compiled op is tested there (`tests/test_jax_quantizer.py`), where both run.
"""

import keras

if keras.backend.backend() != "jax":
    collect_ignore_glob = ["test_*.py"]
