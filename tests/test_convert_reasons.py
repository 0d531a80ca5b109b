"""`convert` leaves a chain stock for each documented reason, and says which;
its `window` and `naive` options reach the fused layers."""

import keras
import numpy as np
import pytest
from keras import layers as L

import keras_blpa


def _chain_model(tweak=None, dense=False):
    """Conv -> BN -> ReLU -> Conv2D (or Dense on a 2-D input), with `tweak`
    applied to `{"bn", "relu", "linear"}` before the graph is built."""
    parts = {
        "bn": L.BatchNormalization(name="bn"),
        "relu": L.ReLU(name="relu"),
        "linear": L.Dense(4, name="linear") if dense else L.Conv2D(4, 3, name="linear"),
    }
    if tweak:
        tweak(parts)
    inputs = keras.Input((12,) if dense else (8, 8, 3))
    stem = L.Dense(6, name="stem") if dense else L.Conv2D(6, 3, name="stem")
    out = parts["linear"](parts["relu"](parts["bn"](stem(inputs))))
    return keras.Model(inputs, out)


def _left_reason(model, **kwargs) -> str:
    _, report = keras_blpa.convert(model, return_report=True, **kwargs)
    chains = [c for c in report.chains if "bn" in c.layers]
    assert len(chains) == 1 and not chains[0].fused, report
    return chains[0].reason


def test_the_plain_chain_fuses():
    _, report = keras_blpa.convert(_chain_model(), return_report=True)
    assert [c.fused_as for c in report.chains] == ["linear"]


def _set(name, **attributes):
    def tweak(parts):
        for key, value in attributes.items():
            setattr(parts[name], key, value)
    return tweak


def _replace(name, layer):
    def tweak(parts):
        parts[name] = layer
    return tweak


def _lora(parts):
    parts["linear"].build((None, 6, 6, 6))
    parts["linear"].enable_lora(2)


def _quantized(parts):
    parts["linear"].build((None, 6))
    parts["linear"].quantize("int8")


CASES = {
    "keep": (None, False, dict(keep="linear"), "kept stock by `keep`"),
    "bn_axis": (_replace("bn", L.BatchNormalization(axis=1, name="bn")), False, {},
                "normalizes axis 1"),
    "trainable": (_set("bn", trainable=False), False, {}, "differ in `trainable`"),
    "dtype": (_replace("linear", L.Conv2D(4, 3, name="linear", dtype="mixed_float16")),
              False, {}, "different dtype policies"),
    "lora": (_lora, False, {}, "has LoRA enabled"),
    "quantized": (_quantized, True, {}, "is quantized"),
    "activity_regularizer": (
        _replace("bn", L.BatchNormalization(name="bn", activity_regularizer="l2")),
        False, {}, "bn has an activity_regularizer"),
    "swish": (_replace("relu", L.Activation("swish", name="relu")), False, {},
              "the activation is"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_reason_to_leave_a_chain_stock_is_reported(case):
    tweak, dense, kwargs, reason = CASES[case]
    model = _chain_model(tweak, dense)
    assert reason in _left_reason(model, **kwargs)
    # What stays stock computes what it did.
    x = np.random.default_rng(0).normal(size=(2, *model.input_shape[1:])).astype("float32")
    converted = keras_blpa.convert(model, **kwargs)
    np.testing.assert_allclose(converted(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_relu_output_that_is_the_models_output_stays_stock():
    inputs = keras.Input((8, 8, 3))
    a = L.ReLU(name="relu")(L.BatchNormalization(name="bn")(L.Conv2D(6, 3)(inputs)))
    model = keras.Model(inputs, [L.Conv2D(4, 3, name="linear")(a), a])
    assert "the ReLU output is also the model's output" in _left_reason(model)


def test_a_shared_linear_layer_stays_stock():
    inputs = keras.Input((8, 8, 6))
    conv = L.Conv2D(6, 3, padding="same", name="linear")
    a = L.ReLU(name="relu")(L.BatchNormalization(name="bn")(inputs))
    model = keras.Model(inputs, conv(conv(a)))
    assert "is shared" in _left_reason(model)


def test_window_and_naive_reach_the_fused_layers():
    model = _chain_model()
    converted = keras_blpa.convert(model, bits=8, window=7.0)
    (fused,) = [layer for layer in converted.layers if isinstance(layer, keras_blpa.BNReLUConv2D)]
    assert fused.window == 7.0 and fused.bits == 8 and not fused.naive
    naive = keras_blpa.convert(model, bits=4, naive=True)
    (fused,) = [layer for layer in naive.layers if isinstance(layer, keras_blpa.BNReLUConv2D)]
    assert fused.naive and fused.bits == 4
    # A naive model's inference quantizes: it differs from the original's.
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype("float32")
    assert not np.allclose(naive(x, training=False), model(x, training=False), atol=1e-4)
    with pytest.raises(ValueError, match="window"):
        keras_blpa.convert(model, bits=4, window=-1.0)


@keras.saving.register_keras_serializable("test_convert_reasons")
class Block(L.Layer):
    """A custom layer holding BN -> ReLU -> Conv2D (as KerasHub's MobileNet
    blocks do), which renames itself when rebuilt from its config."""

    def __init__(self, name=None, **kwargs):
        super().__init__(name=f"{name}_0" if name else None, **kwargs)
        self.bn, self.relu, self.conv = L.BatchNormalization(), L.ReLU(), L.Conv2D(4, 1)

    def call(self, x):
        return self.conv(self.relu(self.bn(x)))


def test_chains_inside_custom_layers_and_operations_are_reported():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, name="stem")(inputs)
    x = Block(name="block")(x)
    a = L.ReLU(name="relu")(L.BatchNormalization(name="bn")(x))
    left, right = keras.ops.split(a, 2, axis=-1)  # an operation reads the ReLU output
    model = keras.Model(inputs, L.Conv2D(2, 1)(left) + right)
    assert model.get_layer("block_0").name == "block_0"
    converted, report = keras_blpa.convert(model, bits=4, return_report=True)
    reasons = {c.layers[0]: c.reason for c in report.left}
    assert "1 BatchNormalization layer inside the custom layer block_0 (Block)" in reasons[
        "block_0"]
    assert "split" in reasons["bn"] and "(Split)" in reasons["bn"]
    # The custom layer renames itself on the rebuild; its weights still carry over.
    assert "block_0_0" in [layer.name for layer in converted.layers]
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_array_equal(converted(x), model(x))
