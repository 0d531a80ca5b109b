"""Llama-style blocks (Llama, Mistral, Qwen) on whichever backend Keras runs.

Collected by `tests/test_llama.py` (TensorFlow suite) and
`tests/jax_backend/test_jax_llama.py` (JAX suite). The blocks are checked
against KerasHub's own (bits=None: outputs and gradients), and at 8 bits
against a float64 oracle chained through the four units from the codes each
one saved (`tests/transformer_oracle.py`), with the rotary embedding's
transpose computed here.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import transformer_oracle as oracle
from transformer_tests import _block_gradients, _rng, _upstream

from keras_blpa.transformer import codes

hub = pytest.importorskip("keras_hub")

KINDS = ("llama", "mistral", "qwen")
ARGS = dict(intermediate_dim=48, num_query_heads=4, num_key_value_heads=2,
            layer_norm_epsilon=1e-5)


def _stock_class(kind: str):
    from keras_hub.src.models.llama.llama_decoder import LlamaTransformerDecoder
    from keras_hub.src.models.mistral.mistral_transformer_decoder import (
        MistralTransformerDecoder,
    )
    from keras_hub.src.models.qwen.qwen_decoder import QwenTransformerDecoder

    return {"llama": LlamaTransformerDecoder, "mistral": MistralTransformerDecoder,
            "qwen": QwenTransformerDecoder}[kind]


def _pair(kind: str, bits, dropout: float = 0.0, **kwargs):
    """A KerasHub block and its BLPA twin with the same weights, built, and an input."""
    import keras_blpa.layers as layers

    args = {**ARGS, "dropout": dropout, **kwargs}
    if kind == "mistral":
        args["sliding_window"] = 6  # shorter than the sequence: a banded mask
    x = _rng(21).standard_normal((2, 16, 32)).astype("float32")
    stock = _stock_class(kind)(**args)
    stock(x)
    blpa = getattr(layers, f"{kind.capitalize()}TransformerDecoder")(**args, bits=bits)
    blpa(x)
    blpa.set_weights(stock.get_weights())
    return stock, blpa, x


def _mask():
    mask = np.ones((2, 16), bool)
    mask[1, 11:] = False
    return mask


# Under XLA once: Mistral and Qwen run the same units (their XLA compiles cost 8 s each on TF).
@pytest.mark.parametrize("kind,jit", [("llama", False), ("llama", True), ("mistral", False),
                                      ("qwen", False)], ids=["llama-eager", "llama-xla",
                                                             "mistral-eager", "qwen-eager"])
def test_llama_block_at_bits_none_equals_keras_hub(kind, jit):
    """Same outputs in inference and training, same gradients (bits=None),
    with grouped-query attention and a padding mask."""
    stock, blpa, x = _pair(kind, bits=None)
    mask = _mask()
    for training in (False, True):
        np.testing.assert_allclose(
            np.asarray(blpa(x, decoder_padding_mask=mask, training=training)),
            np.asarray(stock(x, decoder_padding_mask=mask, training=training)),
            rtol=1e-5, atol=1e-5)
    weight = _upstream(x.shape, 22)
    got = _block_gradients(blpa, x, "decoder_padding_mask", mask, weight, jit)
    want = _block_gradients(stock, x, "decoder_padding_mask", mask, weight, jit)
    names = [v.path for v in stock.trainable_variables] + ["inputs"]
    assert len(got) == len(want) == len(names) >= 10
    largest = max(np.abs(w).max() for w in want)
    for name, a, b in zip(names, got, want):
        if name.endswith("key/bias"):  # Qwen's: its true gradient is 0, rounding only
            assert np.abs(a - b).max() < 1e-5 * largest, name
        else:
            assert oracle.worst_error(a, b) < 1e-5, name


def _rope_tables(length: int, dim: int, wavelength: float = 10000.0):
    """float64 cos and sin `[length, dim]` of KerasHub's rotary embedding
    (the halves of the features rotate as pairs `(i, i + dim/2)`)."""
    inverse = wavelength ** (-np.arange(0, dim, 2) / dim)
    angles = np.arange(length)[:, None] * inverse[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles), np.sin(angles)


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def _rope_transpose(g, cos, sin):
    half = g.shape[-1] // 2
    gs = g * sin[:, None]
    return g * cos[:, None] + np.concatenate([gs[..., half:], -gs[..., :half]], axis=-1)


@pytest.mark.parametrize("bits", [8, 4])
def test_llama_block_gradient_is_the_oracle_chained_through_its_units(bits):
    """Every gradient of the BLPA Llama block (bits 8 and 4) equals a float64
    oracle that chains the units' oracles backward (MLP, its norm, attention,
    the rotary embedding's transpose, the attention norm), each from the
    codes that unit saved; the exact values the codes stand for come from
    KerasHub's own sublayers."""
    stock, blpa, x = _pair("llama", bits=bits)
    mask = _mask()
    weight = _upstream(x.shape, 23)
    with codes.recording() as saved:
        got = _block_gradients(blpa, x, "decoder_padding_mask", mask, weight, jit=False)
    units = [unit for unit, _ in saved]
    assert units == ["norm_linear", "attention_linear", "norm_linear", "gated_linear"], units
    (_, norm1), (_, attention), (_, norm2), (_, mlp) = saved

    attn = stock._self_attention_layer
    eps = stock.layer_norm_epsilon
    np32 = lambda t: np.asarray(t, np.float32)  # noqa: E731
    causal = np32(stock._compute_self_attention_mask(x, mask, None, None, None)).astype(bool)
    y1 = stock._self_attention_layernorm(x)
    q, k, v = (np32(d(y1)) for d in (attn._query_dense, attn._key_dense, attn._value_dense))
    cos, sin = _rope_tables(16, q.shape[-1])
    x1 = np32(x + attn(y1, attention_mask=causal))
    y2 = stock._feedforward_layernorm(x1)
    gate = np32(stock._feedforward_gate_dense(y2))
    up = np32(stock._feedforward_intermediate_dense(y2))
    kernel = {v.path.split("/", 1)[1]: np.asarray(v, np.float64) for v in stock.weights}

    g_gate, g_up, d_down = oracle.gated_dense(
        gate, up, kernel["feedforward_output_dense/kernel"], weight, "silu", bits, 3, mlp)
    g_x1, d_scale2, _, d_gate, d_up = oracle.norm_dense(
        x1, kernel["feedforward_layernorm/scale"], np.zeros(32), [
            kernel["feedforward_gate_dense/kernel"],
            kernel["feedforward_intermediate_dense/kernel"]],
        np.zeros(x.shape), [g_gate, g_up], "rms", eps, bits, norm2)
    g_x1 = g_x1 + weight
    g_qr, g_kr, g_v, d_out = oracle.attention(
        _rope(q, cos, sin).astype(np.float32), _rope(k, cos, sin).astype(np.float32), v,
        causal, kernel["self_attention/attention_output/kernel"], g_x1,
        attn._inv_norm_factor, bits, attention)
    g_q, g_k = (_rope_transpose(g, cos, sin) for g in (g_qr, g_kr))
    g_x, d_scale1, _, d_q, d_k, d_v = oracle.norm_dense(
        x, kernel["self_attention_layernorm/scale"], np.zeros(32),
        [kernel[f"self_attention/{n}/kernel"] for n in ("query", "key", "value")],
        np.zeros(x.shape), [g_q, g_k, g_v], "rms", eps, bits, norm1)
    want = {"self_attention/query/kernel": d_q, "self_attention/key/kernel": d_k,
            "self_attention/value/kernel": d_v, "self_attention/attention_output/kernel": d_out,
            "self_attention_layernorm/scale": d_scale1,
            "feedforward_intermediate_dense/kernel": d_up,
            "feedforward_gate_dense/kernel": d_gate,
            "feedforward_output_dense/kernel": d_down, "feedforward_layernorm/scale": d_scale2,
            "inputs": g_x1 + g_x}
    names = [v.path.split("/", 1)[1] for v in blpa.trainable_variables] + ["inputs"]
    assert sorted(names) == sorted(want)
    for name, a in zip(names, got):
        assert oracle.worst_error(a, want[name]) < 1e-5, name


