"""Gemma's decoder block (Gemma 1 and Gemma 2 configurations) on whichever
backend Keras runs.

Collected by `tests/test_gemma.py` (TensorFlow suite) and
`tests/jax_backend/test_jax_gemma.py` (JAX suite). The block is checked
against KerasHub's own (bits=None: outputs and gradients), and at 8 and 4
bits against a float64 oracle chained through the units from the codes each
one saved (`tests/transformer_oracle.py`), with Gemma's rotary embedding
(KerasHub's rotation, then its halves interleaved) transposed here.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import transformer_oracle as oracle
from llama_tests import _rope, _rope_tables, _rope_transpose, check_forward_exact_with_dropout
from transformer_tests import _block_gradients, _rng, _upstream

from keras_blpa.transformer import codes

hub = pytest.importorskip("keras_hub")

# head_dim 16 with hidden 32 and 4 heads: KerasHub's attention scales the
# queries by 1 / sqrt(head_dim) = 1/4, not 1 / sqrt(hidden / heads).
ARGS = dict(hidden_dim=32, intermediate_dim=96, head_dim=16, num_query_heads=4,
            num_key_value_heads=2, layer_norm_epsilon=1e-6)
CONFIGS = {
    "gemma1": {},
    # Gemma 2's options: soft-capped logits (a cap the logits reach), post-norms,
    # a sliding window shorter than the sequence.
    "gemma2": dict(logit_soft_cap=2.0, use_post_attention_norm=True, use_post_ffw_norm=True,
                   use_sliding_window_attention=True, sliding_window_size=5,
                   query_head_dim_normalize=False),
}
LENGTH = 16


def _stock_class():
    from keras_hub.src.models.gemma.gemma_decoder_block import GemmaDecoderBlock

    return GemmaDecoderBlock


def _pair(config: str, bits, dropout: float = 0.0):
    """KerasHub's block and its BLPA twin with the same random weights (the
    norms' scales too: KerasHub starts them at 0), built, and an input."""
    import keras_blpa.layers as layers

    args = {**ARGS, **CONFIGS[config], "dropout": dropout}
    x = _rng(31).standard_normal((2, LENGTH, 32)).astype("float32")
    stock = _stock_class()(**args)
    stock(x)
    blpa = layers.GemmaDecoderBlock(**args, bits=bits)
    blpa(x)
    rng = _rng(32)
    stock.set_weights([(0.3 if "scale" in v.path else 0.15) * rng.standard_normal(v.shape)
                       .astype("float32") for v in stock.weights])
    blpa.set_weights(stock.get_weights())
    return stock, blpa, x


def _mask():
    mask = np.ones((2, LENGTH), bool)
    mask[1, 11:] = False
    return mask


@pytest.mark.parametrize("config,jit", [("gemma1", False), ("gemma1", True), ("gemma2", False)],
                         ids=["gemma1-eager", "gemma1-xla", "gemma2-eager"])
def test_gemma_block_at_bits_none_equals_keras_hub(config, jit):
    """Same outputs in inference and training, same gradients for the input
    and every weight (bits=None), with grouped-query attention and a padding
    mask; Gemma 2's soft cap, post-norms and sliding window."""
    stock, blpa, x = _pair(config, bits=None)
    mask = _mask()
    for training in (False, True):
        np.testing.assert_allclose(
            np.asarray(blpa(x, padding_mask=mask, training=training)),
            np.asarray(stock(x, padding_mask=mask, training=training)), rtol=1e-5, atol=1e-5)
    weight = _upstream(x.shape, 33)
    got = _block_gradients(blpa, x, "padding_mask", mask, weight, jit)
    want = _block_gradients(stock, x, "padding_mask", mask, weight, jit)
    names = [v.path for v in stock.trainable_variables] + ["inputs"]
    assert len(got) == len(want) == len(names) == (12 if config == "gemma2" else 10)
    for name, a, b in zip(names, got, want):
        assert oracle.worst_error(a, b) < 1e-5, name


