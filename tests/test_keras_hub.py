"""KerasHub models (Functional subclasses) through convert and to_standard:
backbones, a backbone inside a user's model, and a task with its
preprocessor, fit, save and load. Random weights from configs (offline)."""

import keras
import keras_hub
import numpy as np
import pytest

import keras_blpa
from keras_blpa.layers.base import BNReLUBase

L = keras.layers
SIZE = 32


def resnet(pre_activation: bool, block_type: str = "bottleneck_block"):
    """A small ResNet backbone (two stages) with non-trivial BN parameters."""
    keras.utils.set_random_seed(0)
    model = keras_hub.models.ResNetBackbone(
        input_conv_filters=[32], input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 32], stackwise_num_blocks=[2, 2],
        stackwise_num_strides=[1, 2], block_type=block_type,
        use_pre_activation=pre_activation, image_shape=(SIZE, SIZE, 3),
    )
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.gamma.assign(rng.normal(1.0, 0.3, n).astype("float32"))
            layer.beta.assign(rng.normal(0.0, 0.3, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
    return model


def _images(n=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, SIZE, SIZE, 3)).astype("float32")


def _weights(model):
    return sorted((tuple(w.shape), np.asarray(w).tobytes()) for w in model.weights)


@pytest.mark.parametrize("pre_activation", [False, True], ids=["v1", "v2"])
def test_backbone_converts_as_a_plain_functional_model(pre_activation):
    backbone = resnet(pre_activation)
    converted, report = keras_blpa.convert(backbone, bits=4, return_report=True)
    # What the result is, and what it does not keep, in the report.
    assert type(converted) is keras.Model or type(converted).__name__ == "Functional"
    assert not isinstance(converted, keras_hub.models.Backbone)
    text = str(report)
    assert "ResNetBackbone (a Functional subclass)" in text and "not kept" in text
    assert len(report.fused) >= 8 and sum(
        isinstance(layer, BNReLUBase) for layer in converted.layers) == len(report.fused)
    x = _images()
    np.testing.assert_allclose(converted(x), backbone(x), rtol=1e-5, atol=1e-5)
    back = keras_blpa.to_standard(converted)
    assert not any(isinstance(layer, BNReLUBase) for layer in back.layers)
    assert _weights(back) == _weights(backbone)
    np.testing.assert_array_equal(back(x), backbone(x))
    np.testing.assert_allclose(converted(x, training=True), backbone(x, training=True),
                               rtol=1e-4, atol=1e-4)


def test_backbone_inside_a_users_model():
    backbone = resnet(pre_activation=True)
    inputs = keras.Input((SIZE, SIZE, 3))
    outputs = L.Dense(10)(L.GlobalAveragePooling2D()(backbone(inputs)))
    model = keras.Model(inputs, outputs)
    converted, report = keras_blpa.convert(model, bits=4, return_report=True)
    assert report.fused and {c.model for c in report.fused} == {backbone.name}
    assert "ResNetBackbone (a Functional subclass)" in str(report)
    x = _images()
    np.testing.assert_allclose(converted(x), model(x), rtol=1e-5, atol=1e-5)


def _task(backbone):
    preprocessor = keras_hub.models.ResNetImageClassifierPreprocessor(
        image_converter=keras_hub.layers.ResNetImageConverter(
            image_size=(SIZE, SIZE), scale=1 / 127.5, offset=-1.0))
    keras.utils.set_random_seed(1)
    return keras_hub.models.ResNetImageClassifier(backbone=backbone, num_classes=5,
                                                  preprocessor=preprocessor)


def test_task_keeps_its_class_preprocessor_fit_and_saving(tmp_path):
    task = _task(resnet(pre_activation=True))
    converted, report = keras_blpa.convert(task, bits=None, return_report=True)
    assert type(converted) is type(task) and converted.preprocessor is task.preprocessor
    assert "ResNetImageClassifier (a task)" in str(report)
    assert any(isinstance(layer, BNReLUBase) for layer in converted.backbone.layers)
    raw = np.random.default_rng(2).uniform(0, 255, (8, SIZE, SIZE, 3)).astype("float32")
    labels = np.arange(8) % 5
    np.testing.assert_allclose(converted.predict(raw, verbose=0), task.predict(raw, verbose=0),
                               rtol=1e-5, atol=1e-5)
    # fit runs the preprocessor: bits=None trains as the original does, step
    # for step (on unscaled images the first step would differ).
    for model in (task, converted):
        model.compile(optimizer=keras.optimizers.SGD(0.01),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(raw, labels, batch_size=8, epochs=1, shuffle=False, verbose=0)
    head = task.get_layer("predictions").kernel
    np.testing.assert_allclose(converted.get_layer("predictions").kernel, head,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(converted.predict(raw, verbose=0), task.predict(raw, verbose=0),
                               rtol=1e-4, atol=1e-4)
    path = str(tmp_path / "task.keras")
    converted.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is type(task)
    assert any(isinstance(layer, BNReLUBase) for layer in loaded.backbone.layers)
    np.testing.assert_allclose(loaded.predict(raw, verbose=0),
                               converted.predict(raw, verbose=0), rtol=1e-6, atol=1e-6)
    back = keras_blpa.to_standard(loaded)
    assert type(back) is type(task) and not any(
        isinstance(layer, BNReLUBase) for layer in back.backbone.layers)
    np.testing.assert_allclose(back.predict(raw, verbose=0), task.predict(raw, verbose=0),
                               rtol=1e-5, atol=1e-5)


def test_truly_subclassed_models_keep_the_clear_error():
    class Net(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.bn = L.BatchNormalization()

        def call(self, x):
            return self.bn(x)

    with pytest.raises(ValueError, match=r"subclassed keras\.Model \(Net\)"):
        keras_blpa.convert(Net())
    # Nested inside a Functional model: left as is, the report names it.
    inner = Net()
    inputs = keras.Input((4,))
    model = keras.Model(inputs, L.Dense(2)(L.ReLU()(inner(inputs))))
    _, report = keras_blpa.convert(model, return_report=True)
    [chain] = [c for c in report.left if inner.name in c.layers]
    assert "nested model left as is" in chain.reason and inner.name in chain.reason
