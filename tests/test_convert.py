"""keras_blpa.convert / to_standard: stock models to fused layers and back."""

import collections
import functools

import gradient_oracle as oracle
import keras
import numpy as np
import pytest
import tensorflow as tf
import unit_taps
from stock import cosine

import keras_blpa
from keras_blpa.layers.base import BNReLUBase

L = keras.layers
SIZE = 64  # the applications' last stage is then 2x2, so BN sees 4 pixels a sample


def _randomize(model, seed=0):
    """Non-trivial BN parameters and statistics (gamma partly negative)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.gamma.assign(rng.normal(1.0, 0.5, n).astype("float32"))
            layer.beta.assign(rng.normal(0.0, 0.5, n).astype("float32"))
            layer.moving_mean.assign(rng.normal(0.0, 0.3, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
    return model


class Scale(L.Layer):
    """A subclassed layer (not stock Keras)."""

    def call(self, x):
        return 2.0 * x


def toy_model():
    """Every chain kind convert handles, and every reason it leaves one stock."""
    inputs = keras.Input((12, 12, 4))
    x = L.Conv2D(8, 3, padding="same", name="stem")(inputs)
    # BN -> ReLU -> ZeroPadding2D -> stride-2 grouped conv (explicit padding).
    a = L.ReLU(name="r1")(L.BatchNormalization(name="bn1")(x))
    x = L.Conv2D(8, 3, strides=2, groups=2, name="c1")(L.ZeroPadding2D(1, name="p1")(a))
    # Projection shortcut: one activation, a 3x3 conv and a bias-free 1x1 conv.
    a = L.Activation("relu", name="r2")(L.BatchNormalization(name="bn2")(x))
    main = L.Conv2D(12, 3, padding="same", name="c2")(a)
    short = L.Conv2D(12, 1, use_bias=False, name="c2_short")(a)
    x = L.Add(name="add2")([main, short])
    # BN -> ReLU -> DepthwiseConv2D (depth multiplier 2).
    a = L.ReLU(name="r3")(L.BatchNormalization(name="bn3")(x))
    x = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw3")(a)
    # BN -> ReLU6 -> 1x1 conv (a capped ReLU). Left stock: BN output read
    # elsewhere; ReLU output read by a pool; a subclassed layer in between.
    x = L.Conv2D(8, 1, name="c4")(L.ReLU(6.0, name="r4")(L.BatchNormalization(name="bn4")(x)))
    b = L.BatchNormalization(name="bn5")(x)
    x = L.Add(name="add5")([L.Conv2D(8, 1, name="c5")(L.ReLU(name="r5")(b)), b])
    x = L.MaxPooling2D(name="pool6")(L.ReLU(name="r6")(L.BatchNormalization(name="bn6")(x)))
    x = L.Conv2D(8, 1, name="c7")(Scale(name="scale7")(L.ReLU(name="r7")(
        L.BatchNormalization(name="bn7")(x))))
    # Head: BN -> ReLU -> GAP -> Dense with a softmax.
    a = L.ReLU(name="r8")(L.BatchNormalization(name="bn8")(x))
    outputs = L.Dense(5, activation="softmax", name="head")(L.GlobalAveragePooling2D(name="gap")(a))
    return _randomize(keras.Model(inputs, outputs, name="toy"))


TOY_FUSED = {"c1", "c2", "dw3", "c4", "head_fused"}
TOY_LEFT = {"bn5": "also read by", "bn6": "MaxPooling2D", "bn7": "subclassed"}


def _x(shape, seed=0):
    return tf.constant(np.random.default_rng(seed).normal(0.5, 2.0, shape).astype("float32"))


def _paired_variables(original, converted, report):
    """(original variable, converted variable) for every trainable weight."""
    pairs, done = [], set()
    for chain in report.fused:
        fused = converted.get_layer(chain.fused_as)
        first, linear = original.get_layer(chain.layers[0]), original.get_layer(chain.linear)
        if isinstance(first, L.BatchNormalization):
            pairs += [(first.gamma, fused.gamma), (first.beta, fused.beta)]
        pairs.append((linear.kernel, fused.kernel))
        if linear.use_bias:
            pairs.append((linear.bias, fused.bias))
        if chain.projection:
            projection = original.get_layer(chain.projection)
            pairs.append((projection.kernel, fused.projection_kernel))
            if projection.use_bias:  # ReLUConv2D's own projection bias
                pairs.append((projection.bias, fused.projection_bias))
        done |= set(chain.layers)
    for layer in original.layers:
        if layer.name not in done and layer.trainable_weights:
            new = converted.get_layer(layer.name).trainable_weights
            pairs += list(zip(layer.trainable_weights, new))
    assert len(pairs) == len(original.trainable_weights) == len(converted.trainable_weights)
    return pairs


def _train_grads(model, variables, x, seed=1):
    w = tf.cast(_x((x.shape[0], model.output_shape[-1]), seed), x.dtype)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = model(x, training=True)
        loss = tf.reduce_sum(out * w)
    return out, tape.gradient(loss, [x, *variables])


def _compare_training(original, converted, report, x):
    """Training outputs and (input and weight gradient) pairs of both models."""
    pairs = _paired_variables(original, converted, report)
    out0, g0 = _train_grads(original, [a for a, _ in pairs], x)
    out1, g1 = _train_grads(converted, [b for _, b in pairs], x)
    grads = [(np.reshape(a, np.shape(b)), np.asarray(b)) for a, b in zip(g1, g0)]
    return np.asarray(out0), np.asarray(out1), grads


def _significant(grads, fraction=1e-3):
    """Gradients that are not zero by construction. A bias right before a BN
    (or an Add into one) has a true gradient of 0, which both models compute
    as rounding noise; those must be ~0 in both, relative to the largest."""
    norms = [np.linalg.norm(b) for _, b in grads]
    scale = max(norms)
    for (a, _), norm in zip(grads, norms):
        if norm < fraction * scale:
            assert np.linalg.norm(a) < 10 * fraction * scale
    return [g for g, n in zip(grads, norms) if n >= fraction * scale]


def _weights_multiset(model):
    return collections.Counter(
        (w.shape, np.asarray(w).tobytes()) for w in model.weights
    )


# ---------------------------------------------------------------- the toy model


def test_toy_model_report_fuses_and_leaves_the_right_chains():
    model = toy_model()
    converted, report = keras_blpa.convert(model, bits=4, return_report=True)
    assert {c.fused_as for c in report.fused} == TOY_FUSED
    left = {c.layers[0]: c.reason for c in report.left}
    assert set(left) == set(TOY_LEFT)
    for bn, words in TOY_LEFT.items():
        assert words in left[bn], (bn, left[bn])
    # Stock layers of the left chains are still there, untouched.
    for name in ("bn5", "r5", "bn6", "r6", "bn7", "scale7"):
        assert type(converted.get_layer(name)) is type(model.get_layer(name))
    fused = {layer.name: layer for layer in converted.layers if isinstance(layer, BNReLUBase)}
    assert set(fused) == TOY_FUSED
    assert fused["c1"].padding == ((1, 1), (1, 1)) and fused["c1"].groups == 2
    assert fused["c2"].projection_filters == 12 and fused["c2"].projection_strides == (1, 1)
    assert fused["dw3"].groups == 12 and fused["dw3"].filters == 24
    assert fused["head_fused"].pooling == "avg"
    assert fused["c4"].max_value == 6.0 and fused["c1"].max_value is None
    assert converted.get_layer("head").activation is keras.activations.softmax
    assert all(layer.bits == 4 for layer in fused.values())
    assert report.stock_layers == 3 + 4 + 3 + 3 + 4 + 1 and report.fused_layers == 5
    text = str(report)
    assert "5 chains fused" in text and "3 left stock" in text
    assert all(name in text for name in TOY_FUSED) and "c4 (capped ReLU, max_value=6)" in text


# The ReLU toy model, and the leaky one (defined below) at (None, 4) bits.
TOY_MODELS = [("relu", None), ("relu", 8), ("relu", 4), ("leaky", None), ("leaky", 4)]


def _toy(kind):
    """`(model, input shape)` of a toy model kind."""
    if kind == "relu":
        return toy_model(), (3, 12, 12, 4)
    return leaky_model(), (3, 10, 10, 4)


@pytest.mark.parametrize("kind,bits", TOY_MODELS)
def test_toy_model_inference_equals_original(kind, bits):
    model, shape = _toy(kind)
    converted = keras_blpa.convert(model, bits=bits)
    x = _x(shape)
    np.testing.assert_allclose(
        converted(x, training=False), model(x, training=False), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("kind", ["relu", "leaky"])
def test_toy_model_exact_training_outputs_and_gradients_equal(kind, implementation):
    model, shape = _toy(kind)
    converted, report = keras_blpa.convert(model, bits=None, return_report=True)
    out0, out1, grads = _compare_training(model, converted, report, _x(shape))
    np.testing.assert_allclose(out1, out0, rtol=1e-5, atol=1e-6)
    significant = _significant(grads)
    assert len(significant) >= len(grads) // 2
    for a, b in significant:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


@pytest.mark.parametrize("bits", [8, 4])
def test_toy_model_blpa_gradients(bits, implementation, monkeypatch):
    model = toy_model()
    converted, report = keras_blpa.convert(model, bits=bits, return_report=True)
    out0, out1, grads = _compare_training(model, converted, report, _x((3, 12, 12, 4)))
    # The forward pass is exact; only the backward uses the approximation.
    np.testing.assert_allclose(out1, out0, rtol=1e-5, atol=1e-6)
    assert max(np.abs(a - b).max() for a, b in grads) > 1e-6  # it is approximate
    _check_units(converted, _x((3, 12, 12, 4)), monkeypatch)


def _check_units(converted, x, monkeypatch) -> None:
    """Every BN unit's gradients inside `converted`, from its codes, against
    the oracle's (`tests/unit_taps.py`)."""
    taps = unit_taps.install(monkeypatch)
    variables = converted.trainable_variables
    step = unit_taps.traced(functools.partial(_train_grads, converted, variables), taps)
    (_, grads), tapped = step(x)
    records = unit_taps.resolve(converted, tapped, taps)
    assert records and all(r[3] is not None for r in records.values())
    grads = {v.path: np.asarray(g) for v, g in zip(variables, grads[1:])}
    unit_taps.check_units(converted, grads, records)
    monkeypatch.undo()


