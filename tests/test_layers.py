"""Fused layers against stock Keras layers: outputs, gradients, statistics, errors."""

import gradient_oracle as oracle
import keras
import numpy as np
import pytest
import tensorflow as tf
from stock import StockUnit, cosine, fused_weights, randomize_bn

import keras_blpa

# Every layer test runs on both paths: the compiled op and pure TF.
pytestmark = pytest.mark.usefixtures("implementation")


# Gradient fidelity floors. A prototype measured >= 0.9995 (8 bits) and
# >= 0.994 (4 bits) for weight gradients on random units; the 4-bit grid has
# 16x wider bins, so its error is ~16x larger. These floors sit below the
# measured values with room for seeds, and far above what a wrong mask or a
# misplaced grid gives (cosine ~0.5-0.9 in mutation runs).
COSINE_FLOOR = {8: 0.999, 4: 0.99}

CONV_CASES = [
    dict(filters=6, kernel_size=3),
    dict(filters=5, kernel_size=3, strides=2, padding="valid"),
    dict(filters=4, kernel_size=(1, 3), dilation_rate=2, use_bias=False),
    dict(filters=3, kernel_size=1, center=False, scale=False),
    dict(filters=6, kernel_size=3, groups=2),
]
DENSE_CASES = [
    (dict(units=7), (16, 9)),
    (dict(units=4, use_bias=False), (4, 5, 11)),
    (dict(units=6, pooling="avg"), (4, 5, 5, 8)),
]


def _conv_input(rng, shape=(3, 9, 9, 8)):
    return tf.constant(rng.normal(0.5, 2.0, shape).astype("float32"))


def _make(kind, kwargs, bits, input_shape, rng, naive=False, negative_slope=0.0):
    cls = keras_blpa.BNReLUConv2D if kind == "conv" else keras_blpa.BNReLUDense
    layer = cls(bits=bits, naive=naive, negative_slope=negative_slope, **kwargs)
    layer.build(input_shape)
    randomize_bn(layer, input_shape[-1], rng)
    if layer.use_bias:
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))
    return layer, StockUnit(layer, input_shape)


def _cases():
    for kw in CONV_CASES:
        yield "conv", kw, (3, 9, 9, 8)
    for kw, shape in DENSE_CASES:
        yield "dense", kw, shape


CASES = list(_cases())
IDS = [f"{k}-{i}" for i, (k, _, _) in enumerate(CASES)]


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("kind,kwargs,shape", CASES, ids=IDS)
def test_forward_matches_stock(kind, kwargs, shape, bits):
    rng = np.random.default_rng(0)
    layer, stock = _make(kind, kwargs, bits, shape, rng)
    x = _conv_input(rng, shape)
    for training in (True, False):
        np.testing.assert_allclose(
            layer(x, training=training), stock(x, training=training), rtol=1e-4, atol=1e-4
        )


def _loss(y):
    # A loss with a non-uniform upstream gradient.
    return tf.reduce_sum(tf.sin(y) * y)


