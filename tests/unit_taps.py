"""Each fused BN unit's input, codes and gradients inside a whole model on
TensorFlow (eager, tf.function or XLA), checked against the gradient oracle.

`install(monkeypatch)` taps every `BNReLUBase.call`: an identity with a
custom gradient on its input and on each output records the gradient that
reached the unit (`dy`) and the one it passed back (`dx`); a wrapper on
`_Codes.encode` records the codes. `traced(step, store, jit)` returns them
with the step's own results (a compiled function must return the tensors it
made), `resolve` matches them to layers, and `check_units` compares every
unit's gradients with `gradient_oracle.bn_unit_gradients` at that unit's own
input and upstream gradients, so that rounding elsewhere in the network
(which a deep, randomly initialized one amplifies) does not enter.
"""

from __future__ import annotations

import gradient_oracle as oracle
import numpy as np
import tensorflow as tf

from keras_blpa.backend.tensorflow import unit
from keras_blpa.layers.base import BNReLUBase
from keras_blpa.layers.relu_base import ReLUOnlyMixin

# float32 against float64 at one unit's own input and upstream gradients:
# measured at most 1e-6 (ResNet-11, ResNet50V2, ResNet50, MobileNetV2).
TOLERANCE = 1e-5


def _tap(tensor, store: dict, key):
    """The identity, which records the gradient that flows back through it."""

    @tf.custom_gradient
    def identity(t):
        def grad(dy):
            store[key] = dy
            return dy

        return tf.identity(t), grad

    return identity(tensor)


def install(monkeypatch) -> dict:
    """Taps every BN unit (not the ReLU units) until the test ends."""
    store = {}
    call, encode = BNReLUBase.call, unit._Codes.encode

    def tapped_call(self, inputs, training=None):
        record = store.setdefault("units", {})[self.name] = {"x": inputs, "dy": {}}
        outputs = call(self, _tap(inputs, record, "dx"), training)
        many = isinstance(outputs, (list, tuple))
        outputs = [_tap(o, record["dy"], i) for i, o in enumerate(
            outputs if many else [outputs])]
        return outputs if many else outputs[0]

    def recording(self, x32, mean, inv_std, gamma, beta):
        a, codes = encode(self, x32, mean, inv_std, gamma, beta)
        store.setdefault("codes", []).append((codes, self, gamma))
        return a, codes

    monkeypatch.setattr(BNReLUBase, "call", tapped_call)
    monkeypatch.setattr(unit._Codes, "encode", recording)
    return store


def traced(step, store: dict, jit: bool | None = None):
    """`step` returning `(its results, the tapped tensors)`; `jit=None`
    eagerly, else a tf.function (XLA-compiled if `jit`)."""

    def wrapped(*args):
        store.clear()
        result = step(*args)
        units = {name: (r["x"], r["dx"], [r["dy"][i] for i in sorted(r["dy"])])
                 for name, r in store.get("units", {}).items()}
        codes = []
        for packed, saver, gamma in store.get("codes", []):
            cap = [] if saver.cap is None else [saver.cap.kc, saver.cap.flip]
            codes.append([packed, saver.params.lo, saver.params.k, saver.params.flip,
                          gamma, *cap])
        return result, (units, codes)

    return wrapped if jit is None else tf.function(wrapped, jit_compile=jit)


def resolve(model, tapped, store: dict) -> dict:
    """`{unit name: (x, dx, dys, codes or None, params, cap, words)}`."""
    units, codes = tapped
    units = {n: (np.asarray(x), np.asarray(dx), [np.asarray(d) for d in dys])
             for n, (x, dx, dys) in units.items()}
    by_gamma = {np.asarray(model.get_layer(n).gamma).tobytes(): n for n in units}
    saved = {}
    for values, (_, saver, _) in zip(codes, store.get("codes", [])):
        packed, lo, k, flip, gamma, *cap = (np.asarray(v) for v in values)
        name = by_gamma.get(gamma.tobytes())
        if name is None:  # a ReLU unit's codes
            continue
        params = saver.params._replace(lo=lo, k=k, flip=flip)
        cap = None if saver.cap is None else saver.cap._replace(kc=cap[0], flip=cap[1])
        saved[name] = (packed, params, cap, saver.words)
    assert not saved or set(saved) == set(units), "every unit saved codes once"
    return {n: (*units[n], *saved.get(n, (None, None, None, None))) for n in units}


def bn_units(model) -> list[str]:
    return [layer.name for layer in model.layers
            if isinstance(layer, BNReLUBase) and not isinstance(layer, ReLUOnlyMixin)]


def check_units(model, grads: dict, records: dict) -> float:
    """Every tapped unit's input and weight gradients (`grads`: by variable
    path) against the oracle's at the unit's own input and upstream
    gradients: from its codes, or exact where it saved none (bits=None).
    Returns the worst relative error."""
    assert set(records) == set(bn_units(model)), "every BN unit was tapped"
    worst = 0.0
    for name, (x, dx, dys, codes, params, cap, words) in records.items():
        layer = model.get_layer(name)
        q = None if codes is None else oracle.unpack(codes, x.shape, layer.bits, words)
        expected = oracle.bn_unit_gradients(layer, x, dys, q, params, layer.bits, cap)
        actual = [dx] + [grads[w.path] for w in layer.trainable_weights]
        names = ["input"] + [w.name for w in layer.trainable_weights]
        errors = oracle.relative_errors(actual, expected)
        if "bias" in names:
            # A bias's gradient sums its output's: where that sum cancels (a
            # BN follows, whose gradient sums to zero), float32 holds it only
            # to its rounding of the sum of magnitudes.
            magnitudes = np.abs(dys[0]).sum(axis=tuple(range(dys[0].ndim - 1)))
            i = names.index("bias")
            scale = max(np.linalg.norm(expected[i]), np.linalg.norm(magnitudes))
            errors[i] = float(np.linalg.norm(actual[i] - expected[i]) / scale)
        assert max(errors) < TOLERANCE, (name, dict(zip(names, errors)))
        worst = max(worst, *errors)
    return worst
