"""`.keras` save/load round trips of models built from fused layers."""

import keras
import numpy as np
import pytest

import keras_blpa


def _model(bits, naive=False):
    inputs = keras.Input((8, 8, 3))
    h = keras_blpa.BNReLUConv2D(6, 3, bits=bits, naive=naive, use_bias=False)(inputs)
    h = keras_blpa.BNReLUConv2D(6, 3, strides=2, bits=bits, naive=naive)(h)
    outputs = keras_blpa.BNReLUDense(4, bits=bits, naive=naive, pooling="avg")(h)
    model = keras.Model(inputs, outputs)
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


@pytest.mark.parametrize("bits,naive", [(4, False), (8, True), (None, False)])
def test_save_load_predictions_and_continued_training(tmp_path, bits, naive):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 4, 16)
    model = _model(bits, naive)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    assert loaded.layers[1].bits == bits and loaded.layers[1].naive == naive
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    # Same optimizer state and statistics: training continues identically.
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, shuffle=False)
    loaded.fit(x, y, epochs=2, batch_size=8, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