@pytest.mark.parametrize("kind", KINDS)
def test_llama_block_forward_is_exact_at_8_bits_with_dropout_redrawn(kind):
    """At 8 bits the training forward is KerasHub's (no dropout); with
    dropout the step is finite and the inference output is KerasHub's."""
    check_forward_exact_with_dropout(lambda **options: _pair(kind, bits=8, **options),
                                     "decoder_padding_mask", _mask(), 24)


def check_forward_exact_with_dropout(pair, mask_argument: str, mask, seed: int) -> None:
    """`pair(dropout=...) -> (stock, blpa, x)` at 8 bits: the training forward
    without dropout is KerasHub's; with dropout the step differs from
    inference, its gradients are finite and nonzero, and inference is
    KerasHub's (shared by the Llama-style and Gemma tests)."""
    stock, blpa, x = pair()
    np.testing.assert_allclose(np.asarray(blpa(x, training=True)),
                               np.asarray(stock(x, training=True)), rtol=1e-5, atol=1e-5)
    stock, blpa, x = pair(dropout=0.2)
    out = np.asarray(blpa(x, training=True))
    assert not np.allclose(out, np.asarray(blpa(x, training=False)), atol=1e-3)
    grads = _block_gradients(blpa, x, mask_argument, mask, _upstream(x.shape, seed), jit=False)
    assert all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in grads)
    np.testing.assert_array_equal(np.asarray(blpa(x, training=False)),
                                  np.asarray(stock(x, training=False)))


