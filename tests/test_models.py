"""Pre-activation ResNet builders: depth, parameters, stock/fused equivalence."""

import keras
import numpy as np
import pytest

from keras_blpa.layers import BNReLUConv2D, BNReLUDense
from keras_blpa.models import preact_resnet_cifar, preact_resnet_imagenet


def _copy_fused_to_stock(fused, stock):
    """Copies weights unit by unit, matching `<unit>` to `<unit>_bn/_conv/_proj`."""
    by_name = {layer.name: layer for layer in stock.layers}
    for layer in fused.layers:
        if isinstance(layer, (BNReLUConv2D, BNReLUDense)):
            bn = by_name[f"{layer.name}_bn"]
            for w in ("gamma", "beta", "moving_mean", "moving_variance"):
                getattr(bn, w).assign(getattr(layer, w))
            if isinstance(layer, BNReLUDense):
                dense = by_name[f"{layer.name}_dense"]
                dense.kernel.assign(layer.kernel)
                dense.bias.assign(layer.bias)
                continue
            by_name[f"{layer.name}_conv"].kernel.assign(layer.kernel)
            if layer.projection_filters:
                by_name[f"{layer.name}_proj"].kernel.assign(layer.projection_kernel)
        elif layer.weights:
            by_name[layer.name].set_weights(layer.get_weights())


def _units(model):
    return [layer for layer in model.layers if isinstance(layer, (BNReLUConv2D, BNReLUDense))]


@pytest.mark.parametrize("depth", [11, 29, 164])
def test_cifar_depth_counts_weighted_layers(depth):
    model = preact_resnet_cifar(depth)
    convs = sum(isinstance(u, BNReLUConv2D) for u in _units(model))
    # 9n conv units + stem + classifier = depth (projections are not counted).
    assert convs + 2 == depth


def test_resnet164_has_the_papers_parameter_count():
    params = preact_resnet_cifar(164).count_params()
    # About 1.7M trainable parameters (plus BN moving statistics).
    assert 1.65e6 < params < 1.76e6


def test_width_multiplier_scales_parameters():
    base = preact_resnet_cifar(29).count_params()
    assert 3.0 < base / preact_resnet_cifar(29, width=0.5).count_params() < 4.2
    assert 12 < preact_resnet_cifar(29, width=4).count_params() / base < 17


def test_imagenet_resnet50_parameters():
    model = preact_resnet_imagenet(50)
    assert abs(model.count_params() - 25.6e6) < 0.3e6
    assert model.output_shape == (None, 1000)


@pytest.mark.parametrize("bits", [None, 4])
def test_stock_and_fused_give_the_same_forward(bits):
    fused = preact_resnet_cifar(11, bits=bits, classes=5, input_shape=(16, 16, 3))
    stock = preact_resnet_cifar(11, stock=True, classes=5, input_shape=(16, 16, 3))
    assert fused.count_params() == stock.count_params()
    rng = np.random.default_rng(0)
    for w in fused.weights:  # non-trivial BN statistics
        if "moving_variance" in w.path:
            w.assign(rng.uniform(0.5, 2, w.shape).astype("float32"))
        elif "gamma" in w.path:
            w.assign(rng.normal(1, 0.5, w.shape).astype("float32"))
    _copy_fused_to_stock(fused, stock)
    x = rng.normal(size=(4, 16, 16, 3)).astype("float32")
    for training in (False, True):
        np.testing.assert_allclose(
            fused(x, training=training), stock(x, training=training), rtol=1e-3, atol=1e-3
        )


@pytest.mark.parametrize("builder", ["cifar", "imagenet"])
def test_short_fit_of_each_builder(builder):
    if builder == "cifar":
        model = preact_resnet_cifar(11, classes=3, input_shape=(16, 16, 3), bits=4)
    else:
        model = preact_resnet_imagenet(50, width=0.125, classes=3, input_shape=(32, 32, 3))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, *model.input_shape[1:])).astype("float32")
    history = model.fit(x, rng.integers(0, 3, 8), epochs=2, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(depth=30), "depth"), (dict(depth=164, width=0), "width"),
    (dict(depth=11, stock=True, naive=True), "naive"),
])
def test_builder_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        preact_resnet_cifar(**kwargs)


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


@pytest.mark.parametrize("stock", [False, True])
def test_nested_stages_equal_the_flat_model(stock, monkeypatch, tmp_path):
    """Above `FLAT_LAYER_LIMIT` layers each stage is a nested functional model:
    the same layers, names, weights and outputs as the flat graph, and it
    saves and loads."""
    from keras_blpa.models import resnet

    kwargs = dict(classes=3, input_shape=(8, 8, 3), stock=stock)
    flat = preact_resnet_cifar(11, **kwargs)
    monkeypatch.setattr(resnet, "FLAT_LAYER_LIMIT", 0)
    nested = preact_resnet_cifar(11, **kwargs)
    assert [layer.name for layer in nested.layers if isinstance(layer, keras.Model)] == [
        "stage1", "stage2", "stage3"]
    def names(layers):
        return {layer.name for layer in layers if not isinstance(layer, keras.layers.InputLayer)}

    assert names(flat.layers) <= names(_all_layers(nested))
    assert [w.shape for w in nested.weights] == [w.shape for w in flat.weights]
    rng = np.random.default_rng(0)
    flat.set_weights([rng.normal(1.0, 0.3, w.shape).astype("float32") for w in flat.weights])
    nested.set_weights(flat.get_weights())
    x = rng.normal(size=(4, 8, 8, 3)).astype("float32")
    for training in (False, True):
        np.testing.assert_allclose(nested(x, training=training), flat(x, training=training),
                                   rtol=1e-5, atol=1e-5)
    nested.save(tmp_path / "nested.keras")
    loaded = keras.models.load_model(tmp_path / "nested.keras")
    np.testing.assert_array_equal(loaded(x, training=False), nested(x, training=False))


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [dict(stock=True), dict(bits=4, width=4.0)])
def test_resnet1001_builds_summarizes_saves_loads_and_trains(kwargs, tmp_path):
    """The paper's headline depth, stock (nested stages) and 4x-wide BLPA,
    at the recursion limit TensorFlow sets: no RecursionError anywhere."""
    model = preact_resnet_cifar(1001, classes=3, input_shape=(8, 8, 3), **kwargs)
    lines = []
    model.summary(print_fn=lambda *a, **k: lines.append(a))
    assert lines
    model.save(tmp_path / "deep.keras")
    loaded = keras.models.load_model(tmp_path / "deep.keras")
    loaded.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 8, 3)).astype("float32")
    history = loaded.fit(x, rng.integers(0, 3, 2), epochs=1, batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
