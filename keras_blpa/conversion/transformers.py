"""KerasHub transformer blocks: how `convert` and `to_standard` swap them.

`keras_blpa.layers.TransformerEncoder` / `TransformerDecoder` subclass
KerasHub's blocks without adding weights or state, so a block converts in
place: a copy of the model is made (its class kept: a `GPT2CausalLM` still
generates), and each KerasHub block in it becomes the BLPA subclass with the
same sublayers and weights. `to_standard` swaps them back. A bare
`keras.layers.MultiHeadAttention` (one in the user's own model, not inside a
block) becomes `keras_blpa.layers.MultiHeadAttention` the same way.

KerasHub's Llama, Mistral and Qwen decoder blocks become
`keras_blpa.layers.LlamaTransformerDecoder` / `MistralTransformerDecoder` /
`QwenTransformerDecoder` (RMSNorm, rotary embeddings, grouped-query
attention, SwiGLU), and Gemma's `keras_blpa.layers.GemmaDecoderBlock`
(GeGLU, `1 + scale` norms; Gemma 2's soft cap, post-norms and sliding
window). Blocks of other classes (Gemma 3's, Qwen 3's, ...) stay stock and
the report says so.
"""

from __future__ import annotations

import importlib

import keras

from keras_blpa.conversion import around_blocks, saving, subclass
from keras_blpa.conversion.report import Chain, ConversionReport


def _hub():
    try:
        import keras_hub
    except ImportError:
        return None
    return keras_hub


def _pairs() -> list:
    """`(stock class, BLPA class)` of every block kind that converts."""
    from keras_blpa.layers.multi_head_attention import MultiHeadAttention

    attention = [(keras.layers.MultiHeadAttention, MultiHeadAttention)]
    hub = _hub()
    if hub is None:
        return attention
    from keras_blpa.layers.transformer_decoder import TransformerDecoder
    from keras_blpa.layers.transformer_encoder import TransformerEncoder

    return attention + [(hub.layers.TransformerEncoder, TransformerEncoder),
                        (hub.layers.TransformerDecoder, TransformerDecoder)] + _llama_pairs()


def _llama_pairs() -> list:
    """Llama's, Mistral's, Qwen's and Gemma's blocks, which KerasHub keeps under
    `keras_hub.src`: none of a module whose import fails (another KerasHub layout)."""
    found = []
    for module in ("llama_decoder", "gemma_decoder"):
        try:
            found += importlib.import_module(f"keras_blpa.layers.{module}").pairs()
        except ImportError:
            pass
    return found


def _sublayers(layer, recursive: bool = True) -> list:
    """Every layer tracked inside `layer` (not itself). Keras exports no walk
    over a layer's sublayers; `_flatten_layers` is internal, so it is used
    here only, with `layers` (direct children of a model) as the fallback."""
    walk = getattr(layer, "_flatten_layers", None)
    if walk is not None:
        return list(walk(include_self=False, recursive=recursive))
    children = list(getattr(layer, "layers", []))
    if not recursive:
        return children
    return [sub for child in children for sub in (child, *_sublayers(child))]


def _all_layers(model) -> list:
    return _sublayers(model)


def _attention_block(layer) -> bool:
    """A layer (not a model) holding attention: a transformer block of some kind."""
    if isinstance(layer, keras.Model):
        return False
    if isinstance(layer, keras.layers.MultiHeadAttention):
        return True
    return any(isinstance(sub, keras.layers.MultiHeadAttention) or "Attention" in type(sub).__name__
               for sub in _sublayers(layer, recursive=False))


def has_blocks(model) -> bool:
    """Whether `model` holds a transformer block (KerasHub's or another)."""
    return any(_attention_block(layer) for layer in _all_layers(model))


def _copy(model) -> keras.Model:
    """A copy of `model` with its class, weights and trainability."""
    if subclass.is_functional_subclass(model):
        new = saving.stock_class(type(model)).from_config(saving.stock_config(model))
    else:
        new = keras.models.clone_model(model)
    new.set_weights(model.get_weights())
    new.trainable = model.trainable
    return new