def _grads(layer_fn, weights, x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = _loss(layer_fn(x, training=True))
    return tape.gradient(loss, [x, *weights])


@pytest.mark.parametrize("kind,kwargs,shape", CASES, ids=IDS)
def test_exact_mode_gradients_equal_stock(kind, kwargs, shape):
    rng = np.random.default_rng(1)
    layer, stock = _make(kind, kwargs, None, shape, rng)
    x = _conv_input(rng, shape)
    ours = _grads(layer, fused_weights(layer), x)
    ref = _grads(stock, stock.weights, x)
    for a, b in zip(ours, ref):
        scale = np.abs(b).max()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind,kwargs,shape", CASES, ids=IDS)
def test_blpa_gradients_close_to_stock(kind, kwargs, shape, bits):
    rng = np.random.default_rng(2)
    layer, stock = _make(kind, kwargs, bits, shape, rng)
    x = _conv_input(rng, shape)
    ours = _grads(layer, fused_weights(layer), x)
    ref = _grads(stock, stock.weights, x)
    for a, b in zip(ours, ref):
        assert cosine(a, b) >= COSINE_FLOOR[bits]


# Leaky ReLU: a conv with padding and groups, and a pooled dense head.
LEAKY_CASES = [CASES[0], CASES[4], CASES[-1]]
LEAKY_IDS = [f"{k}-{i}" for i, (k, _, _) in enumerate(LEAKY_CASES)]


@pytest.mark.parametrize("slope", [0.1, 0.3])
@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("kind,kwargs,shape", LEAKY_CASES, ids=LEAKY_IDS)
def test_leaky_relu_matches_stock(kind, kwargs, shape, bits, slope):
    """BN -> LeakyReLU -> linear: outputs as stock's; gradients equal with
    bits=None and close at 4 bits (the kink is exact, as for the ReLU)."""
    rng = np.random.default_rng(11)
    layer, stock = _make(kind, kwargs, bits, shape, rng, negative_slope=slope)
    x = _conv_input(rng, shape)
    for training in (True, False):
        np.testing.assert_allclose(
            layer(x, training=training), stock(x, training=training), rtol=1e-4, atol=1e-4
        )
    ours = _grads(layer, fused_weights(layer), x)
    ref = _grads(stock, stock.weights, x)
    relu, _ = _make(kind, kwargs, bits, shape, np.random.default_rng(11))
    relu_grads = _grads(relu, fused_weights(relu), x)
    for a, b, c in zip(ours, ref, relu_grads):
        if bits is None:
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
        else:
            assert cosine(a, b) >= COSINE_FLOOR[bits]
        # The slope reaches the gradients: not the ReLU's.
        assert cosine(a, c) < 0.9999


@pytest.mark.parametrize("bits", [None, 4])
def test_leaky_relu_under_xla_matches_eager(bits):
    rng = np.random.default_rng(12)
    kind, kwargs, shape = CASES[0]
    layer, _ = _make(kind, kwargs, bits, shape, rng, negative_slope=0.2)
    x = _conv_input(rng, shape)
    weights = fused_weights(layer)
    eager = _grads(layer, weights, x)
    compiled = tf.function(lambda x: _grads(layer, weights, x), jit_compile=True)(x)
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def test_leaky_relu_naive_inference_quantizes_the_leaky_output():
    rng = np.random.default_rng(13)
    kind, kwargs, shape = CASES[-1]
    layer, stock = _make(kind, kwargs, 8, shape, rng, naive=True, negative_slope=0.25)
    x = _conv_input(rng, shape)
    out, ref = layer(x, training=False), stock(x, training=False)
    np.testing.assert_allclose(out, ref, rtol=0.05, atol=0.05 * np.abs(ref).max())
    assert not np.array_equal(out, ref)


def test_four_bits_is_less_accurate_than_eight():
    """The approximation is real: error grows as bits shrink, and is not zero."""
    rng = np.random.default_rng(3)
    shape = (4, 10, 10, 16)
    x = _conv_input(rng, shape)
    errors = {}
    for bits in (8, 4):
        layer, stock = _make("conv", dict(filters=8, kernel_size=3), bits, shape,
                             np.random.default_rng(4))
        g = _grads(layer, [layer.kernel], x)[1]
        g_ref = _grads(stock, [stock.linear.kernel], x)[1]
        errors[bits] = float(np.linalg.norm(g - g_ref) / np.linalg.norm(g_ref))
    assert 0 < errors[8] < errors[4] < 0.1


@pytest.mark.parametrize("bits", [None, 4])
def test_moving_statistics_follow_stock(bits):
    rng = np.random.default_rng(5)
    shape = (6, 7, 7, 5)
    layer, stock = _make("conv", dict(filters=3, kernel_size=3, momentum=0.9), bits, shape, rng)
    for step in range(3):
        x = _conv_input(np.random.default_rng(step), shape)
        layer(x, training=True)
        stock(x, training=True)
    np.testing.assert_allclose(layer.moving_mean, stock.bn.moving_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        layer.moving_variance, stock.bn.moving_variance, rtol=1e-5, atol=1e-6
    )


def test_non_trainable_layer_uses_moving_statistics_like_keras():
    rng = np.random.default_rng(6)
    shape = (4, 6, 6, 3)
    layer, stock = _make("conv", dict(filters=2, kernel_size=3), 4, shape, rng)
    layer.trainable = False
    stock.bn.trainable = False
    before = layer.moving_mean.numpy().copy()
    x = _conv_input(rng, shape)
    np.testing.assert_allclose(layer(x, training=True), stock(x, training=True), atol=1e-4)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), before)


