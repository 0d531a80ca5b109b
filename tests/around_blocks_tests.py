"""Bodies of the tests of the norms and dropouts around transformer blocks
(`keras_blpa.layers.LayerNormalization` / `Dropout`, and how `convert`
swaps them), collected on both backends by `tests/test_transformers.py` and
`tests/jax_backend/test_jax_transformers.py`."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import transformer_oracle as oracle
from keras import ops
from transformer_tests import TOLERANCE, _gpt2, _rng, _tokens, _upstream, gradients

from keras_blpa.transformer import codes


def test_dropout_layer_keeps_the_seed_and_redraws_its_mask():
    """The backward's mask is the forward's: zero gradient where the output
    was dropped, `1 / (1 - rate)` where kept; inference is the identity."""
    from keras_blpa.layers import Dropout

    layer = Dropout(0.3, seed=5)
    x = (_rng(20).standard_normal((4, 32, 64)) + 4).astype("float32")  # no zeros
    out = np.asarray(layer(x, training=True))
    kept = out != 0
    assert abs(kept.mean() - 0.7) < 0.02
    np.testing.assert_allclose(out[kept], (x / 0.7)[kept], rtol=1e-6)
    w = _upstream(x.shape, 21)
    layer = Dropout(0.3, seed=5)  # the same seed stream again
    (g_x,) = gradients(lambda x: ops.sum(layer(x, training=True) * w), [x])
    np.testing.assert_allclose(g_x, np.where(kept, w / 0.7, 0.0), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_layer_normalization_layer_matches_the_oracle(bits):
    """The forward is Keras's LayerNormalization's; the gradient is the norm
    unit's oracle at the code it kept (bits=None: Keras's own gradient)."""
    from keras_blpa.layers import LayerNormalization

    rng = _rng(22)
    x = (3.0 * rng.standard_normal((2, 9, 32)) + 1.0).astype("float32")
    layer = LayerNormalization(bits=bits, epsilon=1e-3)
    stock = keras.layers.LayerNormalization(epsilon=1e-3)
    layer.build(x.shape)
    stock.build(x.shape)
    gamma = (1 + 0.2 * rng.standard_normal(32)).astype("float32")
    beta = (0.2 * rng.standard_normal(32)).astype("float32")
    for norm in (layer, stock):
        norm.set_weights([gamma, beta])
    np.testing.assert_array_equal(np.asarray(layer(x, training=True)), np.asarray(stock(x)))
    g_y = _upstream(x.shape, 23)
    with codes.recording() as saved:
        (got,) = gradients(lambda x: ops.sum(layer(x, training=True) * g_y), [x])
    (want,) = oracle.norm_dense(x, gamma, beta, [], g_y, [], "layer", 1e-3, bits, saved[0][1])[:1]
    assert oracle.worst_error(got, want) < TOLERANCE
    if bits is None:
        (exact,) = gradients(lambda x: ops.sum(stock(x) * g_y), [x])
        assert oracle.worst_error(got, exact) < TOLERANCE


def test_layer_normalization_refuses_what_the_unit_does_not_cover():
    from keras_blpa.layers import LayerNormalization

    with pytest.raises(ValueError, match="last axis without rms_scaling"):
        LayerNormalization(axis=1)
    with pytest.raises(ValueError, match="rms_scaling"):
        LayerNormalization(rms_scaling=True)
    with pytest.raises(ValueError, match="bits=3"):
        LayerNormalization(bits=3)


@pytest.mark.parametrize("activation,bits,derivative_bits", [
    (None, None, 3), ("gelu", None, 3), (None, 8, 3), ("gelu", 8, 3), ("gelu", 4, 2),
    ("silu", 8, 1), ("relu", 8, 3), ("gelu", 8, 4)])
def test_dense_layer_matches_the_oracle(activation, bits, derivative_bits):
    """The forward is Keras's Dense's; every gradient is the oracle's from the
    codes the layer kept (bits=None: also Keras's own gradient)."""
    from keras_blpa.layers import Dense

    rng = _rng(25)
    x = rng.standard_normal((2, 9, 32)).astype("float32")
    layer = Dense(48, activation=activation, bits=bits, derivative_bits=derivative_bits)
    stock = keras.layers.Dense(48, activation=activation)
    layer.build(x.shape)
    stock.build(x.shape)
    kernel = (rng.standard_normal((32, 48)) / 6).astype("float32")
    bias = (0.1 * rng.standard_normal(48)).astype("float32")
    for dense in (layer, stock):
        dense.set_weights([kernel, bias])
    np.testing.assert_array_equal(np.asarray(layer(x, training=True)), np.asarray(stock(x)))
    g = _upstream((2, 9, 48), 26)

    def loss(dense):
        return lambda x, kernel, bias: ops.sum(
            dense.stateless_call([kernel, bias], [], x, training=True)[0] * g)

    with codes.recording() as saved:
        got = gradients(loss(layer), [x, kernel, bias])
    name = activation or "linear"
    want = oracle.dense_activation(x, kernel, bias, g, name, bits, derivative_bits,
                                   saved[0][1])
    for got_one, want_one in zip(got, want):
        assert oracle.worst_error(got_one, want_one) < TOLERANCE
    if bits is None:
        for got_one, exact in zip(got, gradients(loss(stock), [x, kernel, bias])):
            assert oracle.worst_error(got_one, exact) < TOLERANCE


def test_dense_layer_refuses_what_the_unit_does_not_cover_and_saves(tmp_path):
    from keras_blpa.layers import Dense

    with pytest.raises(ValueError, match="activation.*tanh.*keep the stock keras.layers.Dense"):
        Dense(4, activation="tanh")
    with pytest.raises(ValueError, match="bits=2"):
        Dense(4, bits=2)
    with pytest.raises(ValueError, match="derivative_bits"):
        Dense(4, activation="gelu", derivative_bits=5)
    inputs = keras.Input((4, 8))
    model = keras.Model(inputs, Dense(6, "gelu", bits=4, derivative_bits=2)(inputs))
    path = str(tmp_path / "dense.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert (type(loaded.layers[1]).__module__, loaded.layers[1].bits,
            loaded.layers[1].derivative_bits) == ("keras_blpa.layers.dense", 4, 2)
    x = _rng(27).standard_normal((2, 4, 8)).astype("float32")
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))


