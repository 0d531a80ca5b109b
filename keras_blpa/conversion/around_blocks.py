"""The layers around converted transformer blocks: how `convert` swaps them.

A transformer model keeps some activations outside its blocks: KerasHub's
BERT normalizes and drops out its embeddings (`embeddings_layer_norm`,
`embeddings_dropout`), GPT-2 drops out its embeddings and normalizes the
last block's output (`layer_norm`). Stock, each keeps a full-size tensor (a
norm its float input, a dropout its mask; on JAX, XLA keeps the dropout's
random bits, 8 bytes an element), and a user's own MLP beside a converted
`MultiHeadAttention` (`Dense(4h, "gelu") -> Dense(h)`) keeps its inputs and
pre-activation. Once a model's blocks convert, every stock
`keras.layers.LayerNormalization` (over the last axis), `keras.layers.Dropout`
and `keras.layers.Dense` (linear, GELU, SiLU or ReLU) outside the blocks
becomes `keras_blpa.layers`' subclass of the same weights and config: the
norm keeps a row code of its normalized input, the dropout only its seed,
the Dense a row code of its input and a derivative code of its
pre-activation. `to_standard` swaps them back.
"""

from __future__ import annotations

import inspect

import keras

from keras_blpa.conversion.report import Chain, ConversionReport


def retype(layer, cls) -> None:
    """Makes `layer` a `cls` in place. Keras notes at construction which
    context arguments (`training`) the class's `call` accepts and passes only
    those: refreshed here for the new `call` (Keras's attribute names; a
    stock norm's `call` takes no `training`, the BLPA norm's does)."""
    layer.__class__ = cls
    signature = inspect.signature(layer.call)
    names = list(signature.parameters)
    layer._call_signature = signature
    layer.call_signature_parameters = names
    layer._call_has_training_arg = "training" in names
    layer._call_has_mask_arg = "mask" in names
    layer._call_has_context_arg = {arg: arg in names
                                   for arg in getattr(layer, "_call_context_args", ())}


def pairs() -> list:
    from keras_blpa.layers.dense import Dense
    from keras_blpa.layers.dropout import Dropout
    from keras_blpa.layers.layer_normalization import LayerNormalization

    return [(keras.layers.LayerNormalization, LayerNormalization),
            (keras.layers.Dropout, Dropout), (keras.layers.Dense, Dense)]


def convert_around(layers: list, bits: int | None, derivative_bits: int, keep,
                   report: ConversionReport, path: str = "") -> None:
    """Swaps, in place, the stock norms, dropouts and Dense layers among
    `layers` (those of a model outside its blocks) and lists each in
    `report.around_blocks`."""
    from keras_blpa.layers.dense import Dense, check_dense
    from keras_blpa.layers.layer_normalization import LayerNormalization, check_norm

    checks = {LayerNormalization: check_norm, Dense: check_dense}
    for layer in layers:
        target = next((blpa for stock, blpa in pairs() if type(layer) is stock), None)
        if target is None:
            continue
        reason = None
        if keep(layer):
            reason = "kept stock (`keep`)"
        else:
            stock = type(layer)
            retype(layer, target)
            try:
                if target in checks:
                    checks[target](layer)
                if target is Dense:
                    layer._init_blpa(bits, derivative_bits)
                elif target is LayerNormalization:
                    layer._init_blpa(bits)
            except ValueError as err:
                retype(layer, stock)
                reason = str(err)
        report.around_blocks.append(Chain(layers=(layer.name,), model=path, reason=reason,
                                          fused_as=None if reason else type(layer).__name__))


def standard_around(layers: list) -> None:
    """Swaps `keras_blpa.layers`' norms and dropouts among `layers` back, in place."""
    back = {blpa: stock for stock, blpa in pairs()}
    for layer in layers:
        if type(layer) in back:
            retype(layer, back[type(layer)])
            for attribute in ("bits", "derivative_bits"):
                if attribute in vars(layer):
                    delattr(layer, attribute)