def _owner_names(model) -> dict:
    """Each inner layer's id -> the name of the layer (block) that holds it."""
    owners = {}
    for layer in _all_layers(model):
        if _attention_block(layer):
            for sub in _sublayers(layer):
                owners[id(sub)] = layer.name
    return owners


def convert_blocks(model, bits: int | None, derivative_bits: int, keep,
                   report: ConversionReport, path: str = "") -> keras.Model:
    """A copy of `model` whose KerasHub blocks train with BLPA (module docstring)."""
    new = _copy(model)
    converted = _convert_in_place(new, bits, derivative_bits, keep, report, path)
    if converted and saving.needs_mark(new):
        saving.mark(new, {"transformer_bits": bits, "derivative_bits": derivative_bits,
                          "converted_layers": converted})
    return new


def reconvert(model, conversion: dict) -> None:
    """Converts, in place, the layers of a freshly built stock `model` that a
    saved conversion converted (`saving.ConvertedModel.from_config`)."""
    layers = _all_layers(model)
    chosen = {id(layers[i]) for i in conversion["converted_layers"]}
    bits, derivative_bits = conversion["transformer_bits"], conversion["derivative_bits"]
    _convert_in_place(model, bits, derivative_bits, lambda layer: id(layer) not in chosen,
                      ConversionReport(transformer_bits=bits, derivative_bits=derivative_bits))
    saving.mark(model, conversion)


def _convert_in_place(model, bits, derivative_bits, keep, report: ConversionReport,
                      path: str = "") -> list[int]:
    """Swaps `model`'s blocks (and, if any did, the layers around them); the
    positions in `_all_layers(model)` of those it converted."""
    pairs = _pairs()
    inner = _owner_names(model)
    for layer in _all_layers(model):
        if not _attention_block(layer) or id(layer) in inner:
            continue
        target = next((blpa for stock, blpa in pairs if type(layer) is stock), None)
        converted = next((True for _, blpa in pairs if type(layer) is blpa), False)
        if converted:
            reason = "already a keras_blpa block"
        elif keep(layer):
            reason = "kept stock (`keep`)"
        elif target is None:
            reason = (f"{type(layer).__name__} is not a block convert covers yet (Keras's "
                      "MultiHeadAttention, KerasHub's TransformerEncoder / TransformerDecoder "
                      "and Llama's / Mistral's / Qwen's / Gemma's decoder blocks)")
        else:
            reason = _swap(layer, target, bits, derivative_bits)
        report.blocks.append(Chain(layers=(layer.name,), model=path,
                                   fused_as=None if reason else type(layer).__name__,
                                   reason=reason))
    if any(chain.fused for chain in report.blocks):
        outside = [layer for layer in _all_layers(model)
                   if id(layer) not in inner and not _attention_block(layer)]
        around_blocks.convert_around(outside, bits, derivative_bits, keep, report, path)
    blpa = {blpa for _, blpa in pairs} | {blpa for _, blpa in around_blocks.pairs()}
    return [i for i, layer in enumerate(_all_layers(model)) if type(layer) in blpa]


def _swap(layer, target, bits, derivative_bits) -> str | None:
    """Makes `layer` a `target` in place; the reason it cannot, or None."""
    from keras_blpa.layers.transformer_block import check_block

    stock = type(layer)
    layer.__class__ = target
    try:
        if isinstance(layer, keras.layers.MultiHeadAttention):  # no MLP: no derivative code
            layer._init_blpa(bits)
        else:
            layer._init_blpa(bits, derivative_bits)
            if hasattr(layer, "_check_blpa"):  # Llama-style blocks check themselves
                layer._check_blpa()
            else:
                check_block(layer)
    except ValueError as err:
        layer.__class__ = stock
        return str(err)
    return None


def standard_blocks(model) -> keras.Model:
    """A copy of `model` whose BLPA blocks (and attention layers) are stock again."""
    new = _copy(model)
    back = {blpa: stock for stock, blpa in _pairs()}
    around_blocks.standard_around(_all_layers(new))
    for layer in _all_layers(new):
        if type(layer) in back:
            layer.__class__ = back[type(layer)]
            for attribute in ("bits", "derivative_bits"):
                if attribute in vars(layer):
                    delattr(layer, attribute)
    return new