def test_convert_swaps_the_norms_and_dropouts_around_the_blocks(tmp_path):
    hub = pytest.importorskip("keras_hub")
    import keras_blpa

    keras.utils.set_random_seed(0)
    bert = hub.models.BertBackbone(vocabulary_size=100, num_layers=1, num_heads=2,
                                   hidden_dim=16, intermediate_dim=32, max_sequence_length=16)
    for original, names in ((bert, {"embeddings_layer_norm", "embeddings_dropout"}),
                            (_gpt2(1), {"embeddings_dropout", "layer_norm"})):
        converted, report = keras_blpa.convert(original, return_report=True)
        assert {c.layers[0] for c in report.around_blocks if c.fused} == names
        assert "norms, dropouts and Dense layers keep codes or seeds" in str(report)
        for name in names:
            assert type(converted.get_layer(name)).__module__.startswith("keras_blpa.layers")
        tokens = _tokens()
        if "segment_ids" in [i.name for i in original.inputs]:
            tokens["segment_ids"] = np.zeros_like(tokens["token_ids"])
        want, got = original(tokens), converted(tokens)
        if not isinstance(want, dict):
            want, got = {"out": want}, {"out": got}
        for key in want:
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))
        back = keras_blpa.to_standard(converted)
        assert all(type(back.get_layer(n)).__module__.startswith("keras.") for n in names)
    # Kept stock when asked, and none swapped where no block converts.
    _, report = keras_blpa.convert(_gpt2(1), keep=lambda layer: layer.name == "layer_norm",
                                   return_report=True)
    assert [c.reason for c in report.around_blocks if c.layers[0] == "layer_norm"] == [
        "kept stock (`keep`)"]
    inputs = keras.Input((4, 8))
    x = keras.layers.LayerNormalization()(keras.layers.Dropout(0.1)(inputs))
    plain = keras.Model(inputs, x)
    _, report = keras_blpa.convert(plain, return_report=True)
    assert report.around_blocks == []


def test_norm_and_dropout_layers_save_and_load(tmp_path):
    from keras_blpa.layers import Dropout, LayerNormalization

    inputs = keras.Input((4, 8))
    model = keras.Model(inputs, LayerNormalization(bits=4)(Dropout(0.2)(inputs)))
    path = str(tmp_path / "around.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert [type(layer).__name__ for layer in loaded.layers[1:]] == ["Dropout",
                                                                      "LayerNormalization"]
    assert loaded.layers[2].bits == 4
    x = _rng(24).standard_normal((2, 4, 8)).astype("float32")
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_input_surfaces_as_with_keras_hub(bad):
    """A NaN or Inf in one token's input reaches the output (the forward is
    exact), the input gradient and every kernel's gradient of a converted
    block as of KerasHub's: never a finite, silently wrong step. (A NaN's
    derivative code is bin 0, so the bias before the activation, and a
    norm's beta feeding it, can keep a finite gradient where stock's is NaN.)"""
    from transformer_tests import BLOCKS, _block_gradients, _block_pair

    for kind in sorted(BLOCKS):
        stock, blpa, x = _block_pair(kind, 8, dropout=0.1)
        x = x.copy()
        x[1, 2, 3] = bad
        mask = np.ones(x.shape[:2], bool)
        assert not np.isfinite(np.asarray(blpa(x, training=True))).all()
        weight = _upstream(x.shape, 26)
        names = [v.path for v in stock.trainable_variables] + ["inputs"]
        finite = [dict(zip(names, (bool(np.isfinite(g).all()) for g in _block_gradients(
            block, x, BLOCKS[kind][2], mask, weight, jit=False)))) for block in (stock, blpa)]
        for name, stock_finite in finite[0].items():
            if name == "inputs" or name.endswith("kernel"):
                assert finite[1][name] == stock_finite, (kind, name)
        assert not finite[1]["inputs"]
