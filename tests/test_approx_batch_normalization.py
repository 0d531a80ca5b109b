"""`ApproxBatchNormalization` against stock `keras.layers.BatchNormalization`:
forward and moving statistics bit for bit, gradients (equal with bits=None,
close with the closeness measured at 8 and 4 bits), XLA against eager, NaN,
the memory the tape holds, configs, saving, `convert(bn_bits=...)` and bad
arguments, on both paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import pytest
import tensorflow as tf
from kernel_requirement import kernels_unavailable
from stock import cosine

import keras_blpa
from keras_blpa.backend.tensorflow import bn_unit, quantizer

L = keras.layers
# Cosine of (input, gamma) gradients to stock's on `_input`'s data, measured
# on both paths: 8-bit (0.99999, 0.9997), 4-bit (0.9998, 0.991).
COSINE_FLOOR = {8: (0.99995, 0.999), 4: (0.999, 0.98)}
SHAPES = {"conv": (4, 6, 6, 16), "dense": (64, 16)}


def _input(rng, shape):
    # Channels with their own offset and scale, a few outliers beyond the window.
    shift = rng.normal(0.0, 2.0, shape[-1]).astype("float32")
    scale = rng.uniform(0.5, 3.0, shape[-1]).astype("float32")
    x = rng.standard_t(5, shape).astype("float32") * scale + shift
    return tf.constant(x)


def _pair(bits, shape, **kwargs):
    rng = np.random.default_rng(3)
    layer = keras_blpa.ApproxBatchNormalization(bits=bits, **kwargs)
    stock = L.BatchNormalization(**kwargs)
    for bn in (layer, stock):
        bn.build(shape)
    weights = [rng.normal(1.0, 0.5, shape[-1]).astype("float32"),
               rng.normal(0.0, 0.5, shape[-1]).astype("float32"),
               rng.normal(0.0, 0.3, shape[-1]).astype("float32"),
               rng.uniform(0.5, 2.0, shape[-1]).astype("float32")]
    for bn in (layer, stock):
        bn.set_weights(weights)
    return layer, stock


def _grads(layer, x, upstream):
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, training=True) * upstream)
    return [np.asarray(g) for g in tape.gradient(loss, [x, *layer.trainable_weights])]


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("case", list(SHAPES))
def test_forward_and_moving_statistics_are_stock_bn(case, bits, implementation):
    layer, stock = _pair(bits, SHAPES[case])
    x = _input(np.random.default_rng(0), SHAPES[case])
    for training in (True, False):
        np.testing.assert_array_equal(layer(x, training=training), stock(x, training=training))
    for ours, theirs in zip(layer.weights, stock.weights):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("case", list(SHAPES))
def test_gradients_equal_or_close_to_stock(case, bits, implementation):
    layer, stock = _pair(bits, SHAPES[case])
    rng = np.random.default_rng(1)
    x = _input(rng, SHAPES[case])
    # An upstream gradient correlated with the input, as a loss's is.
    upstream = tf.constant(rng.normal(size=SHAPES[case]).astype("float32")) + 0.3 * tf.tanh(x)
    ours, ref = _grads(layer, x, upstream), _grads(stock, x, upstream)
    # d_beta = sum(g) does not depend on xhat: equal up to summation order.
    np.testing.assert_allclose(ours[2], ref[2], rtol=1e-5, atol=1e-5 * np.abs(ref[2]).max())
    if bits is None:
        for a, b in zip(ours, ref):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
        return
    floor_x, floor_gamma = COSINE_FLOOR[bits]
    assert cosine(ours[0], ref[0]) >= floor_x
    assert cosine(ours[1], ref[1]) >= floor_gamma


def test_eight_bits_closer_than_four():
    x = _input(np.random.default_rng(2), SHAPES["conv"])
    upstream = tf.tanh(x) + 0.1
    ref = _grads(_pair(None, SHAPES["conv"])[1], x, upstream)
    errors = {}
    for bits in (8, 4):
        ours = _grads(_pair(bits, SHAPES["conv"])[0], x, upstream)
        errors[bits] = np.linalg.norm(ours[0] - ref[0]) / np.linalg.norm(ref[0])
    assert 0 < errors[8] < errors[4] / 4, errors


def test_paths_agree_and_codes_are_the_centred_grid(monkeypatch):
    """The compiled op and pure TF give the same gradients; the codes are the
    centred grid's (`floor((xhat + window/2) / w)`, clipped)."""
    from keras_blpa import ops

    x = _input(np.random.default_rng(4), SHAPES["conv"])
    upstream = tf.sin(x)
    results = {}
    for path in ("custom_op", "pure_tf"):
        if path == "pure_tf":
            monkeypatch.setenv("KERAS_BLPA_DISABLE_CUSTOM_OPS", "1")
        elif ops.implementation() != "custom_op":
            kernels_unavailable("compiled op unavailable")
        results[path] = _grads(_pair(4, SHAPES["conv"])[0], x, upstream)
    for a, b in zip(*results.values()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())
    params, ones, offset = bn_unit.centred_grid(16, 4, None)
    assert np.all(np.asarray(params.lo) == -3.0) and np.all(np.asarray(params.k) == 0.0)
    mean, var = tf.nn.moments(x, [0, 1, 2])
    xhat = (x - mean) * tf.math.rsqrt(var + 1e-3)
    codes = quantizer.encode_codes(xhat, xhat * ones + offset > 0, params, 4)
    expected = np.clip(np.floor((np.asarray(xhat) + 3.0) / 0.375), 0, 15)
    np.testing.assert_array_equal(codes, expected)
    centres, mask = quantizer._centres_and_mask(codes, params, 4)
    assert np.all(np.asarray(mask))  # constant on: the backward is BN's alone