def _interleave(x):
    """Gemma's layout after KerasHub's rotation: feature `j` of each half to `2j`, `2j + 1`."""
    half = x.shape[-1] // 2
    return np.stack([x[..., :half], x[..., half:]], axis=-1).reshape(x.shape)


def _interleave_transpose(g):
    return np.concatenate([g[..., 0::2], g[..., 1::2]], axis=-1)


def _oracle_gradients(stock, x, mask, weight, bits, saved, one_plus=True) -> dict:
    """Every gradient of the block from the codes its units saved, chained
    backward through the units' float64 oracles; the exact values the codes
    stand for come from KerasHub's sublayers. `one_plus=False` takes each
    norm's gamma as `scale` (not `1 + scale`): an oracle the block must fail."""
    attn = stock.attention
    eps = stock.layer_norm_epsilon
    gemma2 = stock.use_post_attention_norm
    np32 = lambda t: np.asarray(t, np.float32)  # noqa: E731
    weights = {v.path.split("/", 1)[1]: np.asarray(v, np.float64) for v in stock.weights}
    gamma = {name.split("/")[0]: weights[name] + one_plus
             for name in weights if name.endswith("/scale")}
    units = [unit for unit, _ in saved]
    expected = ["norm_linear", "attention_linear", "norm_linear", "gated_linear"]
    if gemma2:
        expected = expected[:2] + ["norm_linear"] + expected[2:] + ["norm_linear"]
    assert units == expected, units
    saved = [s for _, s in saved]

    # What each unit coded, from KerasHub's sublayers and its own mask.
    i, j = np.arange(LENGTH)[:, None], np.arange(LENGTH)[None, :]
    keep = (j <= i) & mask[:, None, :]
    if attn.use_sliding_window_attention:
        keep &= (i - j) < attn.sliding_window_size
    y1 = stock.pre_attention_norm(x)
    q, k, v = (np32(d(y1)) for d in (attn.query_dense, attn.key_dense, attn.value_dense))
    cos, sin = _rope_tables(LENGTH, q.shape[-1])
    rotate = lambda t: _interleave(_rope(t, cos, sin)).astype(np.float32)  # noqa: E731
    a = np32(attn(y1, attention_mask=keep))
    x1 = np32(x + (stock.post_attention_norm(a) if gemma2 else a))
    y2 = stock.pre_ffw_norm(x1)
    gate, up = np32(stock.gating_ffw(y2)), np32(stock.gating_ffw_2(y2))
    m = np32(stock.ffw_linear(keras.activations.gelu(gate, approximate=True) * up))
    zeros = np.zeros(32)

    g_m = weight
    grads = {}
    if gemma2:
        g_m, grads["post_ffw_norm/scale"], _ = oracle.norm_dense(
            m, gamma["post_ffw_norm"], zeros, [], weight, [], "rms", eps, bits, saved[5])
    g_gate, g_up, grads["ffw_linear/kernel"] = oracle.gated_dense(
        gate, up, weights["ffw_linear/kernel"], g_m, "gelu_tanh", bits, 3,
        saved[4 if gemma2 else 3])
    g_x1, grads["pre_ffw_norm/scale"], _, grads["ffw_gating/kernel"], \
        grads["ffw_gating_2/kernel"] = oracle.norm_dense(
            x1, gamma["pre_ffw_norm"], zeros,
            [weights["ffw_gating/kernel"], weights["ffw_gating_2/kernel"]], np.zeros(x.shape),
            [g_gate, g_up], "rms", eps, bits, saved[3 if gemma2 else 2])
    g_x1 = g_x1 + weight
    g_a = g_x1
    if gemma2:
        g_a, grads["post_attention_norm/scale"], _ = oracle.norm_dense(
            a, gamma["post_attention_norm"], zeros, [], g_x1, [], "rms", eps, bits, saved[2])
    g_qr, g_kr, g_v, grads["attention/attention_output/kernel"] = oracle.attention(
        rotate(q), rotate(k), v, keep, weights["attention/attention_output/kernel"], g_a,
        1 / np.sqrt(ARGS["head_dim"]), bits, saved[1], soft_cap=attn.logit_soft_cap)
    g_q, g_k = (_rope_transpose(_interleave_transpose(g), cos, sin) for g in (g_qr, g_kr))
    # q/k/v kernels are `[heads, hidden, head_dim]`: the oracle takes features first.
    heads_last = [np.transpose(weights[f"attention/{n}/kernel"], (1, 0, 2))
                  for n in ("query", "key", "value")]
    g_x, grads["pre_attention_norm/scale"], _, *d_qkv = oracle.norm_dense(
        x, gamma["pre_attention_norm"], zeros, heads_last, np.zeros(x.shape),
        [g_q, g_k, g_v], "rms", eps, bits, saved[0])
    for name, d in zip(("query", "key", "value"), d_qkv):
        grads[f"attention/{name}/kernel"] = np.transpose(d, (1, 0, 2))
    grads["inputs"] = g_x1 + g_x
    return grads