def test_naive_mode_quantizes_forward_at_training_and_inference():
    rng = np.random.default_rng(7)
    shape = (4, 8, 8, 6)
    layer, stock = _make("conv", dict(filters=4, kernel_size=3), 4, shape, rng, naive=True)
    x = _conv_input(rng, shape)
    exact = stock(x, training=False).numpy()
    naive = layer(x, training=False).numpy()
    # Inference applies the approximation with the moving statistics...
    assert not np.allclose(naive, exact, atol=1e-4)
    # ...and equals the ReLU of the decoded codes fed to the same convolution,
    # for an input whose codes are known without the library's encoder.
    x_binned, codes = oracle.bin_centred_input(layer, shape, rng)
    np.testing.assert_allclose(layer(x_binned, training=False),
                               oracle.naive_inference(layer, codes), rtol=1e-5, atol=1e-5)
    # Training mode is approximate too, but close (one 4-bit rounding).
    train_out = layer(x, training=True).numpy()
    ref = stock(x, training=True).numpy()
    assert not np.allclose(train_out, ref, atol=1e-4)
    assert cosine(train_out, ref) > 0.98


def _tiny_model(fused):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 4))
    if fused:
        h = keras_blpa.BNReLUConv2D(8, 3, bits=4, use_bias=False)(inputs)
        out = keras_blpa.BNReLUDense(3, bits=4, pooling="avg", dtype="float32")(h)
    else:
        h = keras.layers.ReLU()(keras.layers.BatchNormalization()(inputs))
        h = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(h)
        h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
        h = keras.layers.GlobalAveragePooling2D()(h)
        out = keras.layers.Dense(3, dtype="float32")(h)
    model = keras.Model(inputs, out)
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _precision_fidelity(fused, policy, x, y):
    """Per-tensor cosine of gradients under `policy` against float32."""
    keras.mixed_precision.set_global_policy("float32")
    ref = _tiny_model(fused)
    keras.mixed_precision.set_global_policy(policy)
    mixed = _tiny_model(fused)
    mixed.set_weights(ref.get_weights())
    with tf.GradientTape(persistent=True) as tape:
        l_ref = ref.compute_loss(x, y, ref(x, training=True))
        l_mixed = mixed.compute_loss(x, y, mixed(x, training=True))
    g_ref = tape.gradient(l_ref, ref.trainable_variables)
    g_mixed = tape.gradient(l_mixed, mixed.trainable_variables)
    assert all(g.dtype == tf.float32 for g in g_mixed)
    return mixed, sorted(cosine(a, b) for a, b in zip(g_mixed, g_ref))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_and_matches_float32(policy):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(8, 8, 8, 4)).astype("float32")
    y = rng.integers(0, 3, 8)
    mixed, ours = _precision_fidelity(True, policy, x, y)
    _, stock = _precision_fidelity(False, policy, x, y)
    compute = policy.split("_")[1]
    assert mixed.layers[1].compute_dtype == compute
    assert mixed.layers[1](x, training=True).dtype == compute
    # Low precision costs us no more gradient fidelity than it costs stock Keras.
    assert ours[0] > min(0.99, stock[0] - 0.01)
    history = mixed.fit(x, y, epochs=2, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


XLA_CASES = CASES + [
    ("conv", dict(filters=6, kernel_size=1, strides=2, projection_filters=5), (3, 9, 9, 8)),
    ("conv", dict(filters=4, kernel_size=1, projection_filters=6, projection_strides=2),
     (2, 17, 6, 8)),
]


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize(
    "kind,kwargs,shape", XLA_CASES, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(XLA_CASES)]
)
def test_xla_gradients_match_eager(kind, kwargs, shape, bits):
    """Under jit_compile the codes take the word layout (packed along rows, or
    along the batch of a Dense input) and 1x1 filter gradients are matmuls:
    same codes, so the same gradients as eager up to float reassociation."""
    rng = np.random.default_rng(9)
    layer, _ = _make(kind, kwargs, bits, shape, rng)
    x = _conv_input(rng, shape)
    weights = fused_weights(layer)
    if kwargs.get("projection_filters"):
        weights.append(layer.projection_kernel)

    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, training=True)
            loss = sum(_loss(o) for o in tf.nest.flatten(out))
        return tape.gradient(loss, [x, *weights])

    eager = grads(x)
    compiled = tf.function(grads, jit_compile=True)(x)
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def test_model_fit_with_jit_compile():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(16, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 2, 16)
    inputs = keras.Input((8, 8, 3))
    h = keras_blpa.BNReLUConv2D(4, 3)(inputs)
    out = keras_blpa.BNReLUDense(2, pooling="avg")(h)
    model = keras.Model(inputs, out)
    model.compile("adam", "sparse_categorical_crossentropy", jit_compile=True)
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_config_round_trip():
    layer = keras_blpa.BNReLUConv2D(
        7, (3, 1), strides=2, padding="valid", bits=8, naive=True, momentum=0.9,
        epsilon=1e-5, use_bias=False, kernel_regularizer="l2", name="unit",
    )
    clone = keras_blpa.BNReLUConv2D.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    dense = keras_blpa.BNReLUDense(
        3, bits=None, pooling="avg", center=False, negative_slope=0.2
    )
    assert keras_blpa.BNReLUDense.from_config(dense.get_config()).get_config() == (
        dense.get_config()
    )
    assert dense.get_config()["negative_slope"] == 0.2
    # Saved before `negative_slope` existed: the ReLU.
    old = {k: v for k, v in layer.get_config().items() if k != "negative_slope"}
    assert keras_blpa.BNReLUConv2D.from_config(old).negative_slope == 0.0