@pytest.mark.parametrize("bits", [None, 8])
def test_xla_matches_eager(bits):
    layer, _ = _pair(bits, SHAPES["conv"])
    x = _input(np.random.default_rng(5), SHAPES["conv"])
    upstream = tf.cos(x)
    eager = _grads(layer, x, upstream)
    layer, _ = _pair(bits, SHAPES["conv"])

    @tf.function(jit_compile=True)
    def compiled(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) * upstream)
        return tape.gradient(loss, [x, *layer.trainable_weights])

    for a, b in zip(eager, compiled(x)):
        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-4, atol=1e-5 * np.abs(a).max())


def test_nan_surfaces_and_constant_channel_stays_finite():
    x = np.asarray(_input(np.random.default_rng(6), SHAPES["conv"])).copy()
    x[..., 0] = 1.5  # a constant channel: variance 0
    layer, _ = _pair(8, SHAPES["conv"])
    grads = _grads(layer, tf.constant(x), tf.ones(SHAPES["conv"]))
    assert all(np.isfinite(g).all() for g in grads)
    x[0, 0, 0, 1] = np.nan
    out = np.asarray(layer(tf.constant(x), training=True))
    assert np.isnan(out[..., 1]).all() and np.isfinite(out[..., 2:]).all()


def test_mixed_precision_matches_stock():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    layer, stock = _pair(8, SHAPES["conv"])
    x = tf.cast(_input(np.random.default_rng(7), SHAPES["conv"]), "bfloat16")
    out = layer(x, training=True)
    assert out.dtype == tf.bfloat16
    np.testing.assert_array_equal(out, stock(x, training=True))
    grads = _grads(layer, x, tf.ones_like(x))
    assert grads[0].dtype == np.dtype(tf.bfloat16.as_numpy_dtype)


def test_config_and_saving_round_trip(tmp_path):
    layer = keras_blpa.ApproxBatchNormalization(bits=4, window=7.0, momentum=0.9)
    config = layer.get_config()
    assert config["bits"] == 4 and config["window"] == 7.0 and config["momentum"] == 0.9
    assert keras_blpa.ApproxBatchNormalization.from_config(config).get_config() == config
    inputs = keras.Input(SHAPES["conv"][1:])
    model = keras.Model(inputs, L.Add()([inputs, layer(inputs)]))
    x = _input(np.random.default_rng(8), SHAPES["conv"])
    model(x, training=True)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.layers[1], keras_blpa.ApproxBatchNormalization)
    np.testing.assert_array_equal(loaded(x, training=False), model(x, training=False))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(bits=3), "bits"),
        (dict(bits=8, window=0.0), "window"),
        (dict(axis=1), "axis=1"),
        (dict(renorm=True), "renorm"),
        (dict(synchronized=True), "synchronized"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, words):
    with pytest.raises(ValueError, match=words):
        keras_blpa.ApproxBatchNormalization(**kwargs)


def test_bad_inputs():
    layer = keras_blpa.ApproxBatchNormalization()
    with pytest.raises(ValueError, match="rank >= 2"):
        layer(tf.zeros((4,)))
    with pytest.raises(ValueError, match="dtype"):
        keras_blpa.ApproxBatchNormalization()(tf.zeros((2, 3), tf.int32), training=True)