def test_moving_statistics_update_like_stock():
    model = toy_model()
    converted = keras_blpa.convert(model, bits=4)
    x = _x((3, 12, 12, 4))
    model(x, training=True)
    converted(x, training=True)
    for name, bn in (("c1", "bn1"), ("c2", "bn2"), ("dw3", "bn3")):
        for stat in ("moving_mean", "moving_variance"):
            np.testing.assert_allclose(
                getattr(converted.get_layer(name), stat),
                getattr(model.get_layer(bn), stat), rtol=1e-5, atol=1e-6,
            )


def test_fit_steps_match_the_original_with_exact_codes():
    model = toy_model()
    converted, report = keras_blpa.convert(model, bits=None, return_report=True)
    pairs = _paired_variables(model, converted, report)
    rng = np.random.default_rng(3)
    x = rng.normal(0.5, 2.0, (12, 12, 12, 4)).astype("float32")
    y = rng.integers(0, 5, 12)
    initial = [np.array(w) for w in model.weights]
    for m in (model, converted):
        m.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
        m.fit(x, y, batch_size=6, epochs=2, shuffle=False, verbose=0)
    changed = [not np.allclose(w0, w1) for w0, w1 in zip(initial, model.weights)]
    assert sum(changed) >= len(changed) // 2  # 4 steps moved the weights
    for a, b in pairs:
        np.testing.assert_allclose(b, np.reshape(a, b.shape), rtol=1e-4, atol=1e-5)
    for name, bn in (("c1", "bn1"), ("head_fused", "bn8")):
        np.testing.assert_allclose(converted.get_layer(name).moving_variance,
                                   model.get_layer(bn).moving_variance, rtol=1e-4)


