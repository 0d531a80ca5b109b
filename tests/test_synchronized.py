"""`synchronized=True`: global batch statistics under a tf.distribute strategy.

The reference for a synchronized layer on N replicas is the same layer on one
replica, on the concatenated batch. Two logical CPU devices have to be
configured before TensorFlow initializes its devices, which the other tests
have done by then, so the MirroredStrategy runs happen in one child process
(this file run as a script) and report their errors as JSON; the tests here
assert on them.

The inputs of the layer under test are integers whose per-channel mean is an
integer (`[z, 2c - z]` stacked along the batch) and whose count per channel is
a power of two: every partial sum is exact in float32, so the batch moments of
the global batch are bit-identical however the batch is split. At 4 and 8 bits
the codes are then the same on both sides, and outputs, moving statistics and
gradients agree to float rounding (a single flipped code would show as an
error of order 1e-2, a thousand times the tolerance).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

# Relative tolerance (of the largest magnitude) for values that agree to float
# rounding: measured errors are ~1e-7 (sums in another order).
RTOL = 2e-5
# Synchronization off is at least this far from the reference (the check
# could fail: local statistics of half a batch are far from global ones).
UNSYNC_MIN_ERROR = 1e-2

PATHS = ("custom_op", "pure_tf")
KINDS = ("conv", "dense")
BITS = (None, 4, 8)


# --------------------------------------------------------------------------
# Child process: two logical CPU devices, MirroredStrategy against one replica.
# --------------------------------------------------------------------------


def _exact_moment_batch(rng, half_shape):
    """Integers `[z, 2c - z]`: the per-channel mean is the integer `c`."""
    z = rng.integers(-3, 4, size=half_shape).astype("float32")
    c = rng.integers(-2, 3, size=half_shape[-1:]).astype("float32")
    return np.concatenate([z, 2.0 * c - z[::-1]], 0)


def _randomize(layer, rng):
    """Random gamma (one channel negative), beta and bias."""
    channels = layer.gamma.shape[0]
    gamma = rng.uniform(0.5, 1.5, channels).astype("float32")
    gamma[0] = -gamma[0]
    layer.gamma.assign(gamma)
    layer.beta.assign(rng.normal(0.0, 0.5, channels).astype("float32"))
    if layer.use_bias:
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))


def _rel(a, b, floor: float = 1e-6) -> float:
    """Largest difference over the largest magnitude of `b` (at least `floor`)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), floor))


