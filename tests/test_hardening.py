"""Training never fails silently: non-finite values, shape drift, second-order
gradients, layer dtypes, naive-mode edge cases and argument errors."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from stock import StockUnit, randomize_bn

import keras_blpa
from keras_blpa import ops
from keras_blpa.models import preact_resnet_cifar

VARIANTS = [(None, False), (4, False), (8, False), (4, True), (8, True)]


def _layer_and_input(kind, bits, naive, rng, **kwargs):
    if kind == "conv":
        layer = keras_blpa.BNReLUConv2D(5, 3, bits=bits, naive=naive, **kwargs)
        x = rng.normal(size=(3, 6, 6, 4)).astype("float32")
    else:
        layer = keras_blpa.BNReLUDense(5, bits=bits, naive=naive, **kwargs)
        x = rng.normal(size=(12, 4)).astype("float32")
    layer.build(x.shape)
    randomize_bn(layer, 4, rng)
    return layer, x


def _with(x, value, index):
    x = x.copy()
    x[index] = value
    return x


# --- non-finite values ------------------------------------------------------


@pytest.mark.usefixtures("implementation")
@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("bits,naive", VARIANTS)
@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_non_finite_input_shows_where_stock_shows_it(kind, bits, naive, value):
    """A NaN or Inf in the input is non-finite in exactly the outputs where the
    stock layers' output is (training: the whole batch, through the moments)."""
    rng = np.random.default_rng(0)
    layer, x = _layer_and_input(kind, bits, naive, rng)
    x = _with(x, value, (1,) + (2,) * (x.ndim - 2) + (0,))
    stock = StockUnit(layer, x.shape)
    for training in (True, False):
        want = np.isfinite(stock(tf.constant(x), training=training).numpy())
        got = np.isfinite(layer(tf.constant(x), training=training).numpy())
        assert not want.all()
        np.testing.assert_array_equal(got, want, err_msg=f"training={training}")


@pytest.mark.parametrize("bits,naive", [(None, False), (4, False), (4, True), (8, True)])
def test_non_finite_input_shows_under_xla(bits, naive):
    rng = np.random.default_rng(1)
    layer, x = _layer_and_input("conv", bits, naive, rng)
    x = tf.constant(_with(x, np.nan, (0, 3, 3, 2)))
    for training in (True, False):
        out = tf.function(lambda t, training=training: layer(t, training=training),
                          jit_compile=True)(x)
        assert np.isnan(out.numpy()).any(), f"training={training}"

    @tf.function(jit_compile=True)
    def forward_backward(t):
        with tf.GradientTape() as tape:
            tape.watch(t)
            out = layer(t, training=True)
            loss = tf.reduce_sum(out)
        return out, tape.gradient(loss, t)

    out, grad = forward_backward(x)
    # As with stock layers: every output, and the NaN channel's gradient.
    assert np.isnan(out.numpy()).all() and np.isnan(grad.numpy()[..., 2]).all()


def _nan_pixel_fit(jit_compile):
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(32, 8, 8, 1)).astype("float32")
    x[5, 4, 4, 0] = np.nan
    y = rng.integers(0, 3, 32)
    model = preact_resnet_cifar(11, width=0.25, classes=3, input_shape=(8, 8, 1), bits=4)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy",
                  jit_compile=jit_compile)
    losses = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: losses.append(float(logs["loss"]))
    )
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[record, keras.callbacks.TerminateOnNaN()])
    return losses


@pytest.mark.usefixtures("implementation")
def test_one_nan_pixel_stops_fit_at_the_first_batch():
    """As with stock layers: the loss is NaN at the first batch that holds the
    NaN pixel, and TerminateOnNaN stops training there."""
    losses = _nan_pixel_fit(jit_compile=False)
    assert len(losses) == 1 and np.isnan(losses[0])


def test_one_nan_pixel_stops_fit_under_xla():
    losses = _nan_pixel_fit(jit_compile=True)
    assert len(losses) == 1 and np.isnan(losses[0])


# --- shape drift --------------------------------------------------------------


@pytest.mark.usefixtures("implementation")
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_built_layer_rejects_another_channel_count(kind, training):
    layer, x = _layer_and_input(kind, 4, False, np.random.default_rng(0))
    wrong = x[..., :1]
    with pytest.raises(ValueError, match=r"built for inputs with 4 channels.*received 1"):
        layer(tf.constant(wrong), training=training)
    with pytest.raises(ValueError, match=r"built for inputs with 4 channels.*received 1"):
        layer(keras.Input(wrong.shape[1:]))


# --- second-order gradients -----------------------------------------------------


