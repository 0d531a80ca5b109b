"""Pre-activation ResNet builders: depth, parameters, stock/fused equivalence."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_blpa.layers import BNReLUConv2D, BNReLUDense
from keras_blpa.models import preact_resnet_cifar, preact_resnet_imagenet


def _copy_fused_to_stock(fused, stock):
    """Copies weights unit by unit, matching `<unit>` to `<unit>_bn/_conv/_proj`.

    As numpy copies: on JAX an assigned variable would share the other's
    buffer, which `fit` then donates."""
    by_name = {layer.name: layer for layer in stock.layers}

    def copy(target, source):
        target.assign(np.array(source))

    for layer in fused.layers:
        if isinstance(layer, (BNReLUConv2D, BNReLUDense)):
            bn = by_name[f"{layer.name}_bn"]
            for w in ("gamma", "beta", "moving_mean", "moving_variance"):
                copy(getattr(bn, w), getattr(layer, w))
            if isinstance(layer, BNReLUDense):
                dense = by_name[f"{layer.name}_dense"]
                copy(dense.kernel, layer.kernel)
                copy(dense.bias, layer.bias)
                continue
            copy(by_name[f"{layer.name}_conv"].kernel, layer.kernel)
            if layer.projection_filters:
                copy(by_name[f"{layer.name}_proj"].kernel, layer.projection_kernel)
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


@pytest.mark.parametrize("builder", ["cifar", "imagenet"])
@pytest.mark.parametrize("bits", [None, 4])
def test_stock_and_fused_give_the_same_forward(bits, builder):
    if builder == "cifar":
        build, size = (lambda **kw: preact_resnet_cifar(11, **kw)), 16
    else:
        build, size = (lambda **kw: preact_resnet_imagenet(50, width=0.125, **kw)), 64
    fused = build(bits=bits, classes=5, input_shape=(size, size, 3))
    stock = build(stock=True, classes=5, input_shape=(size, size, 3))
    assert fused.count_params() == stock.count_params()
    rng = np.random.default_rng(0)
    for w in fused.weights:  # non-trivial BN statistics
        if "moving_variance" in w.path:
            w.assign(rng.uniform(0.5, 2, w.shape).astype("float32"))
        elif "gamma" in w.path:
            w.assign(rng.normal(1, 0.5, w.shape).astype("float32"))
    _copy_fused_to_stock(fused, stock)
    x = rng.normal(size=(4, size, size, 3)).astype("float32")
    for training in (False, True):
        np.testing.assert_allclose(
            fused(x, training=training), stock(x, training=training), rtol=1e-3, atol=1e-3
        )
    if bits is None:  # exact: the gradients are stock's too
        grads, seed = [], rng.normal(size=(4, 5)).astype("float32")
        for model in (fused, stock):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(model(x, training=True) * seed)
            grads.append(tape.gradient(loss, model.trainable_variables))
        # The same multiset of gradient values (the models order weights alike
        # within a layer, their layers differently): sorted, they agree.
        flat = [np.sort(np.concatenate([np.ravel(g) for g in gs])) for gs in grads]
        assert flat[0].shape == flat[1].shape
        error = np.linalg.norm(flat[0] - flat[1]) / np.linalg.norm(flat[1])
        assert error < 1e-4  # measured: cifar 7e-7, imagenet 1.5e-5


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
@pytest.mark.parametrize("depth,limit,parts", [
    (11, 10, ["stage1", "stage2", "stage3"]),
    (20, 10, [f"stage{s}_part{p}" for s in (1, 2, 3) for p in (1, 2)]),
])
def test_nested_stages_equal_the_flat_model(stock, depth, limit, parts, monkeypatch, tmp_path):
    """Above `FLAT_LAYER_LIMIT` layers each stage is nested functional models
    of at most that many (stock) layers: the same layers, names, weights and
    outputs as the flat graph, and it saves and loads."""
    from keras_blpa.models import resnet

    kwargs = dict(classes=3, input_shape=(8, 8, 3), stock=stock)
    flat = preact_resnet_cifar(depth, **kwargs)
    monkeypatch.setattr(resnet, "FLAT_LAYER_LIMIT", limit)
    nested = preact_resnet_cifar(depth, **kwargs)
    assert [layer.name for layer in nested.layers if isinstance(layer, keras.Model)] == parts
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


def test_advertised_networks_stay_flat_or_nest_within_the_limit():
    """Depth 164 and ImageNet-152 keep their flat graphs (layer names, files);
    every graph of a deeper network, fused or stock, holds at most
    `FLAT_LAYER_LIMIT` layers in its stock form."""
    from keras_blpa.models import resnet

    assert resnet.FLAT_LAYER_LIMIT * 1.5 < 1000  # room for the caller's stack
    for stock in (False, True):
        for model in (preact_resnet_cifar(164, stock=stock),
                      preact_resnet_imagenet(152, width=0.125, stock=stock)):
            assert not any(isinstance(layer, keras.Model) for layer in model.layers)
        deep = preact_resnet_cifar(1001, classes=3, input_shape=(8, 8, 3), stock=stock)
        parts = [layer for layer in deep.layers if isinstance(layer, keras.Model)]
        assert len(parts) == 6
        per_block = 10 if stock else 4
        for part in parts:
            assert len(part.layers) <= resnet.FLAT_LAYER_LIMIT * per_block // 10 + 1


DEEP_CHILD = Path(__file__).resolve().parent / "deep_model_child.py"


def _deep(*args: str, timeout: int = 900) -> None:
    """Runs tests/deep_model_child.py in a fresh process at recursion limit 1000."""
    cmd = [sys.executable, str(DEEP_CHILD), *args]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0 and "DONE" in result.stdout, (
        f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")


def test_resnet1001_builds_saves_loads_and_converts_at_the_default_recursion_limit(tmp_path):
    """The paper's headline network, as a new user meets it: built, summarized
    and saved in one fresh process, loaded (same outputs) and given its stock
    twin in another, both at Python's default recursion limit. The second
    process imports while the first works, and loads once the first is done."""
    path = str(tmp_path / "resnet1001.keras")
    cmd = [sys.executable, str(DEEP_CHILD), "--after-stdin-line", "--load", "--path", path,
           "check", "to_standard"]
    loader = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    try:
        _deep("--depth", "1001", "--path", path, "summary", "save")
        stdout, stderr = loader.communicate("go\n", timeout=900)
    finally:
        if loader.poll() is None:
            loader.kill()
            loader.communicate()
    assert loader.returncode == 0 and "DONE" in stdout, (
        f"{' '.join(cmd)} failed:\n{stderr[-4000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["--depth", "1001", "--stock"],
    ["--depth", "1001", "--width", "4"],
    ["--depth", "1001", "--width", "4", "--stock"],
    ["--depth", "488"], ["--depth", "488", "--stock"],
    ["--depth", "254"], ["--depth", "254", "--stock"],
    ["--depth", "164", "--stock"],
    ["--builder", "imagenet", "--depth", "152", "--width", "0.125", "--stock"],
], ids=lambda a: "-".join(x.strip("-") for x in a))
def test_every_advertised_depth_builds_trains_saves_and_loads(args, tmp_path):
    """Every depth the README advertises, fused and stock, at Python's default
    recursion limit: build, summary and save in one fresh process; load, same
    outputs, fit and the fused/stock twin in another."""
    path = str(tmp_path / "deep.keras")
    _deep(*args, "--path", path, "summary", "save")
    twin = "convert" if "--stock" in args else "to_standard"
    _deep("--load", "--path", path, "check", "fit", twin)