def _child_results() -> dict:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    import keras

    import keras_blpa
    from keras_blpa import ops

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    results = {"implementation": {}}

    def make(kind, bits, synchronized, rng_seed):
        if kind == "conv":
            layer = keras_blpa.BNReLUConv2D(
                5, 3, bits=bits, synchronized=synchronized, momentum=0.5
            )
            layer.build((None, 4, 4, 3))
        else:
            layer = keras_blpa.BNReLUDense(
                4, bits=bits, synchronized=synchronized, momentum=0.5
            )
            layer.build((None, 6))
        _randomize(layer, np.random.default_rng(rng_seed))
        return layer

    def step(layer, x, g):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, training=True)
            loss = tf.reduce_sum(out * g)
        g_x, *g_vars = tape.gradient(loss, [x, *layer.trainable_variables])
        return out, g_x, g_vars

    def compare(kind, bits, *, synchronized=True, data="exact", graph=True, split=None):
        rng = np.random.default_rng(7)
        if kind == "conv":
            half, split = (4, 4, 4, 3), split or 5
        else:
            half, split = (8, 6), split or 11
        if data == "exact":
            x = _exact_moment_batch(rng, half)
        else:
            x = rng.normal(0.5, 2.0, (2 * half[0], *half[1:])).astype("float32")
        out_units = 5 if kind == "conv" else 4
        g = rng.normal(size=(*x.shape[:-1], out_units)).astype("float32")

        ref = make(kind, bits, False, 1)
        with strategy.scope():
            layer = make(kind, bits, synchronized, 1)
        for variable, value in zip(layer.weights, ref.weights):
            variable.assign(value.numpy())
        run_ref = tf.function(step) if graph else step
        out_1, gx_1, gv_1 = run_ref(ref, tf.constant(x), tf.constant(g))
        # Uneven shares: replica 0 gets `split` samples, replica 1 the rest.
        bounds = [(0, split), (split, x.shape[0])]

        def shard(array):
            return strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.constant(array[slice(*bounds[ctx.replica_id_in_sync_group])])
            )

        def replicated(xs, gs):
            out, g_x, g_vars = strategy.run(lambda a, b: step(layer, a, b), args=(xs, gs))
            g_vars = [strategy.reduce("SUM", v, axis=None) for v in g_vars]
            return (
                strategy.experimental_local_results(out),
                strategy.experimental_local_results(g_x),
                g_vars,
            )

        run = tf.function(replicated) if graph else replicated
        out_2, gx_2, gv_2 = run(shard(x), shard(g))
        errors = {
            "out": _rel(np.concatenate(out_2), out_1),
            "g_x": _rel(np.concatenate(gx_2), gx_1),
            "moving_mean": _rel(layer.moving_mean.numpy(), ref.moving_mean.numpy()),
            "moving_variance": _rel(
                layer.moving_variance.numpy(), ref.moving_variance.numpy()
            ),
        }
        for var, a, b in zip(ref.trainable_variables, gv_2, gv_1):
            errors["grad_" + var.name] = _rel(a, b)
        return errors

    for path in PATHS:
        os.environ["KERAS_BLPA_DISABLE_CUSTOM_OPS"] = "1" if path == "pure_tf" else "0"
        results["implementation"][path] = ops.implementation()
        for kind in KINDS:
            for bits in BITS:
                results[f"{kind}-{bits}-{path}"] = compare(kind, bits)
    os.environ["KERAS_BLPA_DISABLE_CUSTOM_OPS"] = "0"
    results["conv-4-eager"] = compare("conv", 4, graph=False)
    results["conv-None-normal"] = compare("conv", None, data="normal")
    results["conv-None-unsynchronized"] = compare("conv", None, synchronized=False)
    results["dense-4-even-split"] = compare("dense", 4, split=8)
    results.update(_fit_results(tf, keras, keras_blpa, strategy))
    return results


def _fit_results(tf, keras, keras_blpa, strategy) -> dict:
    """`model.fit` under MirroredStrategy against one replica on the same batch."""
    rng = np.random.default_rng(3)
    x = _exact_moment_batch(rng, (4, 6, 6, 3))
    y = rng.normal(size=(8, 3)).astype("float32")

    def model(sync_conv, sync_dense):
        net = keras.Sequential(
            [
                keras.Input((6, 6, 3)),
                keras_blpa.BNReLUConv2D(4, 3, bits=4, synchronized=sync_conv, momentum=0.5),
                keras_blpa.BNReLUDense(
                    3, pooling="avg", bits=None, synchronized=sync_dense, momentum=0.5
                ),
            ]
        )
        net.compile(keras.optimizers.SGD(0.5), loss="mse")
        return net

    def fit(net):
        history = net.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        return history.history["loss"][0]

    keras.utils.set_random_seed(5)
    ref = model(False, False)
    start = [w.numpy() for w in ref.weights]
    ref_loss = fit(ref)
    results = {}
    for name, sync in (("fit-synchronized", (True, True)), ("fit-mixed", (True, False))):
        with strategy.scope():
            net = model(*sync)
        for variable, value in zip(net.weights, start):
            variable.assign(value)
        loss = fit(net)
        errors = {"loss": _rel(loss, ref_loss), "finite": bool(np.isfinite(loss))}
        for layer_index, layer in enumerate(net.layers):
            ref_layer = ref.layers[layer_index]
            for a, b in zip(layer.weights, ref_layer.weights):
                # A conv bias before BN gets a zero gradient up to rounding,
                # so weights are compared on the scale of 0.1, not their own.
                errors[f"layer{layer_index}_{a.name}"] = _rel(a.numpy(), b.numpy(), 0.1)
        results[name] = errors
    return results