@pytest.mark.usefixtures("implementation")
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("bits", [None, 4, 8])
def test_second_order_gradients_raise_a_clear_error(bits, compiled):
    layer, x = _layer_and_input("conv", bits, False, np.random.default_rng(0))
    x = tf.constant(x)

    def penalty_gradient(x):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = tf.reduce_sum(layer(x, training=True) ** 2)
            g = inner.gradient(loss, x)
            penalty = tf.reduce_sum(g**2)
        return outer.gradient(penalty, layer.trainable_weights)

    run = tf.function(penalty_gradient) if compiled else penalty_gradient
    with pytest.raises(NotImplementedError, match=r"Second-order gradients.*stock keras"):
        run(x)


def test_first_order_gradients_under_a_recording_tape_still_work():
    """No false alarm: first-order gradients taken while a (persistent) tape
    still records equal those of a plain tape, and can be taken twice."""
    layer, x = _layer_and_input("conv", 4, False, np.random.default_rng(0))
    with tf.GradientTape() as plain:
        loss = tf.reduce_sum(layer(tf.constant(x), training=True) ** 2)
    expected = plain.gradient(loss, layer.trainable_weights)
    with tf.GradientTape(persistent=True) as tape:
        loss = tf.reduce_sum(layer(tf.constant(x), training=True) ** 2)
        first = tape.gradient(loss, layer.trainable_weights)
        again = tape.gradient(loss, layer.trainable_weights)
    for a, b, e in zip(first, again, expected):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-6,
                                   atol=1e-6 * float(np.abs(e.numpy()).max()))
        assert np.abs(e.numpy()).sum() > 0


# --- layer dtypes ------------------------------------------------------------------


@pytest.mark.usefixtures("implementation")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_layer_dtype_trains_like_float32(kind, dtype):
    """A layer-level dtype (no mixed-precision policy) computes in that dtype,
    BN in float32 as in Keras's BN, and agrees with the float32 layer."""
    rng = np.random.default_rng(0)
    ref, x = _layer_and_input(kind, 8, False, rng)
    low = (keras_blpa.BNReLUConv2D(5, 3, bits=8, dtype=dtype) if kind == "conv"
           else keras_blpa.BNReLUDense(5, bits=8, dtype=dtype))
    low.build(x.shape)
    for w_low, w_ref in zip(low.weights, ref.weights):
        w_low.assign(tf.cast(w_ref, w_low.dtype))
    x_low = tf.cast(x, dtype)
    with tf.GradientTape() as tape:
        tape.watch(x_low)
        out = low(x_low, training=True)
        loss = tf.reduce_sum(tf.cast(out, "float32") ** 2)
    grads = tape.gradient(loss, [x_low, *low.trainable_weights])
    assert out.dtype == dtype
    assert low.moving_mean.dtype == dtype
    assert not np.allclose(low.moving_mean.numpy().astype("float32"), 0.0)
    want = ref(tf.constant(x), training=True).numpy()
    tol = 0.05 if dtype == "bfloat16" else 0.01
    np.testing.assert_allclose(tf.cast(out, "float32").numpy(), want,
                               atol=tol * np.abs(want).max())
    for g, w in zip(grads, [x_low, *low.trainable_weights]):
        assert g.dtype == w.dtype
        assert np.isfinite(tf.cast(g, "float32").numpy()).all()
    inference = low(x_low, training=False)
    assert inference.dtype == dtype


# --- naive mode ----------------------------------------------------------------


def _naive_model(bits=4):
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", name="before")(inputs)
    h = keras_blpa.BNReLUConv2D(5, 3, bits=bits, naive=bits is not None, name="unit")(h)
    return keras.Model(inputs, h)


def test_exported_naive_model_serves_without_keras_blpa(tmp_path):
    """`model.export` of a naive model holds plain TF ops only: a process that
    never imports keras_blpa loads and serves it, with the same outputs."""
    model = _naive_model()
    randomize_bn(model.get_layer("unit"), 4, np.random.default_rng(0))
    x = np.random.default_rng(1).normal(size=(2, 6, 6, 3)).astype("float32")
    want = model(x, training=False).numpy()
    model.export(str(tmp_path / "served"), verbose=False)
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import sys, numpy as np, tensorflow as tf
        served = tf.saved_model.load({str(tmp_path / "served")!r})
        out = served.serve(np.load({str(tmp_path / "x.npy")!r}))
        np.save({str(tmp_path / "out.npy")!r}, out.numpy())
        assert "keras_blpa" not in sys.modules
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), want)