def test_to_standard_is_the_exact_inverse():
    model = toy_model()
    converted = keras_blpa.convert(model, bits=4)
    back = keras_blpa.to_standard(converted)
    assert not any(isinstance(layer, BNReLUBase) for layer in back.layers)
    assert _weights_multiset(back) == _weights_multiset(model)
    assert isinstance(back.get_layer("dw3"), L.DepthwiseConv2D)
    assert isinstance(back.get_layer("c1_pad"), L.ZeroPadding2D)
    x = _x((3, 12, 12, 4))
    np.testing.assert_array_equal(back(x, training=False), model(x, training=False))
    np.testing.assert_allclose(back(x, training=True), model(x, training=True), rtol=1e-6)


def test_keep_by_name_and_predicate():
    model = toy_model()
    _, by_name = keras_blpa.convert(model, keep=["c2_short", "gap"], return_report=True)
    assert {c.fused_as for c in by_name.fused} == {"c1", "dw3", "c4"}
    assert "kept stock by `keep` (c2_short)" in {c.layers[0]: c.reason for c in by_name.left}["bn2"]
    _, by_type = keras_blpa.convert(
        model, keep=lambda layer: isinstance(layer, L.DepthwiseConv2D), return_report=True
    )
    assert {c.fused_as for c in by_type.fused} == TOY_FUSED - {"dw3"}