def test_window_is_resolved_and_saved():
    """The grid window is stored resolved, so a saved model keeps its grid."""
    assert keras_blpa.BNReLUConv2D(4, 3, bits=8).get_config()["window"] == 12.0
    assert keras_blpa.BNReLUConv2D(4, 3, bits=4).get_config()["window"] == 6.0
    assert keras_blpa.BNReLUDense(4, bits=None).get_config()["window"] is None
    layer = keras_blpa.BNReLUDense(4, bits=8, window=9.5)
    assert keras_blpa.BNReLUDense.from_config(layer.get_config()).window == 9.5


@pytest.mark.parametrize("bits", [4, 8])
def test_config_saved_before_window_keeps_the_paper_grid(bits):
    """Layers saved before `window` existed used 6 sigma at every bit width;
    a naive one must keep that grid, or its inference outputs would change."""
    rng = np.random.default_rng(4)
    x = tf.constant(rng.normal(size=(16, 6)).astype("float32"))
    paper = keras_blpa.BNReLUDense(3, bits=bits, naive=True, window=6.0)
    paper.build(x.shape)
    randomize_bn(paper, 6, rng)
    config = paper.get_config()
    del config["window"]
    legacy = keras_blpa.BNReLUDense.from_config(config)
    legacy.build(x.shape)
    legacy.set_weights(paper.get_weights())
    assert legacy.window == 6.0
    np.testing.assert_array_equal(legacy(x, training=False), paper(x, training=False))
    # The library default differs at 8 bits, so the legacy rule is what keeps it.
    default = keras_blpa.BNReLUDense(3, bits=bits, naive=True)
    default.build(x.shape)
    default.set_weights(paper.get_weights())
    if default.window != 6.0:
        assert not np.array_equal(default(x, training=False), paper(x, training=False))
    exact = keras_blpa.BNReLUDense(3, bits=None).get_config()
    del exact["window"]
    assert keras_blpa.BNReLUDense.from_config(exact).window is None


def test_window_changes_the_saved_approximation():
    """An explicit window reaches the quantizer: 8 bits at the paper's 6 sigma
    differs from the default 12 sigma on the same input."""
    rng = np.random.default_rng(9)
    shape = (4, 6, 6, 8)
    x = _conv_input(rng, shape)
    grads = []
    for window in (6.0, None):
        layer, _ = _make("conv", dict(filters=4, kernel_size=3, window=window), 8, shape,
                         np.random.default_rng(10))
        grads.append(_grads(layer, [layer.kernel], x)[1])
    assert not np.array_equal(grads[0], grads[1])


def test_weight_names_follow_keras():
    layer = keras_blpa.BNReLUConv2D(4, 3)
    layer.build((1, 5, 5, 2))
    names = sorted(w.path.split("/")[-1] for w in layer.weights)
    assert names == sorted(["gamma", "beta", "moving_mean", "moving_variance", "kernel", "bias"])
    assert len(layer.trainable_weights) == 4


