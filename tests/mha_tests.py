"""`keras_blpa.layers.MultiHeadAttention` and its conversion, on either backend.

Collected by `tests/test_multi_head_attention.py` (TensorFlow suite) and
`tests/jax_backend/test_jax_multi_head_attention.py` (JAX suite). The layer
against Keras's own (bits=None: outputs and gradients), its 8-bit gradient
against the float64 oracle of `tests/transformer_oracle.py` from the codes it
saved, save/load, refusals, and `convert` / `to_standard` of a user's
Functional model.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import transformer_oracle as oracle
from keras import ops

import keras_blpa
from keras_blpa.layers import MultiHeadAttention
from keras_blpa.transformer import codes

B, T, S = 2, 8, 5  # batch, query length, key length (cross-attention)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _case(name: str):
    """`(layer arguments, inputs, call arguments)` of a named case: inputs as
    numpy arrays, the first one the query; `value is query` for self-attention."""
    rng = _rng(1)
    x = rng.standard_normal((B, T, 32)).astype("float32")
    y = rng.standard_normal((B, S, 24)).astype("float32")
    pad = np.ones((B, T), bool)
    pad[1, 5:] = False
    if name == "causal":
        return dict(num_heads=4, key_dim=8), [x], dict(use_causal_mask=True)
    if name == "padding":  # the value's padding and an explicit attention mask
        allowed = rng.random((B, T, T)) < 0.7
        allowed[..., 0] = True
        return dict(num_heads=4, key_dim=8), [x], dict(value_mask=pad, attention_mask=allowed)
    allowed = rng.random((B, T, S)) < 0.7
    allowed[..., 0] = True
    if name == "cross":
        return dict(num_heads=4, key_dim=8), [x, y], dict(attention_mask=allowed)
    key = rng.standard_normal((B, S, 16)).astype("float32")  # "cross_key"
    # Keras's own layer fails on JAX when value_dim != key_dim
    # (jax.nn.dot_product_attention takes one head size): TensorFlow only.
    value_dim = None if keras.backend.backend() == "jax" else 12
    return (dict(num_heads=2, key_dim=8, value_dim=value_dim, output_shape=20), [x, y, key],
            dict(attention_mask=allowed))


def _call_args(inputs):
    """`layer(query, value[, key])`: self-attention passes one tensor twice."""
    return [inputs[0], *inputs] if len(inputs) == 1 else inputs


def _pair(case: str, bits, dropout: float = 0.0):
    """A stock MultiHeadAttention and its BLPA twin with the same weights."""
    kwargs, inputs, call = _case(case)
    tensors = [ops.convert_to_tensor(t) for t in inputs]
    stock = keras.layers.MultiHeadAttention(**kwargs, dropout=dropout)
    stock(*_call_args(tensors))
    blpa = MultiHeadAttention(**kwargs, dropout=dropout, bits=bits)
    blpa(*_call_args(tensors))
    blpa.set_weights(stock.get_weights())
    return stock, blpa, inputs, call


def _gradients(layer, inputs, call, weight, jit: bool) -> list[np.ndarray]:
    """Gradients of `sum(layer(...) * weight)` in training, for every trainable
    variable and then every input."""
    if keras.backend.backend() == "jax":
        import jax

        frozen = [v.value for v in layer.non_trainable_variables]

        def loss(trainable, *tensors):
            out, _ = layer.stateless_call(trainable, frozen, *_call_args(list(tensors)),
                                          training=True, **call)
            return ops.sum(out * weight)

        grad = jax.grad(loss, argnums=tuple(range(len(inputs) + 1)))
        trainable, *g_inputs = (jax.jit(grad) if jit else grad)(
            [v.value for v in layer.trainable_variables], *inputs)
        return [np.asarray(g) for g in (*trainable, *g_inputs)]
    import tensorflow as tf

    def step(*tensors):
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            out = layer(*_call_args(list(tensors)), training=True, **call)
            value = tf.reduce_sum(out * weight)
        return tape.gradient(value, [*layer.trainable_variables, *tensors])

    if jit:
        step = tf.function(step, jit_compile=True)
    return [g.numpy() for g in step(*[tf.constant(t) for t in inputs])]


def _assert_gradients_close(layer, got, want, tolerance: float, inputs: int) -> None:
    names = [v.path for v in layer.trainable_variables] + [f"input {i}" for i in range(inputs)]
    largest = max(np.abs(w).max() for w in want)
    for name, a, b in zip(names, got, want, strict=True):
        if name.endswith("key/bias"):
            # Its true gradient is 0 (softmax ignores a per-query shift): rounding only.
            assert np.abs(a - b).max() < tolerance * largest, name
        else:
            assert oracle.worst_error(a, b) < tolerance, name


CASES = ["causal", "padding", "cross", "cross_key"]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "xla"])
@pytest.mark.parametrize("case", CASES)
def test_bits_none_equals_keras_multi_head_attention(case, jit):
    """Same outputs in inference and training, same gradients for the inputs
    and every weight (masks, self- and cross-attention, eager and XLA)."""
    stock, blpa, inputs, call = _pair(case, bits=None)
    tensors = _call_args([ops.convert_to_tensor(t) for t in inputs])
    for training in (False, True):
        np.testing.assert_allclose(np.asarray(blpa(*tensors, training=training, **call)),
                                   np.asarray(stock(*tensors, training=training, **call)),
                                   rtol=1e-5, atol=1e-5)
    out_shape = stock.compute_output_shape(*[t.shape for t in tensors])
    weight = _rng(2).standard_normal(out_shape).astype("float32")
    with codes.recording() as saved:
        got = _gradients(blpa, inputs, call, weight, jit)
    if not jit:  # the units ran (eager: recorded), not Keras's code
        assert [unit for unit, _ in saved][-1] == "attention_linear"
    want = _gradients(stock, inputs, call, weight, jit)
    _assert_gradients_close(stock, got, want, 1e-5, len(inputs))


@pytest.mark.parametrize("case", ["causal", "cross"])
def test_forward_is_exact_at_8_bits(case):
    stock, blpa, inputs, call = _pair(case, bits=8)
    tensors = _call_args([ops.convert_to_tensor(t) for t in inputs])
    np.testing.assert_allclose(np.asarray(blpa(*tensors, training=True, **call)),
                               np.asarray(stock(*tensors, training=True, **call)),
                               rtol=1e-5, atol=1e-5)


def _mask(layer, inputs, call) -> np.ndarray | None:
    """The `[batch, query, key]` attention mask Keras computes for `call`."""
    query, value = inputs[0], inputs[1] if len(inputs) > 1 else inputs[0]
    mask = layer._compute_attention_mask(
        ops.convert_to_tensor(query), ops.convert_to_tensor(value),
        value_mask=call.get("value_mask"), attention_mask=call.get("attention_mask"),
        use_causal_mask=call.get("use_causal_mask", False))
    return np.broadcast_to(np.asarray(mask), (B, T, value.shape[1]))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("case", ["padding", "cross", "cross_key"])
def test_gradient_matches_the_oracle_from_the_saved_codes(case, bits):
    """The layer's gradients for its inputs and every weight equal the float64
    oracle's from the codes it saved: one row code per distinct input (the
    projections), codes of q, k and v and the mask bits (the attention)."""
    kwargs, inputs, call = _case(case)
    kwargs.pop("value_dim", None)  # the oracle's grouped-query sums assume the key's size
    layer = MultiHeadAttention(**kwargs, bits=bits)
    tensors = [ops.convert_to_tensor(t) for t in inputs]
    layer(*_call_args(tensors))
    weight = _rng(3).standard_normal(layer.compute_output_shape(
        *[t.shape for t in _call_args(tensors)])).astype("float32")
    with codes.recording() as saved:
        got = _gradients(layer, inputs, call, weight, jit=False)
    units = [unit for unit, _ in saved]
    assert units == ["activation_linear"] * len(inputs) + ["attention_linear"]

    # The attention and output projection, on the float32 q, k and v the
    # layer's own sublayers compute. `inputs`: query, value, key.
    query = tensors[0]
    value = tensors[1] if len(tensors) > 1 else query
    key = tensors[2] if len(tensors) > 2 else value
    q, k, v = (np.asarray(dense(t)) for dense, t in
               ((layer.query_dense, query), (layer.key_dense, key),
                (layer.value_dense, value)))
    out_kernel = np.asarray(layer.output_dense.kernel)
    g = weight.reshape(B, T, -1)
    g_q, g_k, g_v, d_out = oracle.attention(
        q, k, v, _mask(layer, inputs, call), out_kernel.reshape(*out_kernel.shape[:2], -1),
        g, layer._inverse_sqrt_key_dim, bits, saved[-1][1])
    g_heads = {"query": g_q, "key": g_k, "value": g_v}

    # Each distinct input's projections from its row code, in the units'
    # order (query, key, value): `(projections, index in inputs)`.
    readers = {1: [(["query", "key", "value"], 0)],
               2: [(["query"], 0), (["key", "value"], 1)],
               3: [(["query"], 0), (["key"], 2), (["value"], 1)]}[len(inputs)]
    want_inputs, want_weights = [None] * len(inputs), {}
    for (reader, index), (_, unit_saved) in zip(readers, saved[:-1], strict=True):
        x = inputs[index]
        dense = [getattr(layer, f"{name}_dense") for name in reader]
        kernels = np.concatenate([np.asarray(d.kernel).reshape(x.shape[-1], -1)
                                  for d in dense], axis=1)
        upstream = np.concatenate([g_heads[name].reshape(B, x.shape[1], -1)
                                   for name in reader], axis=-1)
        g_x, d_kernels, d_biases = oracle.activation_dense(
            x, kernels, np.zeros(kernels.shape[1]), upstream, "linear", bits, 3, unit_saved)
        want_inputs[index] = g_x
        edges = np.cumsum([0] + [int(np.prod(d.kernel.shape[1:])) for d in dense])
        for name, d, lo, hi in zip(reader, dense, edges[:-1], edges[1:]):
            want_weights[f"{name}/kernel"] = d_kernels[:, lo:hi].reshape(d.kernel.shape)
            want_weights[f"{name}/bias"] = d_biases[lo:hi].reshape(d.bias.shape)
    want_weights["attention_output/kernel"] = d_out.reshape(out_kernel.shape)
    want_weights["attention_output/bias"] = g.sum((0, 1)).reshape(layer.output_dense.bias.shape)
    want = [want_weights[v.path.split("/", 1)[1]] for v in layer.trainable_variables]
    _assert_gradients_close(layer, got, want + want_inputs, 1e-5, len(inputs))


def test_self_attention_keeps_one_code_of_its_input():
    """`layer(x, x)`: one row code of x serves the three projections, also for
    a numpy x and for a float32 x under mixed_bfloat16 (Keras converts each
    argument on its own); the same values as two tensors keep two."""
    _, blpa, inputs, call = _pair("causal", bits=8)
    x = ops.convert_to_tensor(inputs[0])
    for query, value in ((x, x), (inputs[0], inputs[0])):
        with codes.recording() as saved:
            blpa(query, value, training=True, **call)
        assert [unit for unit, _ in saved] == ["activation_linear", "attention_linear"]
    with codes.recording() as saved:
        blpa(x, ops.convert_to_tensor(inputs[0]), training=True, **call)
    assert [unit for unit, _ in saved] == ["activation_linear"] * 2 + ["attention_linear"]
    mixed = MultiHeadAttention(num_heads=2, key_dim=8, dtype="mixed_bfloat16")
    with codes.recording() as saved:
        out = mixed(x, x, training=True)
    assert [unit for unit, _ in saved] == ["activation_linear", "attention_linear"]
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"


def test_cases_the_units_do_not_cover_run_keras_code():
    """Returned attention scores and a gate run Keras's code: nothing is coded,
    and the results are Keras's."""
    stock, blpa, inputs, call = _pair("causal", bits=8)
    x = ops.convert_to_tensor(inputs[0])
    with codes.recording() as saved:
        out, scores = blpa(x, x, training=True, return_attention_scores=True, **call)
    want, want_scores = stock(x, x, training=True, return_attention_scores=True, **call)
    assert saved == []
    np.testing.assert_array_equal(np.asarray(scores), np.asarray(want_scores))
    gated = MultiHeadAttention(num_heads=2, key_dim=8, use_gate=True)
    with codes.recording() as saved:
        gated(x, x, training=True)
    assert saved == []


