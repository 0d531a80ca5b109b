"""Keras 3's TensorFlow backend: the units as `tf.custom_gradient`s, the
quantizer in pure TF, and the compiled op (`kernels`).

Imported only when `keras.backend.backend() == "tensorflow"` (see
`keras_blpa.backend`), or by `keras_blpa.ops`. The only package of
keras_blpa that imports TensorFlow at module level.
"""