# --------------------------------------------------------------------------
# Child processes: MultiWorkerMirroredStrategy, two workers on localhost.
# --------------------------------------------------------------------------

MW_GLOBAL_BATCH = 16
MW_STEPS = 3


def _multi_worker_run(mode: str, outdir: str, index: int = 0) -> None:
    """Trains a small synchronized 4-bit ResNet for `MW_STEPS` SGD steps.

    `mode="single"`: one process, the whole batch (writes the initial weights
    too); `mode="worker"`: one of two MultiWorkerMirroredStrategy workers
    (`TF_CONFIG` set by the parent), each on its half of the same batch,
    starting from the single run's initial weights.
    """
    import keras
    import tensorflow as tf

    from keras_blpa.models import preact_resnet_cifar

    strategy = (
        tf.distribute.MultiWorkerMirroredStrategy() if mode == "worker"
        else tf.distribute.get_strategy()
    )
    assert strategy.num_replicas_in_sync == (2 if mode == "worker" else 1)
    rng = np.random.default_rng(11)
    x = rng.normal(0.3, 1.5, (MW_GLOBAL_BATCH, 8, 8, 3)).astype("float32")
    y = rng.normal(size=(MW_GLOBAL_BATCH, 3)).astype("float32")
    keras.utils.set_random_seed(2)
    with strategy.scope():
        model = preact_resnet_cifar(
            11, width=0.25, classes=3, bits=4, input_shape=(8, 8, 3), synchronized=True
        )
        optimizer = keras.optimizers.SGD(0.1)
        optimizer.build(model.trainable_variables)
    initial = os.path.join(outdir, "initial.npz")
    if mode == "single":
        np.savez(initial, *model.get_weights())
    else:
        with np.load(initial) as saved:
            model.set_weights([saved[f"arr_{i}"] for i in range(len(saved.files))])

    def replica_step(xb, yb):
        with tf.GradientTape() as tape:
            pred = model(xb, training=True)
            loss = tf.reduce_sum(tf.square(pred - yb)) / float(MW_GLOBAL_BATCH * 3)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def train_step(xb, yb):
        losses = strategy.run(replica_step, args=(xb, yb))
        return strategy.reduce("SUM", losses, axis=None)

    if mode == "worker":
        half = MW_GLOBAL_BATCH // 2

        def shard(array):
            return strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.constant(
                    array[ctx.replica_id_in_sync_group * half:][:half]
                )
            )

        inputs = (shard(x), shard(y))
    else:
        inputs = (tf.constant(x), tf.constant(y))
    losses = [float(train_step(*inputs)) for _ in range(MW_STEPS)]
    if mode == "worker":
        # Multi-worker saving as Keras and TF document it: every worker
        # saves, the chief to the real path, the others to a scratch path.
        target = "model.keras" if index == 0 else f"scratch_worker{index}.keras"
        model.save(os.path.join(outdir, target))
    np.savez(
        os.path.join(outdir, f"{mode}{index}.npz"),
        losses=np.array(losses),
        **{f"w{i}": w for i, w in enumerate(model.get_weights())},
    )


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_blpa  # noqa: E402
from keras_blpa.backend.tensorflow import unit  # noqa: E402