def test_saves_and_loads_in_a_functional_model(tmp_path):
    inputs = keras.Input((T, 32))
    attended = MultiHeadAttention(num_heads=4, key_dim=8, dropout=0.1, bits=4)(
        inputs, inputs, use_causal_mask=True)
    exact = MultiHeadAttention(num_heads=2, key_dim=8, bits=None)(attended, inputs)
    model = keras.Model(inputs, exact)
    path = str(tmp_path / "attention.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    layers = [layer for layer in loaded.layers if isinstance(layer, MultiHeadAttention)]
    assert [(type(layer), layer.bits) for layer in layers] == [
        (MultiHeadAttention, 4), (MultiHeadAttention, None)]
    x = _rng(4).standard_normal((B, T, 32)).astype("float32")
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    config = layers[0].get_config()
    assert MultiHeadAttention.from_config(config).get_config() == config


@pytest.mark.parametrize("bits", [3, 16, True, "8", 8.0])
def test_refuses_bad_bits(bits):
    with pytest.raises(ValueError, match=r"`bits` must be one of \(4, 8\) or None"):
        MultiHeadAttention(num_heads=2, key_dim=8, bits=bits)


# ---- convert / to_standard -------------------------------------------------


def _user_model(dropout: float = 0.0) -> keras.Model:
    """A pre-norm decoder layer with causal self-attention and cross-attention
    over an encoder's output, a GELU MLP, then a Dense head."""
    keras.utils.set_random_seed(0)
    tokens, memory = keras.Input((T, 16), name="tokens"), keras.Input((S, 12), name="memory")
    h = keras.layers.LayerNormalization()(tokens)
    h = keras.layers.Add()([tokens, keras.layers.MultiHeadAttention(
        2, 8, dropout=dropout, name="self_attention")(h, h, use_causal_mask=True)])
    h = keras.layers.Add()([h, keras.layers.MultiHeadAttention(
        2, 8, dropout=dropout, name="cross_attention")(h, memory)])
    mlp = keras.layers.Dense(32, activation="gelu", name="mlp_in")(h)
    h = keras.layers.Add()([h, keras.layers.Dense(16, name="mlp_out")(mlp)])
    return keras.Model([tokens, memory], keras.layers.Dense(3, name="head")(h))


def _model_inputs():
    rng = _rng(5)
    return [rng.standard_normal((B, T, 16)).astype("float32"),
            rng.standard_normal((B, S, 12)).astype("float32")]


def test_convert_swaps_attention_in_a_functional_model_and_to_standard_swaps_back():
    model = _user_model()
    converted, report = keras_blpa.convert(model, return_report=True)
    layers = {layer.name: layer for layer in converted.layers}
    assert [(type(layers[n]), layers[n].bits) for n in ("self_attention", "cross_attention")] \
        == [(MultiHeadAttention, 8)] * 2
    assert [(c.layers[0], c.fused_as) for c in report.blocks] == [
        ("self_attention", "MultiHeadAttention"), ("cross_attention", "MultiHeadAttention")]
    assert "2 of 2" in str(report)
    x = _model_inputs()
    want = np.asarray(model(x, training=False))
    np.testing.assert_array_equal(np.asarray(converted(x, training=False)), want)
    # Training: an exact forward, and the units ran (eager: recorded).
    with codes.recording() as saved:
        trained = np.asarray(converted(x, training=True))
    # The LayerNormalization in front converts too (`around_blocks`), and
    # receives `training` after its class changed.
    assert [unit for unit, _ in saved][0] == "norm_linear"
    assert [unit for unit, _ in saved if unit != "norm_linear"] == [
        "activation_linear", "attention_linear",  # self: one code of the norm's output
        "activation_linear", "activation_linear", "attention_linear",  # cross: two inputs
        "linear_activation", "linear_activation", "linear_activation"]  # MLP and head
    assert {c.layers[0]: c.fused_as for c in report.around_blocks if "mlp" in c.layers[0]} \
        == {"mlp_in": "Dense", "mlp_out": "Dense"}
    assert (layers["mlp_in"].bits, layers["mlp_in"].derivative_bits) == (8, 3)
    np.testing.assert_allclose(trained, np.asarray(model(x, training=True)), rtol=1e-5,
                               atol=1e-5)

    back = keras_blpa.to_standard(converted)
    assert {type(layer) for layer in back.layers} == {type(layer) for layer in model.layers}
    assert not any(hasattr(layer, "bits") for layer in back.layers)
    for a, b in zip(back.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for training in (False, True):
        np.testing.assert_array_equal(np.asarray(back(x, training=training)),
                                      np.asarray(model(x, training=training)))


def test_converted_model_at_bits_none_trains_as_stock():
    """transformer_bits=None: a model's gradients equal stock's (dropout 0),
    the attention's only through the units."""
    model = _user_model()
    converted = keras_blpa.convert(model, transformer_bits=None)
    x = _model_inputs()
    weight = _rng(6).standard_normal((B, T, 3)).astype("float32")

    def grads(m):
        if keras.backend.backend() == "jax":
            import jax

            frozen = [v.value for v in m.non_trainable_variables]

            def loss(trainable):
                out, _ = m.stateless_call(trainable, frozen, x, training=True)
                return ops.sum(out * weight)

            return [np.asarray(g) for g in jax.grad(loss)([v.value for v in
                                                          m.trainable_variables])]
        import tensorflow as tf

        with tf.GradientTape() as tape:
            value = tf.reduce_sum(m(x, training=True) * weight)
        return [g.numpy() for g in tape.gradient(value, m.trainable_variables)]

    with codes.recording() as saved:
        got = grads(converted)
    # self 2, cross 3, the MLP's and the head's Dense layers 3
    assert len([unit for unit, _ in saved if unit != "norm_linear"]) == 8
    _assert_gradients_close(model, got, grads(model), 1e-5, 0)