@pytest.mark.usefixtures("implementation")
def test_frozen_naive_layer_passes_exact_relu_gradients():
    """A frozen naive layer (inference statistics, quantized forward) passes
    the gradient of its exact ReLU to the layers before it: the same as a
    frozen bits=None layer with the same weights, for a loss linear in the
    output (so the upstream gradient is the same)."""
    naive, exact = _naive_model(4), _naive_model(None)
    randomize_bn(naive.get_layer("unit"), 4, np.random.default_rng(0))
    exact.set_weights(naive.get_weights())
    x = np.random.default_rng(1).normal(size=(2, 6, 6, 3)).astype("float32")
    r = tf.constant(np.random.default_rng(2).normal(size=(2, 6, 6, 5)), "float32")
    grads = []
    for model in (naive, exact):
        model.get_layer("unit").trainable = False
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True) * r)
        grads.append(tape.gradient(loss, model.get_layer("before").trainable_weights))
    assert not np.array_equal(naive(x, training=True), exact(x, training=True))
    for g_naive, g_exact in zip(*grads):
        assert np.abs(g_exact.numpy()).sum() > 0
        np.testing.assert_allclose(g_naive.numpy(), g_exact.numpy(), rtol=1e-5, atol=1e-6)


# --- argument errors --------------------------------------------------------------


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: keras_blpa.BNReLUConv2D(4, 3, strides=0), r"^`strides`"),
        (lambda: keras_blpa.BNReLUConv2D(4, 3, strides="x"), r"^`strides`"),
        (lambda: keras_blpa.BNReLUConv2D(4, 3, projection_filters=2, projection_strides=0),
         r"^`projection_strides`"),
        (lambda: keras_blpa.BNReLUConv2D(4, (3, 0)), r"^`kernel_size`"),
        (lambda: keras_blpa.BNReLUConv2D(4, 3, dilation_rate=-1), r"^`dilation_rate`"),
        (lambda: keras_blpa.BNReLUConv2D(True, 3), r"^`filters`"),
        (lambda: keras_blpa.BNReLUConv2D(2.0, 3), r"^`filters`"),
        (lambda: keras_blpa.BNReLUConv2D(4, 3, groups=0), r"^`groups`"),
        (lambda: keras_blpa.BNReLUConv2D(4, 3, projection_filters=0), r"^`projection_filters`"),
        (lambda: keras_blpa.BNReLUDense(2.5), r"^`units`"),
        (lambda: keras_blpa.BNReLUConv2D(4, 3, epsilon="small"), r"^`epsilon`"),
        (lambda: keras_blpa.BNReLUConv2D(4, 3, epsilon=float("nan")), r"^`epsilon`"),
        (lambda: keras_blpa.BNReLUConv2D(4, 3, epsilon=0), r"^`epsilon`"),
        (lambda: keras_blpa.BNReLUDense(4, momentum="fast"), r"^`momentum`"),
        (lambda: keras_blpa.BNReLUDense(4, naive="yes"), r"^`naive`"),
        (lambda: keras_blpa.BNReLUDense(4, use_bias="False"), r"^`use_bias`"),
        (lambda: keras_blpa.BNReLUDense(4, center=None), r"^`center`"),
        (lambda: preact_resnet_cifar(11, width=float("nan")), r"^`width`"),
        (lambda: preact_resnet_cifar(11, width="2"), r"^`width`"),
        (lambda: preact_resnet_cifar(11.0), r"^`depth`"),
        (lambda: preact_resnet_cifar(21), r"^`depth`"),
        (lambda: preact_resnet_cifar(11, classes=0), r"^`classes`"),
        (lambda: preact_resnet_cifar(11, input_shape=(8, 8)), r"^`input_shape`"),
        (lambda: preact_resnet_cifar(11, input_shape=(8, 8, None)), r"^`input_shape`"),
        (lambda: preact_resnet_cifar(11, bits=2), r"^`bits`"),
        (lambda: preact_resnet_cifar(11, momentum=2.0), r"^`momentum`"),
        (lambda: preact_resnet_cifar(11, stock="no"), r"^`stock`"),
        (lambda: keras_blpa.models.preact_resnet_imagenet(50, epsilon=-1.0), r"^`epsilon`"),
    ],
)
def test_bad_arguments_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_kernel_larger_than_input_is_a_clear_error():
    layer = keras_blpa.BNReLUConv2D(4, 5, padding="valid", dilation_rate=2)
    with pytest.raises(ValueError, match=r"larger than the input's height 6.*padding='same'"):
        layer(tf.zeros((1, 6, 12, 2)), training=True)
    assert keras_blpa.BNReLUConv2D(4, 5, padding="same")(tf.zeros((1, 3, 3, 2))).shape == (
        1, 3, 3, 4)