@pytest.fixture(scope="module")
def mirrored():
    """Errors of the MirroredStrategy runs (one child process for all)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BLPA_DISABLE_CUSTOM_OPS": "0"}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_close(errors: dict, rtol: float = RTOL) -> None:
    bad = {k: v for k, v in errors.items() if isinstance(v, float) and not v <= rtol}
    assert not bad, f"relative errors above {rtol}: {bad}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", BITS, ids=["exact", "4bit", "8bit"])
@pytest.mark.parametrize("kind", KINDS)
def test_two_replicas_match_one_replica_on_the_global_batch(mirrored, kind, bits, path):
    if mirrored["implementation"][path] != path:
        pytest.skip("compiled op unavailable")
    errors = mirrored[f"{kind}-{bits}-{path}"]
    # Every quantity is compared: outputs, input gradient, each variable's
    # gradient (summed over replicas) and both moving statistics.
    assert {"out", "g_x", "moving_mean", "moving_variance"} <= errors.keys()
    assert sum(k.startswith("grad_") for k in errors) == 4
    _assert_close(errors)


def test_two_replicas_eager_and_even_split(mirrored):
    _assert_close(mirrored["conv-4-eager"])
    _assert_close(mirrored["dense-4-even-split"])


def test_two_replicas_general_inputs_within_float_tolerance(mirrored):
    # Non-integer data: the moments differ by float rounding only.
    _assert_close(mirrored["conv-None-normal"], rtol=1e-4)


def test_unsynchronized_replicas_differ_from_the_global_batch(mirrored):
    errors = mirrored["conv-None-unsynchronized"]
    for key in ("out", "g_x", "moving_mean", "moving_variance"):
        assert errors[key] > UNSYNC_MIN_ERROR, (key, errors[key])


def test_fit_under_mirrored_strategy_matches_one_replica(mirrored):
    errors = mirrored["fit-synchronized"]
    assert errors.pop("finite")
    # Loss, and every weight and moving statistic after one SGD step.
    assert len(errors) == 1 + 6 + 6
    _assert_close(errors, rtol=1e-4)


def test_mixed_synchronized_and_unsynchronized_layers(mirrored):
    errors = mirrored["fit-mixed"]
    assert errors.pop("finite")
    # The synchronized first layer sees the global batch: its moving
    # statistics are the reference's; the unsynchronized head's are not.
    assert errors["layer0_moving_mean"] <= 1e-4
    assert errors["layer0_moving_variance"] <= 1e-4
    assert errors["layer1_moving_variance"] > UNSYNC_MIN_ERROR


# In-process tests: no strategy, or a stand-in replica context.


def _pair(kind, bits, seed=0, **kwargs):
    """An unsynchronized and a synchronized layer with the same weights."""
    layers = []
    for synchronized in (False, True):
        options = dict(bits=bits, synchronized=synchronized, **kwargs)
        if kind == "conv":
            layer = keras_blpa.BNReLUConv2D(4, 3, **options)
            layer.build((None, 5, 5, 3))
        else:
            layer = keras_blpa.BNReLUDense(4, **options)
            layer.build((None, 6))
        _randomize(layer, np.random.default_rng(seed))
        layers.append(layer)
    for variable, value in zip(layers[1].weights, layers[0].weights):
        variable.assign(value)
    return layers


def _train_step(layer, x, g):
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = layer(x, training=True)
        loss = tf.reduce_sum(out * g)
    return [out, *tape.gradient(loss, [x, *layer.trainable_variables])]


@pytest.mark.parametrize("mode", ["eager", "graph", "jit"])
@pytest.mark.parametrize("bits", [None, 4])
def test_synchronized_without_strategy_is_unsynchronized(implementation, bits, mode):
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(0.3, 1.5, (4, 5, 5, 3)).astype("float32"))
    g = tf.constant(rng.normal(size=(4, 5, 5, 4)).astype("float32"))
    results = []
    for layer in _pair("conv", bits):
        if mode == "eager":
            step = _train_step
        else:
            step = tf.function(_train_step, jit_compile=mode == "jit")
        results.append([t.numpy() for t in step(layer, x, g)])
        results[-1] += [layer.moving_mean.numpy(), layer.moving_variance.numpy()]
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


class _TwinReplicas:
    """A stand-in replica context: two replicas holding identical shards.

    Its all-reduce doubles the local value, which is exactly what two real
    replicas with the same data would return. It runs where a real strategy
    cannot: XLA with two logical CPU devices fails in TensorFlow itself (the
    XLA:CPU cluster cannot reach the second device's resources).
    """

    num_replicas_in_sync = 2
    strategy = None

    def all_reduce(self, reduce_op, value):
        assert reduce_op == tf.distribute.ReduceOp.SUM
        return value * 2.0


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "jit"])
@pytest.mark.parametrize(
    "bits, naive, slope, cap",
    [(None, False, 0.0, None), (4, False, 0.0, None), (8, False, 0.0, None),
     (4, True, 0.0, None), (None, False, 0.2, None), (4, False, 0.2, None),
     (4, False, 0.0, 1.5), (None, False, 0.0, 6.0)],
    ids=["exact", "4bit", "8bit", "naive4", "exact-leaky", "4bit-leaky", "4bit-capped",
         "exact-relu6"],
)
@pytest.mark.parametrize("kind", KINDS)
def test_synchronized_unit_under_xla_matches_doubled_batch(
    monkeypatch, implementation, kind, bits, naive, slope, cap, jit
):
    """The synchronized code under jit_compile=True (pure-TF route) against one
    replica on the batch stacked twice: a wrong count or unsummed backward
    sums would change the input gradient by a factor of two."""
    ref, layer = _pair(kind, bits, seed=2, naive=naive, negative_slope=slope, max_value=cap)
    twins = _TwinReplicas()
    monkeypatch.setattr(unit, "_sync_context", lambda sync: twins if sync else None)
    rng = np.random.default_rng(4)
    shape = (4, 5, 5, 3) if kind == "conv" else (8, 6)
    x = rng.normal(0.3, 1.5, shape).astype("float32")
    g = rng.normal(size=(*shape[:-1], 4)).astype("float32")
    doubled = [tf.constant(np.concatenate([t, t])) for t in (x, g)]
    out_1, gx_1, *gv_1 = tf.function(_train_step)(ref, *doubled)
    out_2, gx_2, *gv_2 = tf.function(_train_step, jit_compile=jit)(
        layer, tf.constant(x), tf.constant(g)
    )
    n = shape[0]
    np.testing.assert_allclose(out_2, out_1[:n], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx_2, gx_1[:n], rtol=1e-4, atol=1e-5)
    # One replica's variable gradients: half of the doubled batch's.
    for a, b in zip(gv_2, gv_1):
        np.testing.assert_allclose(2.0 * a.numpy(), b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.moving_mean, ref.moving_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        layer.moving_variance, ref.moving_variance, rtol=1e-5, atol=1e-6
    )


def test_synchronized_mixed_precision_matches_doubled_batch(monkeypatch, implementation):
    """float16 compute: statistics and the BN backward stay float32."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    ref, layer = _pair("conv", 4, seed=3)
    twins = _TwinReplicas()
    monkeypatch.setattr(unit, "_sync_context", lambda sync: twins if sync else None)
    rng = np.random.default_rng(5)
    x = rng.normal(0.3, 1.5, (4, 5, 5, 3)).astype("float16")
    g = rng.normal(size=(4, 5, 5, 4)).astype("float16")
    out_1, gx_1, *gv_1 = tf.function(_train_step)(
        ref, *[tf.constant(np.concatenate([t, t])) for t in (x, g)]
    )
    out_2, gx_2, *gv_2 = tf.function(_train_step)(layer, tf.constant(x), tf.constant(g))
    assert out_2.dtype == tf.float16 and gx_2.dtype == tf.float16
    np.testing.assert_allclose(np.float32(out_2), np.float32(out_1[:4]), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(np.float32(gx_2), np.float32(gx_1[:4]), rtol=1e-2, atol=1e-2)
    for a, b in zip(gv_2, gv_1):
        np.testing.assert_allclose(
            2.0 * np.float32(a), np.float32(b), rtol=1e-2, atol=2e-2
        )
    np.testing.assert_allclose(layer.moving_mean, ref.moving_mean, rtol=1e-5, atol=1e-6)


def test_strategy_without_all_reduce_is_named():
    class NoAllReduce(_TwinReplicas):
        strategy = type("SomeStrategy", (), {})()

        def all_reduce(self, reduce_op, value):
            raise NotImplementedError("no all-reduce here")

    with pytest.raises(ValueError, match="SomeStrategy cannot all-reduce"):
        unit._all_reduce_sum(NoAllReduce(), tf.ones([2]), "layer")


@pytest.mark.parametrize("value", ["yes", 2, None, 1.0])
def test_bad_synchronized_argument(value):
    with pytest.raises(ValueError, match="`synchronized`"):
        keras_blpa.BNReLUConv2D(4, 3, synchronized=value)
    with pytest.raises(ValueError, match="`synchronized`"):
        keras_blpa.BNReLUDense(4, synchronized=value)


def test_config_and_saving_round_trip(tmp_path):
    conv = keras_blpa.BNReLUConv2D(4, 3, synchronized=True)
    dense = keras_blpa.BNReLUDense(3, pooling="avg", bits=8, synchronized=False)
    assert conv.get_config()["synchronized"] is True
    assert keras_blpa.BNReLUConv2D.from_config(conv.get_config()).synchronized is True
    # Configs saved before the option existed load unsynchronized.
    legacy = conv.get_config()
    del legacy["synchronized"]
    assert keras_blpa.BNReLUConv2D.from_config(legacy).synchronized is False

    model = keras.Sequential([keras.Input((6, 6, 3)), conv, dense])
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    path = tmp_path / "sync.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert [layer.synchronized for layer in loaded.layers] == [True, False]
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("stock", [False, True])
def test_resnet_builders_pass_synchronized_through(stock):
    from keras_blpa.models import preact_resnet_cifar, preact_resnet_imagenet

    def bn_flags(model):
        bn_types = (keras.layers.BatchNormalization, keras_blpa.BNReLUConv2D,
                    keras_blpa.BNReLUDense)
        return [layer.synchronized for layer in model.layers if isinstance(layer, bn_types)]

    flags = bn_flags(preact_resnet_cifar(11, bits=4, stock=stock, synchronized=True))
    assert len(flags) >= 4 and all(flags)
    assert not any(bn_flags(preact_resnet_cifar(11, bits=4, stock=stock)))
    imagenet = preact_resnet_imagenet(
        50, width=0.125, classes=3, input_shape=(32, 32, 3), stock=stock, synchronized=True
    )
    assert all(bn_flags(imagenet)) and imagenet.get_layer("stem_bn").synchronized
    with pytest.raises(ValueError, match="`synchronized`"):
        preact_resnet_cifar(11, synchronized="yes")


def _memory_slopes(bits: int | None) -> dict:
    """Peak training-step memory per unit (MiB), unsynchronized and synchronized.

    The growth of the peak from a 2-unit to an 18-unit stack of
    BN -> ReLU -> 3x3 conv units (input 2 MiB each), divided by 16: what each
    unit keeps from the forward into the backward pass. The synchronized
    stack runs with the two-replica stand-in context.
    """
    import tensorflow as tf

    import keras_blpa

    def peak(depth: int, synchronized: bool) -> float:
        with tf.device("CPU:0"):  # the probe reads CPU:0's allocator, also beside a GPU
            return _peak(depth, synchronized)

    def _peak(depth: int, synchronized: bool) -> float:
        layers = [
            keras_blpa.BNReLUConv2D(32, 3, bits=bits, synchronized=synchronized, use_bias=False)
            for _ in range(depth)
        ]
        x = tf.random.normal((16, 32, 32, 32))
        for layer in layers:
            layer.build(x.shape)
        variables = [v for layer in layers for v in layer.trainable_variables]

        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                h = x
                for layer in layers:
                    h = layer(h, training=True)
                loss = tf.reduce_sum(h)
            return tape.gradient(loss, variables)

        del step(x)[:]
        peaks = []
        for _ in range(2):
            tf.config.experimental.reset_memory_stats("CPU:0")
            base = tf.config.experimental.get_memory_info("CPU:0")["current"]
            del step(x)[:]
            peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] - base)
        return min(peaks) / 2**20

    twins = _TwinReplicas()
    unit._sync_context = lambda sync: twins if sync else None
    results = {}
    for synchronized in (False, True):
        low, high = peak(2, synchronized), peak(18, synchronized)
        results["synchronized" if synchronized else "unsynchronized"] = (high - low) / 16
        results[("synchronized" if synchronized else "unsynchronized") + "_peak2"] = low
    return results