def _post_activation_block_model():
    """Two post-activation blocks: Conv -> BN -> ReLU -> Conv -> BN -> Add -> ReLU."""
    inputs = keras.Input((8, 8, 8))
    x = L.ReLU()(L.BatchNormalization(name="stem_bn")(L.Conv2D(8, 3, padding="same")(inputs)))
    for i in range(2):
        y = L.Conv2D(8, 3, padding="same", name=f"b{i}_conv1")(x)
        y = L.ReLU()(L.BatchNormalization(name=f"b{i}_bn1")(y))
        y = L.Conv2D(8, 3, padding="same", name=f"b{i}_conv2")(y)
        y = L.BatchNormalization(name=f"b{i}_bn2")(y)
        x = L.ReLU()(L.Add()([x, y]))
    outputs = L.Dense(3)(L.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def test_convert_with_bn_bits_approximates_the_lone_bns_and_comes_back():
    model = _post_activation_block_model()
    rng = np.random.default_rng(9)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            layer.set_weights([rng.normal(1, 0.3, 8), rng.normal(0, 0.3, 8),
                               rng.normal(0, 0.3, 8), rng.uniform(0.5, 2, 8)])
    converted, report = keras_blpa.convert(model, bits=4, bn_bits=8, return_report=True)
    # The stem BN (-> ReLU -> the first block's conv1 and its Add) and the two bn2s.
    assert sorted(report.approximated) == ["b0_bn2", "b1_bn2", "stem_bn"]
    assert "3 keep a 8-bit input code" in str(report)
    approx = [layer for layer in converted.layers
              if isinstance(layer, keras_blpa.ApproxBatchNormalization)]
    assert len(approx) == 3 and {layer.bits for layer in approx} == {8}
    x = rng.normal(size=(4, 8, 8, 8)).astype("float32")
    # The fused units' BN arithmetic rounds differently from stock BN's.
    np.testing.assert_allclose(converted(x, training=False), model(x, training=False),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(converted(x, training=True), model(x, training=True),
                               rtol=1e-5, atol=1e-5)
    back = keras_blpa.to_standard(converted)
    assert not any(isinstance(layer, keras_blpa.ApproxBatchNormalization)
                   for layer in back.layers)
    np.testing.assert_array_equal(back(x, training=False), model(x, training=False))
    # bits=None everywhere: the gradients are stock's.
    exact = keras_blpa.convert(model, bits=None, bn_bits=None)
    assert not any(isinstance(layer, keras_blpa.ApproxBatchNormalization)
                   for layer in exact.layers)
    with pytest.raises(ValueError, match="bn_bits"):
        keras_blpa.convert(model, bn_bits=2)


def test_converted_post_activation_model_fits_saves_and_loads(tmp_path):
    model = _post_activation_block_model()
    stock = keras.models.clone_model(model)
    stock.set_weights(model.get_weights())
    converted = keras_blpa.convert(model, bits=4, bn_bits=8)
    rng = np.random.default_rng(12)
    x = rng.normal(size=(16, 8, 8, 8)).astype("float32")
    y = rng.normal(size=(16, 3)).astype("float32")
    losses = []
    for m in (converted, stock):
        m.compile(keras.optimizers.SGD(0.05), keras.losses.MeanSquaredError())
        losses.append(m.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False)
                      .history["loss"])
    # The forward is exact and the gradients close: the converted model's loss
    # follows stock's step for step (measured within 3e-4; stock's falls by
    # 20% over these steps, so gradients that were lost would show).
    np.testing.assert_allclose(losses[0], losses[1], rtol=0.01)
    assert losses[1][-1] < 0.9 * losses[1][0]
    converted.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert sum(isinstance(layer, keras_blpa.ApproxBatchNormalization)
               for layer in loaded.layers) == 3
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), converted.predict(x, verbose=0))


def test_convert_bn_bits_respects_keep_and_reports_why():
    model = _post_activation_block_model()
    _, report = keras_blpa.convert(model, bn_bits=4, keep="b1_bn2", return_report=True)
    assert "b1_bn2" not in report.approximated and "b0_bn2" in report.approximated
    assert "kept stock by `keep` (b1_bn2)" in str(report)


HELD = """
import gc, json, sys
import keras, numpy as np, tensorflow as tf
import keras_blpa
from keras_blpa import profiling
tf.config.set_visible_devices([], "GPU")  # the probe reads CPU:0's allocator
profiling.reserve_cpu_pool(512)
bits = json.loads(sys.argv[1])
def bn():
    if bits == "stock":
        return keras.layers.BatchNormalization()
    return keras_blpa.ApproxBatchNormalization(bits=bits)
layers = [bn() for _ in range(10)]
held = []
for batch in (8, 40):
    x = tf.constant(np.random.default_rng(0).normal(size=(batch, 32, 32, 32)).astype("float32"))
    gc.collect()
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = x
        for layer in layers:
            # BN -> BN: an eager `y + bn(y)` would keep both of the add's
            # inputs on the tape (TensorFlow's AddV2 gradient; not in graphs).
            y = layer(y, training=True)
        loss = tf.reduce_sum(y)
    held.append(tf.config.experimental.get_memory_info("CPU:0")["current"] - before)
    tape.gradient(loss, x)
    del tape, loss, y
print(json.dumps((held[1] - held[0]) / 32 / 2**20))
"""