def test_llama_block_refuses_what_it_does_not_cover():
    import keras_blpa.layers as layers

    with pytest.raises(ValueError, match="activation.*tanh"):
        layers.LlamaTransformerDecoder(**ARGS, activation="tanh")(np.zeros((1, 4, 32)))
    with pytest.raises(ValueError, match="bits=3"):
        layers.LlamaTransformerDecoder(**ARGS, bits=3)
    with pytest.raises(ValueError, match="derivative_bits"):
        layers.MistralTransformerDecoder(**ARGS, derivative_bits=5)
    with pytest.raises(ValueError, match="use_sliding_window_attention=True"):
        layers.QwenTransformerDecoder(**ARGS, use_sliding_window_attention=True)(
            np.zeros((1, 4, 32)))


def _llama_lm():
    keras.utils.set_random_seed(0)
    backbone = hub.models.LlamaBackbone(
        vocabulary_size=100, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=32, intermediate_dim=48)
    return hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


@pytest.mark.slow  # generate and fit compile several programs: 15 s a backend
def test_convert_trains_a_llama_causal_lm_that_generates_the_same_text():
    """convert swaps both blocks (the report no longer lists them as
    uncovered), inference and cached generation are KerasHub's, a training
    step runs and lowers the loss, and to_standard swaps them back."""
    import keras_blpa

    lm = _llama_lm()
    converted, report = keras_blpa.convert(lm, return_report=True)
    assert type(converted) is type(lm)
    assert [type(b).__module__ for b in converted.backbone.transformer_layers] == [
        "keras_blpa.layers.llama_decoder"] * 2
    assert [c.fused for c in report.blocks] == [True, True], str(report)
    ids = _rng(25).integers(1, 100, (2, 16)).astype("int32")
    tokens = {"token_ids": ids, "padding_mask": np.ones((2, 16), bool)}
    np.testing.assert_array_equal(np.asarray(converted(tokens)), np.asarray(lm(tokens)))
    prompt = {"token_ids": ids * 0 + ids[:, :1], "padding_mask": np.arange(16)[None] < 3}
    prompt["padding_mask"] = prompt["padding_mask"].repeat(2, 0)
    lm.compile(sampler="greedy")
    converted.compile(sampler="greedy")
    np.testing.assert_array_equal(converted.generate(prompt, stop_token_ids=None)["token_ids"],
                                  lm.generate(prompt, stop_token_ids=None)["token_ids"])

    converted.compile(optimizer=keras.optimizers.Adam(1e-2),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = converted.fit(tokens, ids, epochs=4, batch_size=2, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    back = keras_blpa.to_standard(converted)
    stock_class = _stock_class("llama")
    assert all(type(b) is stock_class for b in back.backbone.transformer_layers)
    np.testing.assert_array_equal(np.asarray(back(tokens)), np.asarray(converted(tokens)))