def test_synchronized_batch_norm_fuses_synchronized_and_comes_back():
    inputs = keras.Input((8, 8, 4))
    a = L.ReLU()(L.BatchNormalization(synchronized=True, name="bn")(inputs))
    b = L.ReLU()(L.BatchNormalization(name="bn2")(L.Conv2D(4, 3, padding="same")(a)))
    model = keras.Model(inputs, L.Conv2D(4, 1)(b))
    converted, report = keras_blpa.convert(model, bits=None, return_report=True)
    fused = {layer.name: layer for layer in converted.layers if isinstance(layer, BNReLUBase)}
    assert len(report.fused) == 2 and not report.left
    assert sorted(layer.synchronized for layer in fused.values()) == [False, True]
    back = keras_blpa.to_standard(converted)
    bns = [layer for layer in back.layers if isinstance(layer, L.BatchNormalization)]
    assert sorted(layer.synchronized for layer in bns) == [False, True]
    x = _x((2, 8, 8, 4))
    np.testing.assert_allclose(converted(x), model(x), rtol=1e-5, atol=1e-5)


def test_three_readers_and_two_non_projection_readers_stay_stock():
    inputs = keras.Input((8, 8, 4))
    a = L.ReLU(name="r")(L.BatchNormalization(name="bn")(inputs))
    two = L.Add()([L.Conv2D(4, 3, padding="same")(a), L.Conv2D(4, 1)(a)])  # 1x1 has a bias
    b = L.ReLU(name="r2")(L.BatchNormalization(name="bn2")(two))
    three = L.Add()([L.Conv2D(4, 1, use_bias=False)(b) for _ in range(3)])
    model = keras.Model(inputs, three)
    converted, report = keras_blpa.convert(model, return_report=True)
    assert not report.fused and len(report.left) == 2
    assert all("read by" in c.reason and "projection" in c.reason for c in report.left)
    x = _x((2, 8, 8, 4))
    np.testing.assert_array_equal(converted(x), model(x))