def _free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("localhost", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.mark.slow
def test_multi_worker_mirrored_two_processes_match_one_process(tmp_path):
    """Two MultiWorkerMirroredStrategy workers (localhost, TF_CONFIG) train a
    synchronized 4-bit ResNet on halves of a batch: losses and weights after
    three SGD steps match one process on the whole batch."""
    script = os.path.abspath(__file__)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("TF_CONFIG", None)
    single = subprocess.run(
        [sys.executable, script, "--single", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert single.returncode == 0, single.stderr[-4000:]
    hosts = [f"localhost:{port}" for port in _free_ports(2)]
    workers = []
    for index in range(2):
        tf_config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
        workers.append(
            subprocess.Popen(
                [sys.executable, script, "--worker", str(index), str(tmp_path)],
                env={**env, "TF_CONFIG": json.dumps(tf_config)},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        )
    errors = []
    for worker in workers:
        try:
            _, stderr = worker.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            worker.kill()
            _, stderr = worker.communicate()
        errors.append(stderr[-3000:])
    assert [w.returncode for w in workers] == [0, 0], "\n".join(errors)

    with np.load(tmp_path / "single0.npz") as ref, \
            np.load(tmp_path / "worker0.npz") as chief, \
            np.load(tmp_path / "worker1.npz") as other:
        # Both workers hold the same (mirrored) weights.
        for key in chief.files:
            np.testing.assert_array_equal(chief[key], other[key])
        np.testing.assert_allclose(chief["losses"], ref["losses"], rtol=1e-5)
        weights = [key for key in ref.files if key != "losses"]
        assert len(weights) > 20
        for key in weights:
            assert _rel(chief[key], ref[key], 0.1) < 1e-4, key
        # The chief's saved model loads in one process, with its weights,
        # its moving statistics and synchronized layers.
        loaded = keras.saving.load_model(tmp_path / "model.keras")
        for i, value in enumerate(loaded.get_weights()):
            np.testing.assert_array_equal(value, chief[f"w{i}"])
        fused = [layer for layer in loaded.layers if hasattr(layer, "bits")]
        assert fused and all(layer.synchronized for layer in fused)
        # The weights moved: the comparison is not of initial values.
        with np.load(tmp_path / "initial.npz") as initial:
            moved = [_rel(ref[f"w{i}"], initial[f"arr_{i}"], 0.1) for i in range(len(weights))]
        assert max(moved) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, None], ids=["4bit", "exact"])
def test_synchronized_units_keep_what_unsynchronized_units_keep(bits):
    """Memory per replica: the saved state per unit is unchanged (the backward's
    plain-TF BN gradient adds a transient of about one unit input, 2 MiB)."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--memory", str(bits)],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    slopes = json.loads(proc.stdout.strip().splitlines()[-1])
    print("MiB per unit:", slopes)
    # 4-bit codes of a 2 MiB input are 0.25 MiB; exact keeps 2 MiB.
    assert slopes["unsynchronized"] < (0.5 if bits else 2.2)
    assert slopes["synchronized"] <= slopes["unsynchronized"] + 0.1
    assert slopes["synchronized_peak2"] <= slopes["unsynchronized_peak2"] + 3.0


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        print(json.dumps(_child_results()))
    elif sys.argv[1] == "--single":
        _multi_worker_run("single", sys.argv[2])
    elif sys.argv[1] == "--memory":
        print(json.dumps(_memory_slopes(None if sys.argv[2] == "None" else int(sys.argv[2]))))
    elif sys.argv[1] == "--worker":
        _multi_worker_run("worker", sys.argv[3], int(sys.argv[2]))