@pytest.mark.parametrize("config,bits", [("gemma2", 8), ("gemma2", 4), ("gemma1", 8)])
def test_gemma_block_gradient_is_the_oracle_chained_through_its_units(config, bits):
    """Every gradient of the BLPA Gemma block equals a float64 oracle that
    chains the units' oracles backward (post-FFW norm, MLP, its norm,
    post-attention norm, soft-capped attention, the rotary embedding's
    transpose, the attention norm), each from the codes that unit saved. The
    check can fail: an oracle whose norms scale by `scale`, not `1 + scale`,
    differs from the block's gradients."""
    stock, blpa, x = _pair(config, bits=bits)
    mask = _mask()
    weight = _upstream(x.shape, 34)
    with codes.recording() as saved:
        got = _block_gradients(blpa, x, "padding_mask", mask, weight, jit=False)
    want = _oracle_gradients(stock, x, mask, weight, bits, saved)
    names = [v.path.split("/", 1)[1] for v in blpa.trainable_variables] + ["inputs"]
    assert sorted(names) == sorted(want)
    for name, a in zip(names, got):
        assert oracle.worst_error(a, want[name]) < 1e-5, name

    wrong = _oracle_gradients(stock, x, mask, weight, bits, saved, one_plus=False)
    assert oracle.worst_error(got[-1], wrong["inputs"]) > 1e-2
    assert oracle.worst_error(got[names.index("pre_attention_norm/scale")],
                              wrong["pre_attention_norm/scale"]) > 1e-2


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_gemma_block_forward_is_exact_at_8_bits_with_dropout_redrawn(config):
    """At 8 bits the training forward is KerasHub's (no dropout); with
    dropout the step is finite and the inference output is KerasHub's."""
    check_forward_exact_with_dropout(lambda **options: _pair(config, bits=8, **options),
                                     "padding_mask", _mask(), 35)


def _gemma_lm(**options):
    keras.utils.set_random_seed(0)
    backbone = hub.models.GemmaBackbone(
        vocabulary_size=100, num_layers=2, num_query_heads=4, num_key_value_heads=1,
        hidden_dim=32, intermediate_dim=96, head_dim=8, **options)
    return hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def test_gemma_block_refuses_what_it_does_not_cover():
    """bits and derivative_bits are checked; a block whose norm the units do
    not take (here a LayerNormalization in an RMS norm's place) stays stock
    when convert swaps it, with the reason its report gives."""
    import keras_blpa.layers as layers
    from keras_blpa.conversion import transformers

    with pytest.raises(ValueError, match="bits=3"):
        layers.GemmaDecoderBlock(**ARGS, bits=3)
    with pytest.raises(ValueError, match="derivative_bits"):
        layers.GemmaDecoderBlock(**ARGS, derivative_bits=5)
    block, _, _ = _pair("gemma1", bits=8)
    # Past Keras's tracking (the block is built): only the check reads it.
    object.__setattr__(block, "pre_ffw_norm", keras.layers.LayerNormalization(name="pre_ffw_norm"))
    reason = transformers._swap(block, layers.GemmaDecoderBlock, 8, 3)
    assert type(block) is _stock_class()
    assert "RMS norm" in reason and "pre_ffw_norm is a LayerNormalization" in reason, reason