def test_sequential_and_nested_models():
    seq = keras.Sequential([
        keras.Input((8, 8, 3)), L.Conv2D(6, 3), L.BatchNormalization(), L.ReLU(),
        L.Conv2D(6, 3, activation="relu"), L.BatchNormalization(), L.Activation("relu"),
        L.Flatten(), L.BatchNormalization(), L.ReLU(), L.Dense(4),
    ], name="seq")
    _randomize(seq)
    converted, report = keras_blpa.convert(seq, bits=None, return_report=True)
    assert isinstance(converted, keras.Sequential) and len(report.fused) == 2
    assert [c.reason for c in report.left] and "Flatten" in report.left[0].reason
    x = _x((2, 8, 8, 3))
    np.testing.assert_allclose(converted(x), seq(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(converted(x, training=True), seq(x, training=True),
                               rtol=1e-4, atol=1e-5)
    # A Functional model used as a layer (the usual fine-tuning set-up).
    outer = keras.Sequential([keras.Input((12, 12, 4)), toy_model(), L.Dense(2)], name="outer")
    converted, report = keras_blpa.convert(outer, return_report=True)
    assert {c.model for c in report.chains} == {"toy"} and len(report.fused) == 5
    assert any(isinstance(layer, BNReLUBase) for layer in converted.get_layer("toy").layers)
    x = _x((2, 12, 12, 4))
    np.testing.assert_allclose(converted(x), outer(x), rtol=1e-5, atol=1e-6)
    back = keras_blpa.to_standard(converted)
    np.testing.assert_array_equal(back(x), outer(x))


def test_clear_errors():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.bn = L.BatchNormalization()

        def call(self, x):
            return self.bn(x)

    with pytest.raises(ValueError, match=r"subclassed keras\.Model.*Functional"):
        keras_blpa.convert(Sub())
    with pytest.raises(ValueError, match=r"not built.*keras\.Input"):
        keras_blpa.convert(keras.Sequential([L.BatchNormalization(), L.ReLU(), L.Dense(2)]))
    with pytest.raises(ValueError, match="must be a keras.Model"):
        keras_blpa.convert(L.Dense(2))
    model = toy_model()
    with pytest.raises(ValueError, match="`bits`"):
        keras_blpa.convert(model, bits=3)
    with pytest.raises(ValueError, match="`keep`"):
        keras_blpa.convert(model, keep=3)
    with pytest.raises(ValueError, match="naive=True"):
        keras_blpa.to_standard(keras_blpa.convert(model, bits=8, naive=True))


# ------------------------------------------------------------------ leaky ReLU


def leaky_model():
    """Leaky ReLU in every form convert fuses, and a ReLU6."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((10, 10, 4))
    x = L.Conv2D(8, 3, padding="same", name="stem")(inputs)
    a = L.LeakyReLU(negative_slope=0.1, name="lr1")(L.BatchNormalization(name="lbn1")(x))
    x = L.Conv2D(8, 3, padding="same", name="lc1")(a)
    a = L.Activation("leaky_relu", name="lr2")(L.BatchNormalization(name="lbn2")(x))
    x = L.Conv2D(8, 3, strides=2, padding="same", name="lc2")(a)
    a = L.ReLU(max_value=6.0, name="lr3")(L.BatchNormalization(name="lbn3")(x))
    x = L.Conv2D(8, 1, name="lc3")(a)
    # Slope 0 is the ReLU.
    a = L.LeakyReLU(negative_slope=0.0, name="lr4")(L.BatchNormalization(name="lbn4")(x))
    x = L.Dense(16, use_bias=False, name="ld4")(L.GlobalAveragePooling2D(name="lgap")(a))
    a = L.ReLU(negative_slope=0.3, name="lr5")(L.BatchNormalization(name="lbn5")(x))
    outputs = L.Dense(5, activation="softmax", name="lhead")(a)
    return _randomize(keras.Model(inputs, outputs, name="leaky"))


# keras.activations.leaky_relu's default slope (Activation("leaky_relu")).
LEAKY_SLOPES = {"lc1": 0.1, "lc2": 0.2, "lc3": 0.0, "ld4": 0.0, "lhead_fused": 0.3}


def test_leaky_relu_chains_fuse_with_their_slope():
    model = leaky_model()
    converted, report = keras_blpa.convert(model, bits=4, return_report=True)
    slopes = {c.fused_as: c.negative_slope for c in report.fused}
    assert slopes == pytest.approx(LEAKY_SLOPES)
    fused = {layer.name: layer for layer in converted.layers if isinstance(layer, BNReLUBase)}
    assert {n: layer.negative_slope for n, layer in fused.items()} == pytest.approx(LEAKY_SLOPES)
    assert fused["ld4"].pooling == "avg"
    assert converted.get_layer("lhead").activation is keras.activations.softmax
    assert not report.left
    assert fused["lc3"].max_value == 6.0  # ReLU(max_value=6.0): capped
    assert {c.fused_as: c.max_value for c in report.fused}["lc3"] == 6.0
    text = str(report)
    assert "5 chains fused" in text
    for line, words in (("lbn1", "lc1 (leaky ReLU, negative_slope=0.1)"),
                        ("lbn2", "lc2 (leaky ReLU, negative_slope=0.2)"),
                        ("lbn5", "lhead_fused (leaky ReLU, negative_slope=0.3)")):
        [row] = [r for r in text.splitlines() if f" {line} ->" in r]
        assert row.startswith("  fused") and row.endswith(words), row
    [row] = [r for r in text.splitlines() if " lbn4 ->" in r]
    assert row.endswith(" ld4") and "leaky" not in row  # slope 0: a plain ReLU


def test_leaky_relu_4bit_gradients(implementation, monkeypatch):
    model = leaky_model()
    converted, report = keras_blpa.convert(model, bits=4, return_report=True)
    x = _x((16, 10, 10, 4))
    out0, out1, grads = _compare_training(model, converted, report, x)
    np.testing.assert_allclose(out1, out0, rtol=1e-5, atol=1e-6)
    assert max(np.abs(a - b).max() for a, b in grads) > 1e-6  # it is approximate
    _check_units(converted, x, monkeypatch)


def test_leaky_relu_to_standard_is_the_exact_inverse(tmp_path):
    model = leaky_model()
    converted = keras_blpa.convert(model, bits=4)
    back = keras_blpa.to_standard(converted)
    assert not any(isinstance(layer, BNReLUBase) for layer in back.layers)
    assert _weights_multiset(back) == _weights_multiset(model)
    for name, slope in LEAKY_SLOPES.items():
        act = back.get_layer(f"{name}_relu")
        if slope:
            assert type(act) is L.LeakyReLU and act.negative_slope == pytest.approx(slope)
        else:
            assert type(act) is L.ReLU
            assert act.max_value == (6.0 if name == "lc3" else None)
    x = _x((3, 10, 10, 4))
    reference = model(x, training=False)
    np.testing.assert_array_equal(back(x, training=False), reference)
    np.testing.assert_allclose(converted(x, training=False), reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(back(x, training=True), model(x, training=True), rtol=1e-6)
    # Converting the stock model again gives the same slopes, and a saved
    # fused model keeps them.
    _, again = keras_blpa.convert(back, return_report=True)
    assert {c.fused_as: c.negative_slope for c in again.fused} == pytest.approx(LEAKY_SLOPES)
    path = tmp_path / "leaky.keras"
    converted.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_layer("lc1").negative_slope == pytest.approx(0.1)
    np.testing.assert_array_equal(loaded(x, training=False), converted(x, training=False))


@pytest.mark.parametrize("activation,words", [
    (lambda: L.ReLU(threshold=0.5), "threshold=0.5"),
    (lambda: L.ReLU(max_value=4.0, negative_slope=0.1), "max_value=4.0"),
    (lambda: L.Activation("swish"), "silu"),
    (lambda: L.ELU(), "ELU"),
    (lambda: L.LeakyReLU(negative_slope=float("inf")), "finite negative_slope >= 0"),
    (lambda: L.ReLU(negative_slope=float("nan")), "finite negative_slope >= 0"),
])
def test_other_activations_stay_stock_with_their_reason(activation, words):
    model = keras.Sequential([
        keras.Input((6, 6, 3)), L.BatchNormalization(name="bn"), activation(),
        L.Conv2D(4, 1, name="conv"),
    ])
    converted, report = keras_blpa.convert(model, return_report=True)
    assert not report.fused
    [left] = report.left
    assert left.layers[0] == "bn" and words in left.reason, left.reason
    assert "only ReLU, capped ReLU (ReLU6) and leaky ReLU fuse" in left.reason \
        or "finite" in left.reason
    assert not any(isinstance(layer, BNReLUBase) for layer in converted.layers)


# ------------------------------------------------------------- explicit padding


@pytest.mark.parametrize("padding,strides,groups", [
    (((1, 1), (1, 1)), 2, 1), (((0, 2), (1, 0)), 1, 4), (1, 2, 2), ((2, 0), 1, 1),
])
def test_explicit_padding_equals_zero_padding_then_valid_conv(
    padding, strides, groups, implementation
):
    x = _x((2, 9, 10, 8))
    fused = keras_blpa.BNReLUConv2D(6 if groups == 1 else 8, 3, strides=strides,
                                    padding=padding, groups=groups, bits=None)
    fused.build(x.shape)
    stock = _randomize(keras.Sequential([
        keras.Input(x.shape[1:]), L.BatchNormalization(), L.ReLU(), L.ZeroPadding2D(padding),
        L.Conv2D(fused.filters, 3, strides=strides, groups=groups),
    ]))
    bn, conv = stock.layers[0], stock.layers[-1]
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        getattr(fused, name).assign(getattr(bn, name))
    conv.kernel.assign(fused.kernel)
    conv.bias.assign(fused.bias)
    assert tuple(fused.compute_output_shape(x.shape))[1:] == tuple(stock.output_shape)[1:]
    results = []
    for layer_fn, weights in ((fused, [fused.gamma, fused.kernel, fused.bias]),
                              (stock, [bn.gamma, conv.kernel, conv.bias])):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer_fn(x, training=True)
            loss = tf.reduce_sum(out * out)
        results.append((out, tape.gradient(loss, [x, *weights])))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    np.testing.assert_allclose(fused(x, training=False), stock(x, training=False),
                               rtol=1e-5, atol=1e-5)
    # Config round trip; 4 bits keeps the forward exact.
    again = keras_blpa.BNReLUConv2D.from_config(fused.get_config())
    assert again.padding == fused.padding and not isinstance(again.padding, str)


def test_explicit_padding_under_xla():
    x = _x((2, 8, 8, 4))
    layer = keras_blpa.BNReLUConv2D(4, 3, strides=2, padding=((1, 1), (1, 1)), bits=4)
    layer.build(x.shape)

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) ** 2)
        return loss, tape.gradient(loss, [x, layer.kernel])

    eager = step(x)
    compiled = tf.function(step, jit_compile=True)(x)
    np.testing.assert_allclose(compiled[0], eager[0], rtol=1e-5)
    for a, b in zip(compiled[1], eager[1]):
        assert cosine(a, b) > 0.999


def test_padding_argument_errors_and_old_configs():
    with pytest.raises(ValueError, match=r"^`padding` must be 'same', 'valid' or explicit"):
        keras_blpa.BNReLUConv2D(4, 3, padding=((1, -1), (0, 0)))
    with pytest.raises(ValueError, match="`padding`"):
        keras_blpa.BNReLUConv2D(4, 3, padding="causal")
    with pytest.raises(ValueError, match="larger than the input's height 1"):
        keras_blpa.BNReLUConv2D(4, 5, padding=((1, 1), (3, 3)))(tf.zeros((1, 1, 1, 2)))
    # String paddings keep their config form, so earlier .keras files load as before.
    config = keras_blpa.BNReLUConv2D(4, 3, padding="VALID").get_config()
    assert config["padding"] == "valid"
    assert keras_blpa.BNReLUConv2D.from_config(config).padding == "valid"


# ------------------------------------------------------- keras.applications


APPLICATIONS = {
    "ResNet50V2": dict(fused=49, left=0),   # 16 blocks x 3 units + the head
    "DenseNet121": dict(fused=120, left=1),  # stem BN -> ReLU -> MaxPooling stays
    # post-activation: 2 BN units per block, and its Add -> ReLU into the next
    # block's convolutions (and the head's GAP -> Dense), without a BN
    "ResNet50": dict(fused=48, left=1),
    "ResNet101": dict(fused=99, left=1),
    # ReLU6: expansion and depthwise units, head.
    "MobileNetV2": dict(fused=35, left=0),
    # ReLU6; the head's GAP -> Dropout stays (no dropout: training outputs compare)
    "MobileNet": dict(fused=26, left=1, kwargs=dict(dropout=0.0)),
}


def _application(name, size=SIZE, **kwargs):
    keras.utils.set_random_seed(0)
    return getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, 3), classes=10, **kwargs
    )


# ResNet101 is ResNet50's code (keras.applications' ResNet builder and blocks,
# 23 blocks in its third stage instead of 6): the slow suite runs it.
@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.slow) if name == "ResNet101" else name
    for name in APPLICATIONS])
def test_applications_exact_conversion(name):
    model = _randomize(_application(name, classifier_activation=None,
                                    **APPLICATIONS[name].get("kwargs", {})))
    converted, report = keras_blpa.convert(model, bits=None, return_report=True)
    assert len(report.fused) == APPLICATIONS[name]["fused"]
    assert len(report.left) == APPLICATIONS[name]["left"]
    x = _x((4, SIZE, SIZE, 3))
    reference = np.asarray(model(x, training=False))
    np.testing.assert_allclose(converted(x, training=False), reference, rtol=1e-5,
                               atol=1e-5 * np.abs(reference).max())
    back = keras_blpa.to_standard(converted)
    assert _weights_multiset(back) == _weights_multiset(model)
    np.testing.assert_array_equal(back(x, training=False), reference)
    out0, out1, grads = _compare_training(model, converted, report, x)
    np.testing.assert_allclose(out1, out0, rtol=1e-4, atol=1e-4 * np.abs(out0).max())
    # Deep random networks amplify float32 rounding in the backward pass (in
    # ResNet101 and MobileNetV2 stock's own gradients, eager against XLA,
    # differ by up to 3%). So both models are measured against the stock
    # network in float64: the converted one must be about as close to it as
    # stock float32 is (measured: 0.8x-1.9x as far, MobileNetV2 the 1.9x). A
    # wrong mask, padding or kernel layout is not.
    reference = _float64_gradients(model, converted, report, x)
    stock_error = _rel([b for _, b in grads], reference)
    error = _rel([a for a, _ in grads], reference)
    assert error <= 4 * stock_error + 1e-6, (error, stock_error)
    for (a, b), r in zip(grads[:1], reference[:1]):  # the input gradient
        assert _rel([a], [r]) <= 4 * _rel([b], [r]) + 1e-6


def _rel(actual: list, expected: list) -> float:
    """Relative error of a list of tensors taken as one vector."""
    num = sum(np.sum((np.asarray(a, np.float64) - e) ** 2) for a, e in zip(actual, expected))
    return float(np.sqrt(num / sum(np.sum(np.square(e)) for e in expected)))


def _float64_gradients(original, converted, report, x) -> list[np.ndarray]:
    """`_compare_training`'s gradients of the original model in float64."""
    twin = oracle.float64_twin(original)
    by_path = {v.path: v for v in twin.trainable_variables}
    variables = [by_path[a.path] for a, _ in _paired_variables(original, converted, report)]
    _, grads = _train_grads(twin, variables, tf.cast(x, tf.float64))
    return [np.asarray(g, np.float64) for g in grads]


@pytest.mark.parametrize("name", ["ResNet50V2", "ResNet50", "MobileNetV2"])
def test_applications_blpa_gradients(name, monkeypatch):
    """Every BN unit of the converted network computes the oracle's gradient
    from its codes (`tests/unit_taps.py`) at 4 bits (8 bits: unit by unit in
    `tests/test_gradient_oracle.py`); the forward stays exact at both, and 4
    bits lie further from stock than 8."""
    model = _randomize(_application(name, classifier_activation=None))
    x = _x((4, SIZE, SIZE, 3))
    errors = {}
    for bits in (8, 4):
        converted, report = keras_blpa.convert(model, bits=bits, return_report=True)
        out0, out1, grads = _compare_training(model, converted, report, x)
        np.testing.assert_allclose(out1, out0, rtol=1e-4, atol=1e-4 * np.abs(out0).max())
        errors[bits] = _rel([a for a, _ in grads], [b for _, b in grads])
        if bits == 4:
            _check_units(converted, x, monkeypatch)
    assert errors[4] > errors[8] > 0


def test_mobilenet_v2_relu6_chains_fuse_capped():
    model = _application("MobileNetV2", size=32)
    converted, report = keras_blpa.convert(model, return_report=True)
    assert len(report.fused) == 35 and not report.left
    assert {c.max_value for c in report.fused} == {6.0}
    fused = [layer for layer in converted.layers if isinstance(layer, BNReLUBase)]
    assert all(layer.max_value == 6.0 for layer in fused)
    x = _x((2, 32, 32, 3))
    np.testing.assert_array_equal(converted(x, training=False), model(x, training=False))
    back = keras_blpa.to_standard(converted)
    np.testing.assert_array_equal(back(x, training=False), model(x, training=False))


def test_converted_application_fits_saves_and_loads(tmp_path):
    model = _application("ResNet50V2", size=32)
    converted = keras_blpa.convert(model, bits=4)
    converted.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, 8)
    before = [np.array(w) for w in converted.weights]
    history = converted.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    changed = [not np.array_equal(a, w) for a, w in zip(before, converted.weights)]
    assert sum(changed) >= len(before) // 2
    path = tmp_path / "converted.keras"
    converted.save(path)
    loaded = keras.models.load_model(path)
    assert sum(isinstance(layer, BNReLUBase) for layer in loaded.layers) == 49
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), converted.predict(x, verbose=0))
    back = keras_blpa.to_standard(loaded)
    np.testing.assert_allclose(back.predict(x, verbose=0), converted.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