def test_compute_output_shape():
    conv = keras_blpa.BNReLUConv2D(4, 3, strides=2, padding="valid")
    assert conv.compute_output_shape((None, 9, 9, 2)) == (None, 4, 4, 4)
    dense = keras_blpa.BNReLUDense(5, pooling="avg")
    assert dense.compute_output_shape((None, 4, 4, 2)) == (None, 5)
    x = tf.zeros((2, 9, 9, 2))
    assert tuple(conv(x).shape) == (2, 4, 4, 4)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: keras_blpa.BNReLUConv2D(4, 3, bits=3), "bits"),
        (lambda: keras_blpa.BNReLUConv2D(4, 3, bits=32), "bits"),
        (lambda: keras_blpa.BNReLUDense(4, bits="4"), "bits"),
        (lambda: keras_blpa.BNReLUConv2D(4, 3, bits=None, naive=True), "naive"),
        (lambda: keras_blpa.BNReLUConv2D(4, 3, data_format="channels_first"), "channels_first"),
        (lambda: keras_blpa.BNReLUConv2D(0, 3), "filters"),
        (lambda: keras_blpa.BNReLUConv2D(4, 3, padding="causal"), "padding"),
        (lambda: keras_blpa.BNReLUConv2D(4, 3, groups=3), "groups"),
        (lambda: keras_blpa.BNReLUDense(4, pooling="max"), "pooling"),
        (lambda: keras_blpa.BNReLUDense(4, dtype="float64"), "dtype"),
        (lambda: keras_blpa.BNReLUConv2D(4, 3, momentum=1.5), "momentum"),
        (lambda: keras_blpa.BNReLUConv2D(4, 3, window=0.0), "window"),
        (lambda: keras_blpa.BNReLUDense(4, bits=8, window="wide"), "window"),
        (lambda: keras_blpa.BNReLUConv2D(4, 3, bits=None, window=8.0), "window"),
        (lambda: keras_blpa.BNReLUConv2D(4, 3, negative_slope=-0.1), "negative_slope"),
        (lambda: keras_blpa.BNReLUDense(4, negative_slope=float("nan")), "negative_slope"),
        (lambda: keras_blpa.BNReLUDense(4, negative_slope="0.2"), "negative_slope"),
    ],
)
def test_bad_arguments_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "layer,x,match",
    [
        (lambda: keras_blpa.BNReLUConv2D(4, 3), np.zeros((2, 5, 3), "float32"), "4-D"),
        (lambda: keras_blpa.BNReLUDense(4, pooling="avg"), np.zeros((2, 3), "float32"), "4-D"),
        (lambda: keras_blpa.BNReLUDense(4), np.zeros((3,), "float32"), "rank >= 2"),
        (lambda: keras_blpa.BNReLUConv2D(4, 3), np.zeros((1, 5, 5, 2), "int32"), "dtype"),
    ],
)
def test_bad_inputs_raise_clear_errors(layer, x, match):
    with pytest.raises(ValueError, match=match):
        layer()(tf.constant(x), training=True)


@pytest.mark.parametrize("bits", [None, 4])
def test_projection_head_matches_stock_shared_preactivation(bits):
    rng = np.random.default_rng(11)
    shape = (3, 8, 8, 6)
    layer = keras_blpa.BNReLUConv2D(
        4, 1, bits=bits, use_bias=False, projection_filters=10, projection_strides=2
    )
    layer.build(shape)
    randomize_bn(layer, 6, rng)
    bn = keras.layers.BatchNormalization()
    bn.build(shape)
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        getattr(bn, name).assign(getattr(layer, name))
    main = keras.layers.Conv2D(4, 1, use_bias=False)
    shortcut = keras.layers.Conv2D(10, 1, strides=2, use_bias=False)
    main.build(shape)
    shortcut.build(shape)
    main.kernel.assign(layer.kernel)
    shortcut.kernel.assign(layer.projection_kernel)

    def stock(x, training):
        a = tf.nn.relu(bn(x, training=training))
        return [main(a), shortcut(a)]

    x = _conv_input(rng, shape)
    for training in (True, False):
        for o, r in zip(layer(x, training=training), stock(x, training)):
            np.testing.assert_allclose(o, r, rtol=1e-4, atol=1e-4)
    assert [tuple(o.shape) for o in layer(x)] == [(3, 8, 8, 4), (3, 4, 4, 10)]
    assert layer.compute_output_shape(shape) == [(3, 8, 8, 4), (3, 4, 4, 10)]

    def grads(fn, weights):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out, short = fn(x, True)
            loss = _loss(out) + _loss(short)
        return tape.gradient(loss, [x, *weights])

    ours = grads(lambda x, t: layer(x, training=t),
                 [layer.gamma, layer.beta, layer.kernel, layer.projection_kernel])
    ref = grads(stock, [bn.gamma, bn.beta, main.kernel, shortcut.kernel])
    for a, b in zip(ours, ref):
        if bits is None:
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
        else:
            assert cosine(a, b) >= COSINE_FLOOR[4]


def test_unused_projection_head_gets_zero_gradient():
    layer = keras_blpa.BNReLUConv2D(4, 3, projection_filters=6)
    x = tf.random.normal((2, 8, 8, 3))

    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            main, _ = layer(x, training=True)
            loss = tf.reduce_sum(main * main)
        return tape.gradient(loss, [x, layer.kernel, layer.projection_kernel])

    for result in (grads(x), tf.function(grads)(x)):
        assert float(tf.reduce_max(tf.abs(result[2]))) == 0.0
        assert float(tf.reduce_max(tf.abs(result[1]))) > 0.0
