"""Builders, `model.fit`, conversion and `.keras` files on Keras's JAX backend.

Cross-backend files: a model saved here loads in a fresh TensorFlow-backend
process with the same predictions, and the other way round.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from test_models import _copy_fused_to_stock

import keras_blpa
from keras_blpa import datasets
from keras_blpa.models import preact_resnet_cifar


def _compiled(model, lr=0.05):
    model.compile(keras.optimizers.SGD(lr, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def test_fit_with_bits_none_follows_stock_layers_weight_for_weight():
    """bits=None gradients are stock's: after `fit`, every weight and BN
    moving statistic of the fused ResNet equals the stock one's."""
    kwargs = dict(classes=3, input_shape=(8, 8, 3))
    fused = _compiled(preact_resnet_cifar(11, bits=None, **kwargs))
    stock = _compiled(preact_resnet_cifar(11, stock=True, **kwargs))
    _copy_fused_to_stock(fused, stock)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, 16)
    for model in (fused, stock):
        model.fit(x, y, epochs=2, batch_size=8, verbose=0, shuffle=False)
    by_name = {layer.name: layer for layer in stock.layers}
    for layer in fused.layers:
        if isinstance(layer, keras_blpa.layers.BNReLUConv2D):
            bn = by_name[f"{layer.name}_bn"]
            for w in ("gamma", "beta", "moving_mean", "moving_variance"):
                np.testing.assert_allclose(getattr(layer, w), getattr(bn, w),
                                           rtol=2e-4, atol=2e-5, err_msg=f"{layer.name} {w}")
            np.testing.assert_allclose(layer.kernel, by_name[f"{layer.name}_conv"].kernel,
                                       rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(fused.predict(x, verbose=0), stock.predict(x, verbose=0),
                               rtol=1e-3, atol=1e-3)


def test_4bit_resnet_learns_fashion_mnist_on_jax():
    """A small real training run: 4-bit BLPA ResNet-11 on 2,000 Fashion-MNIST
    images (the shipped subset) beats chance by far on held-out images."""
    (x_train, y_train), (x_test, y_test), _ = datasets.load_fashion_mnist("subset")
    x_train, y_train = x_train[:2000], y_train[:2000]
    # A decaying rate: at a constant 0.1 the held-out accuracy after 3 epochs
    # swung 0.52-0.71 over seeds; decayed to 0 it stays 0.70-0.74.
    lr = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=3 * -(-len(x_train) // 64))
    model = _compiled(preact_resnet_cifar(11, classes=10, input_shape=x_train.shape[1:],
                                          bits=4), lr=lr)
    history = model.fit(x_train, y_train, epochs=3, batch_size=64, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    assert accuracy > 0.6, accuracy


def test_convert_and_to_standard_on_jax():
    base = keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(6, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Conv2D(5, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.LeakyReLU(0.2),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(4),
    ])
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype("float32")
    converted, report = keras_blpa.convert(base, bits=4, return_report=True)
    assert sum(isinstance(layer, keras_blpa.layers.base.BNReLUBase)
               for layer in converted.layers) == 2, report
    np.testing.assert_allclose(converted(x, training=False), base(x, training=False),
                               rtol=1e-5, atol=1e-5)
    back = keras_blpa.to_standard(converted)
    np.testing.assert_allclose(back(x, training=False), base(x, training=False),
                               rtol=1e-5, atol=1e-5)
    _compiled(converted).fit(x, np.arange(4) % 4, epochs=1, verbose=0)


def test_post_activation_parts_fuse_on_jax():
    """ReLU -> Conv without a BN (ReLUConv2D), ApproxBatchNormalization and
    PaddedMaxPooling2D on JAX, as on TensorFlow: outputs equal the stock
    model's, and at bits=None (bn_bits left stock) so do the gradients."""
    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(4, 3, padding="same")(inputs)))
    x = layers.MaxPooling2D(3, strides=2)(layers.ZeroPadding2D(1)(x))
    y = layers.BatchNormalization()(layers.Conv2D(4, 3, padding="same")(x))
    x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.ReLU()(layers.Add()([x, layers.Conv2D(4, 1)(x)]))
    model = keras.Model(inputs, layers.Dense(2)(layers.GlobalAveragePooling2D()(x)))
    x = np.random.default_rng(3).normal(size=(4, 8, 8, 3)).astype("float32")
    converted, report = keras_blpa.convert(model, bits=4, bn_bits=8, return_report=True)
    assert report.approximated and all(c.fused for c in report.pools)
    kinds = {type(layer).__name__ for layer in converted.layers}
    assert {"ReLUConv2D", "ReLUDense", "ApproxBatchNormalization",
            "PaddedMaxPooling2D"} <= kinds, kinds
    np.testing.assert_allclose(converted(x, training=False), model(x, training=False),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(converted(x, training=True), model(x, training=True),
                               rtol=1e-4, atol=1e-5)
    exact = keras_blpa.convert(model, bits=None)

    def gradients(m):
        trainable = [v.value for v in m.trainable_variables]
        fixed = [v.value for v in m.non_trainable_variables]

        def loss(trainable, x):
            out, _ = m.stateless_call(trainable, fixed, x, training=True)
            return jnp.sum(out * jnp.arange(2.0))

        grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(trainable, x)
        # Every weight's gradient, as one sorted vector: the two models
        # group the same weights into different layers.
        flat = np.sort(np.concatenate([np.asarray(g).ravel() for g in grads[0]]))
        return flat, np.asarray(grads[1])

    (stock_w, stock_x), (exact_w, exact_x) = gradients(model), gradients(exact)
    np.testing.assert_allclose(exact_x, stock_x, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(exact_w, stock_w, rtol=1e-4, atol=1e-5 * np.abs(stock_w).max())


_OTHER_BACKEND = textwrap.dedent("""
    import os, sys
    import numpy as np
    import keras
    import keras_blpa
    path, x_path, mode = sys.argv[1:]
    x = np.load(x_path)
    if mode == "load":
        model = keras.models.load_model(path)
    else:
        from keras_blpa.models import preact_resnet_cifar
        model = preact_resnet_cifar(11, classes=3, input_shape=(8, 8, 3), bits=8)
        rng = np.random.default_rng(2)
        model.set_weights([rng.normal(1.0, 0.3, w.shape).astype("float32")
                           for w in model.weights])
        model.save(path)
    np.save(path + "." + keras.backend.backend() + ".npy", model.predict(x, verbose=0))
""")


def _tensorflow_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


needs_tensorflow = pytest.mark.skipif(
    not _tensorflow_installed(), reason="TensorFlow is not installed (e.g. the GPU machine)")


def _in_backend(backend: str, *args: str) -> None:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", _OTHER_BACKEND, *args], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _batch(tmp_path):
    x = np.random.default_rng(3).normal(size=(4, 8, 8, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    return x, str(tmp_path / "x.npy")


@needs_tensorflow
@pytest.mark.parametrize("bits,naive", [(4, False), (8, True), (None, False)])
def test_saved_on_jax_loads_on_tensorflow(tmp_path, bits, naive):
    x, x_path = _batch(tmp_path)
    model = preact_resnet_cifar(11, classes=3, input_shape=(8, 8, 3), bits=bits, naive=naive)
    _compiled(model).fit(x, np.arange(4) % 3, epochs=1, verbose=0)  # moving statistics move
    path = str(tmp_path / "jax.keras")
    model.save(path)
    _in_backend("tensorflow", path, x_path, "load")
    on_tf, on_jax = np.load(path + ".tensorflow.npy"), model.predict(x, verbose=0)
    if not naive:
        np.testing.assert_allclose(on_tf, on_jax, rtol=1e-4, atol=1e-4)
        return
    # Naive inference quantizes: an activation within float rounding of a
    # bin edge (the backends round rsqrt and the convolutions differently)
    # may land in the neighbouring bin, a step of one bin in the next layer.
    close = np.isclose(on_tf, on_jax, rtol=1e-4, atol=1e-4)
    assert close.mean() >= 0.5, (on_tf, on_jax)
    np.testing.assert_allclose(on_tf, on_jax, rtol=0.05, atol=0.05)


@needs_tensorflow
def test_saved_on_tensorflow_loads_on_jax(tmp_path):
    x, x_path = _batch(tmp_path)
    path = str(tmp_path / "tf.keras")
    _in_backend("tensorflow", path, x_path, "save")
    loaded = keras.models.load_model(path)
    fused = [layer for layer in loaded.layers if isinstance(layer, keras_blpa.BNReLUConv2D)]
    assert fused and all(layer.bits == 8 and layer.window == 12.0 for layer in fused)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), np.load(path + ".tensorflow.npy"),
                               rtol=1e-4, atol=1e-4)


def test_nothing_imports_tensorflow_on_jax(tmp_path):
    """Build, fit, save, load, convert and the Fashion-MNIST loader on JAX, in
    a fresh process where TensorFlow cannot be imported (as on a machine
    without it, such as the GPU machine this project is lent)."""
    script = textwrap.dedent("""
        import json, sys
        sys.modules["tensorflow"] = None  # any `import tensorflow` now fails
        import numpy as np
        import keras
        import keras_blpa
        from keras_blpa import datasets
        from keras_blpa.models import preact_resnet_cifar
        (x, y), _, _ = datasets.load_fashion_mnist("subset")
        model = preact_resnet_cifar(11, classes=10, input_shape=x.shape[1:], bits=4)
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x[:32], y[:32], batch_size=16, verbose=0)
        model.save(sys.argv[1])
        keras_blpa.to_standard(keras.models.load_model(sys.argv[1]))
        print(json.dumps(sorted(m for m in sys.modules if m.startswith("tensorflow."))))
    """)
    env = dict(os.environ, KERAS_BACKEND="jax")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.keras")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


_HUB = textwrap.dedent("""
    import sys
    import numpy as np
    import keras
    import keras_hub
    import keras_blpa
    path, x_path, mode = sys.argv[1:]
    x = np.load(x_path)
    if mode == "load":
        model = keras.models.load_model(path)
        assert type(model).__name__ == "ResNetImageClassifier"
    else:
        keras.utils.set_random_seed(0)
        backbone = keras_hub.models.ResNetBackbone(
            input_conv_filters=[32], input_conv_kernel_sizes=[3],
            stackwise_num_filters=[64, 32], stackwise_num_blocks=[2, 2],
            stackwise_num_strides=[1, 2], block_type="bottleneck_block",
            use_pre_activation=False, image_shape=(16, 16, 3))
        task = keras_hub.models.ResNetImageClassifier(backbone=backbone, num_classes=3)
        model = keras_blpa.convert(task, bits=4, bn_bits=8)
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, np.arange(len(x)) % 3, epochs=1, verbose=0)  # statistics move
        model.save(path)
    np.save(path + "." + keras.backend.backend() + ".npy", model.predict(x, verbose=0))
""")


@needs_tensorflow
def test_converted_keras_hub_task_crosses_backends(tmp_path):
    """A converted KerasHub task (post-activation ResNet: BN units, ReLU
    units, ApproxBatchNormalization, PaddedMaxPooling2D) saved on either
    backend loads on the other, with the same predictions."""
    x = np.random.default_rng(3).normal(size=(4, 16, 16, 3)).astype("float32")
    x_path = str(tmp_path / "x.npy")
    np.save(x_path, x)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    for saver, loader in (("jax", "tensorflow"), ("tensorflow", "jax")):
        path = str(tmp_path / f"{saver}.keras")
        for backend, mode in ((saver, "save"), (loader, "load")):
            result = subprocess.run([sys.executable, "-c", _HUB, path, x_path, mode],
                                    env={**env, "KERAS_BACKEND": backend},
                                    capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stderr[-3000:]
        np.testing.assert_allclose(np.load(f"{path}.{loader}.npy"), np.load(f"{path}.{saver}.npy"),
                                   rtol=1e-4, atol=1e-4)