def test_a_converted_gemma_backbone_saves_loads_and_converts_back(tmp_path):
    """A converted Gemma 2 backbone loads converted from `.keras` with the
    same outputs; a model built with the BLPA block itself converts back to a
    stock block that runs in training (Keras read `call`'s signature when it
    built the layer: the subclass keeps KerasHub's)."""
    import keras_blpa
    import keras_blpa.layers as layers

    keras.utils.set_random_seed(0)
    backbone = hub.models.GemmaBackbone(
        vocabulary_size=100, num_layers=2, num_query_heads=4, num_key_value_heads=1,
        hidden_dim=32, intermediate_dim=96, head_dim=8, attention_logit_soft_cap=2.0,
        use_post_attention_norm=True, use_post_ffw_norm=True,
        use_sliding_window_attention=True, sliding_window_size=5)
    converted = keras_blpa.convert(backbone)
    converted.save(tmp_path / "gemma.keras")
    loaded = keras.models.load_model(tmp_path / "gemma.keras")
    assert [type(b).__module__ for b in loaded.transformer_layers] == [
        "keras_blpa.layers.gemma_decoder"] * 2
    tokens = {"token_ids": _rng(37).integers(1, 100, (2, 8)).astype("int32"),
              "padding_mask": np.ones((2, 8), bool)}
    np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(converted(tokens)))

    model = keras.Sequential([keras.Input((8, 32)), layers.GemmaDecoderBlock(**ARGS)])
    back = keras_blpa.to_standard(model)
    assert type(back.layers[0]) is _stock_class()
    x = _rng(38).standard_normal((2, 8, 32)).astype("float32")
    np.testing.assert_allclose(np.asarray(back(x, training=True)),
                               np.asarray(model(x, training=True)), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # generate and fit compile several programs
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_convert_trains_a_gemma_causal_lm_that_generates_the_same_text(config):
    """convert swaps both blocks, inference and cached greedy generation are
    KerasHub's, a training step with `fit` runs and lowers the loss, and
    to_standard swaps them back. Gemma 2: soft caps (attention and final
    logits), post-norms, a sliding window on alternate layers."""
    import keras_blpa

    options = {} if config == "gemma1" else dict(
        attention_logit_soft_cap=2.0, final_logit_soft_cap=5.0, use_post_attention_norm=True,
        use_post_ffw_norm=True, use_sliding_window_attention=True, sliding_window_size=5,
        query_head_dim_normalize=False)
    lm = _gemma_lm(**options)
    converted, report = keras_blpa.convert(lm, return_report=True)
    assert type(converted) is type(lm)
    assert [type(b).__module__ for b in converted.backbone.transformer_layers] == [
        "keras_blpa.layers.gemma_decoder"] * 2
    assert [c.fused for c in report.blocks] == [True, True], str(report)
    ids = _rng(36).integers(1, 100, (2, LENGTH)).astype("int32")
    tokens = {"token_ids": ids, "padding_mask": np.ones((2, LENGTH), bool)}
    np.testing.assert_array_equal(np.asarray(converted(tokens)), np.asarray(lm(tokens)))
    prompt = {"token_ids": ids * 0 + ids[:, :1],
              "padding_mask": (np.arange(LENGTH)[None] < 3).repeat(2, 0)}
    lm.compile(sampler="greedy")
    converted.compile(sampler="greedy")
    np.testing.assert_array_equal(converted.generate(prompt, stop_token_ids=None)["token_ids"],
                                  lm.generate(prompt, stop_token_ids=None)["token_ids"])

    converted.compile(optimizer=keras.optimizers.Adam(1e-2),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with codes.recording() as saved:
        history = converted.fit(tokens, ids, epochs=4, batch_size=2, verbose=0)
    assert saved, "the training step did not run the units"
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    back = keras_blpa.to_standard(converted)
    assert all(type(b) is _stock_class() for b in back.backbone.transformer_layers)
    np.testing.assert_array_equal(np.asarray(back(tokens)), np.asarray(converted(tokens)))