def test_numpy_integers_work_like_python_integers():
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 8, 8, 4)), "float32")
    plain = keras_blpa.BNReLUConv2D(6, 3, strides=2, groups=2, projection_filters=4)
    numpy = keras_blpa.BNReLUConv2D(
        np.int64(6), np.int32(3), strides=np.int64(2), groups=np.int64(2),
        projection_filters=np.int32(4),
    )
    plain.build(x.shape)
    numpy.build(x.shape)
    numpy.set_weights(plain.get_weights())
    for a, b in zip(plain(x, training=True), numpy(x, training=True)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    configs = [{**layer.get_config(), "name": ""} for layer in (numpy, plain)]
    assert json.dumps(configs[0]) == json.dumps(configs[1])
    dense = keras_blpa.BNReLUDense(np.int32(3), epsilon=np.float32(1e-3))
    assert dense.units == 3 and type(dense.units) is int
    model = preact_resnet_cifar(np.int64(11), classes=np.int64(3), input_shape=(8, 8, 1))
    assert model.output_shape == (None, 3)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda p, x, packed: ops.bn_relu_encode(x, tf.zeros(3), tf.ones(3), tf.ones(4),
                                                 tf.zeros(4), p, 4), r"^`mean`.*\[4\]"),
        (lambda p, x, packed: ops.bn_relu_encode(tf.constant(1.0), tf.zeros(4), tf.ones(4),
                                                 tf.ones(4), tf.zeros(4), p, 4), r"^`x`"),
        (lambda p, x, packed: ops.decode(packed, p, [2, 3, 3, 4], 8), r"^`packed`.*8-bit"),
        (lambda p, x, packed: ops.decode(tf.cast(packed, tf.int32), p, [2, 3, 3, 4], 4),
         r"^`packed`.*uint8"),
        (lambda p, x, packed: ops.decode_relu(packed, p, tf.ones(5), tf.zeros(5),
                                              [2, 3, 3, 4], 4), r"^`gamma`"),
        (lambda p, x, packed: ops.quantizer_params(tf.ones(4), tf.zeros(4), None), r"^`bits`"),
    ],
)
@pytest.mark.usefixtures("implementation")
def test_op_wrappers_name_the_bad_argument(call, match):
    params = ops.quantizer_params(tf.ones(4), tf.zeros(4), 4)
    x = tf.random.normal((2, 3, 3, 4))
    _, packed = ops.bn_relu_encode(x, tf.zeros(4), tf.ones(4), tf.ones(4), tf.zeros(4),
                                   params, 4)
    with pytest.raises(ValueError, match=match):
        call(params, x, packed)


@pytest.mark.usefixtures("implementation")
@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_op_wrappers_take_any_float_dtype_on_both_paths(dtype):
    """Both paths compute in float32 whatever the float dtype (the op always
    did; pure TF failed on the mix with float32 statistics)."""
    x = tf.random.normal((2, 3, 3, 4))
    params = ops.quantizer_params(tf.ones(4), tf.zeros(4), 4)
    stats = (tf.zeros(4), tf.ones(4), tf.ones(4), tf.zeros(4))
    a, packed = ops.bn_relu_encode(tf.cast(x, dtype), *stats, params, 4)
    a32, packed32 = ops.bn_relu_encode(tf.cast(tf.cast(x, dtype), "float32"), *stats,
                                       params, 4)
    assert a.dtype == tf.float32
    np.testing.assert_array_equal(a.numpy(), a32.numpy())
    np.testing.assert_array_equal(packed.numpy(), packed32.numpy())


@pytest.mark.usefixtures("implementation")
@pytest.mark.parametrize("bits,naive", VARIANTS)
def test_non_finite_weight_shows_in_training_outputs(bits, naive):
    """A weight that went NaN (gamma here) shows in the outputs it feeds."""
    layer, x = _layer_and_input("conv", bits, naive, np.random.default_rng(0))
    layer.gamma.assign(tf.tensor_scatter_nd_update(layer.gamma, [[1]], [np.nan]))
    assert np.isnan(layer(tf.constant(x), training=True).numpy()).all()


# --- Keras backend ------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: keras_blpa.BNReLUConv2D(4, 3),
    lambda: keras_blpa.BNReLUDense(4),
    lambda: keras_blpa.convert(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])),
])
def test_other_keras_backends_get_a_clear_error(make, monkeypatch):
    """TensorFlow and JAX have implementations; on PyTorch the layers would
    fail deep inside a trace. Keras's backend is fixed at import, so it is
    faked here."""
    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    with pytest.raises(RuntimeError, match=r"runs on 'torch'.*KERAS_BACKEND=tensorflow or "
                                           r"KERAS_BACKEND=jax"):
        make()