def test_tape_holds_codes_not_the_inputs():
    """Ten BNs in a row in eager mode: what the tape holds between the
    forward and the backward pass, per sample. Stock BN keeps its float32
    input and more (measured: 3 tensors of 128 KiB per unit and sample); 8
    bits keep a quarter of one (measured: 3.5 tensors in all, the last
    output included)."""
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true", TF_CPP_MIN_LOG_LEVEL="3")

    def run(bits):
        return subprocess.run([sys.executable, "-c", HELD, json.dumps(bits)],
                              capture_output=True, text=True, env=env, timeout=600)

    # A fresh process each, side by side (one per core: each spends most of
    # its time importing TensorFlow); what a process's tape holds is its own.
    variants = ("stock", 8, 4)
    with ThreadPoolExecutor(max_workers=min(len(variants), os.cpu_count() or 1)) as pool:
        outs = dict(zip(variants, pool.map(run, variants)))
    held = {}
    for bits, out in outs.items():
        assert out.returncode == 0, out.stderr[-2000:]
        held[bits] = json.loads(out.stdout.strip().splitlines()[-1])
    print("held MiB/sample:", held)
    one_tensor = 32 * 32 * 32 * 4 / 2**20
    assert held["stock"] >= 10 * one_tensor * 0.9
    # The codes (10 x 1/4 or 1/8 tensor) plus at most the last output.
    assert held[8] < 10 * one_tensor / 4 + 2 * one_tensor
    assert held[4] < held[8]


# ------------------------------------------------------- PaddedMaxPooling2D


@pytest.mark.parametrize("padding, pool_size, strides", [
    (1, 3, 2), (((1, 2), (0, 1)), 2, None), ((1, 1), 3, 1),
])
def test_padded_max_pool_is_zero_padding_then_max_pool(padding, pool_size, strides):
    rng = np.random.default_rng(10)
    x = tf.constant(rng.normal(size=(2, 9, 10, 3)).astype("float32"))
    ours = keras_blpa.PaddedMaxPooling2D(padding, pool_size, strides)
    stock = keras.Sequential([L.ZeroPadding2D(padding), L.MaxPooling2D(pool_size, strides)])

    def grads(layer, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * tf.sin(y + 1.0))
        return y, tape.gradient(loss, x)

    ours_y, ours_g = grads(ours, x)
    stock_y, stock_g = grads(stock, x)
    np.testing.assert_array_equal(ours_y, stock_y)
    np.testing.assert_array_equal(ours_g, stock_g)
    assert ours.compute_output_shape(x.shape) == tuple(stock_y.shape)
    # Under XLA, against the stock layers under XLA (XLA's sin rounds its own way).
    compiled = [tf.function(lambda t, layer=layer: grads(layer, t), jit_compile=True)(x)
                for layer in (ours, stock)]
    np.testing.assert_array_equal(compiled[0][1], compiled[1][1])
    config = ours.get_config()
    assert keras_blpa.PaddedMaxPooling2D.from_config(config).get_config() == config


def test_padded_max_pool_bad_arguments():
    with pytest.raises(ValueError, match="channels_last"):
        keras_blpa.PaddedMaxPooling2D(1, 3, 2, data_format="channels_first")
    with pytest.raises(ValueError, match="ndim=4"):
        keras_blpa.PaddedMaxPooling2D(1, 3, 2)(tf.zeros((2, 8, 3)))


def test_convert_fuses_the_stem_pad_and_pool_exactly_and_back(tmp_path):
    inputs = keras.Input((16, 16, 3))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same")(inputs)))
    x = L.MaxPooling2D(3, strides=2, name="pool")(L.ZeroPadding2D(1, name="pad")(x))
    x = L.ZeroPadding2D(1, name="pad_same")(x)
    x = L.MaxPooling2D(2, padding="same", name="pool_same")(x)  # stays: pads twice
    model = keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling2D()(x)))
    converted, report = keras_blpa.convert(model, bits=None, return_report=True)
    assert [c.fused for c in report.pools] == [True, False]
    assert "pads ('same')" in str(report)
    assert isinstance(converted.get_layer("pool"), keras_blpa.PaddedMaxPooling2D)
    x = np.random.default_rng(11).normal(size=(2, 16, 16, 3)).astype("float32")
    np.testing.assert_array_equal(converted(x, training=False), model(x, training=False))
    converted.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded(x, training=False), model(x, training=False))
    back = keras_blpa.to_standard(loaded)
    assert not any(isinstance(layer, keras_blpa.PaddedMaxPooling2D) for layer in back.layers)
    np.testing.assert_array_equal(back(x, training=False), model(x, training=False))
