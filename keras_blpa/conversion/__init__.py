"""One call from a stock Keras model to BLPA (`convert`), and one back (`to_standard`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import keras

from keras_blpa import backend, grid
from keras_blpa.conversion import subclass, transformers
from keras_blpa.conversion.fuse import convert_graph, keep_predicate
from keras_blpa.conversion.report import Chain, ConversionReport
from keras_blpa.conversion.standard import standard_graph
from keras_blpa.layers import BNReLUDense
from keras_blpa.transformer import codes, derivative

__all__ = ["Chain", "ConversionReport", "convert", "to_standard"]


def convert(
    model: keras.Model,
    bits: int | None = 4,
    naive: bool = False,
    window: float | None = None,
    keep: Iterable[str] | Callable[[keras.layers.Layer], bool] | None = None,
    return_report: bool = False,
    bn_bits: int | None = None,
    transformer_bits: int | None = 8,
    derivative_bits: int = 3,
) -> keras.Model | tuple[keras.Model, ConversionReport]:
    """A new model in which every BN -> ReLU -> linear chain is one fused layer.

    Every `BatchNormalization -> ReLU -> linear` chain of a Functional or
    Sequential model (nested ones included) becomes one `BNReLUConv2D` or
    `BNReLUDense` with the same weights, which keeps only a `bits`-bit code
    of the activation for the backward pass:

    - the activation: `keras.layers.ReLU()` or `Activation("relu")`, or a
      leaky ReLU (`LeakyReLU(negative_slope=s)`, `ReLU(negative_slope=s)`,
      `Activation("leaky_relu")`: slope 0.2), fused with `negative_slope=s`,
      or a capped ReLU (`ReLU(max_value=m)`, `ReLU(6.0)`,
      `Activation("relu6")`), fused with `max_value=m`;
    - the linear layer: `Conv2D` (with `groups`), `DepthwiseConv2D`, `Dense`,
      or `GlobalAveragePooling2D -> Dense` (the `pooling="avg"` head). Its
      own activation (e.g. a softmax) follows as an `Activation` layer that
      takes the linear layer's name;
    - a `ZeroPadding2D` between the ReLU and a "valid" convolution folds into
      the fused convolution's explicit padding;
    - an activation read by a convolution and a bias-free 1x1 `Conv2D` (the
      pre-activation projection shortcut) becomes one layer with a projection
      head: both read one saved code.

    A stock `ReLU` without a BN in front that feeds a linear layer (the
    `Add -> ReLU` ending each block of a post-activation ResNet) becomes a
    `ReLUConv2D` / `ReLUDense`, which hands the exact activation on to the
    `Add`s that also read it.

    With `bn_bits`, every BatchNormalization left outside the chains (the
    one before each residual `Add` of a post-activation ResNet, whose input
    stock Keras keeps at full precision) becomes an
    `ApproxBatchNormalization` that keeps a `bn_bits`-bit code of its input
    instead. That goes beyond the BLPA paper, so it is opt-in; its gradient
    error is measured in `benchmarks/post_activation.py`.

    Chains that cannot fuse stay stock and the report says why: another
    activation (a thresholded ReLU, swish...), a BN or ReLU output read by
    other layers too (several linear readers other than the projection pair
    included: their full-precision input stays alive anyway), a subclassed
    layer in between, `keep`. Everything else is untouched. The new model is
    not compiled; compile it before training.

    In inference (`training=False`) the converted model computes what the
    original does; in training, with `bits=None`, the same outputs and
    gradients; with 4 or 8 bits the same outputs and BLPA's approximate
    gradients.

    Example:

    >>> base = keras.applications.ResNet50V2(weights=None, input_shape=(64, 64, 3))
    >>> model, report = keras_blpa.convert(base, bits=4, return_report=True)
    >>> print(report)   # a table: each chain, fused or left stock and why

    A model holding KerasHub's `TransformerEncoder` / `TransformerDecoder`
    blocks (BERT, GPT-2, ...) keeps its class and its layers: each block
    becomes `keras_blpa.layers.TransformerEncoder` / `TransformerDecoder`, a
    subclass with the same weights whose training step keeps codes only
    (`transformer_bits`, `derivative_bits`); a task (`GPT2CausalLM`) is
    rebuilt around it and still generates. Each bare
    `keras.layers.MultiHeadAttention` (in your own Functional model, not
    inside a block) becomes `keras_blpa.layers.MultiHeadAttention`, which
    keeps codes of its inputs and of q, k, v (`transformer_bits`). Other
    blocks stay stock with their reason in `report.blocks`.

    A KerasHub backbone or task (a class that subclasses Keras's
    `Functional`) converts too: a backbone becomes a plain Functional model
    with the same inputs, outputs and weights; a task is rebuilt as its own
    class around the converted backbone, with its preprocessor and head
    (`report.notes` says which).

    Args:
      model: a Functional (or Functional subclass) or Sequential
        `keras.Model` (built).
      bits: 4 or 8 (BLPA) or None (exact) for every fused layer.
      naive: quantize in the forward pass too (the paper's baseline).
      window: the quantizer's range (see `BNReLUConv2D`).
      keep: layers to leave stock: a layer name, a collection of names, or a
        function `layer -> bool`; a chain with any such layer stays stock.
      return_report: also return a `ConversionReport` (`print()` it for a
        table of the chains).
      bn_bits: 8 or 4 to make every BatchNormalization outside the chains an
        `ApproxBatchNormalization(bits=bn_bits)` (with `window`); None (the
        default) leaves them stock.
      transformer_bits: 8 (default) or 4 for the transformer blocks' row
        codes, None for exact tensors.
      derivative_bits: 1 to 4 (default 3), the blocks' activation-derivative
        code.

    Returns:
      The converted model, or `(model, report)` with `return_report=True`.

    Raises:
      ValueError: for a subclassed `keras.Model` that is not Functional (its
        graph only exists in its Python code), an unbuilt Sequential model,
        or a bad argument.
      RuntimeError: when Keras runs on neither its TensorFlow nor its JAX
        backend.
    """
    backend.check("keras_blpa.convert")
    # The fused layers' own checks name `bits`, `naive` and `window`.
    BNReLUDense(1, bits=bits, naive=naive, window=window)
    if bn_bits is not None:
        try:
            grid.check_bits(bn_bits, allow_none=False)
        except ValueError as err:
            raise ValueError(
                f"`bn_bits` is the code width of the BatchNormalization layers outside the "
                f"chains: 4, 8, or None to leave them stock; received bn_bits={bn_bits!r}."
            ) from err
    try:
        codes.check_bits(transformer_bits)
    except ValueError as err:
        raise ValueError(str(err).replace("`bits`", "`transformer_bits`").replace(
            "bits=", "transformer_bits=")) from err
    derivative.check_derivative_bits(derivative_bits)
    keep = keep_predicate(keep)
    if not isinstance(return_report, bool):
        raise ValueError(f"`return_report` must be a bool; received {return_report!r}.")
    report = ConversionReport(bits=bits, bn_bits=bn_bits, transformer_bits=transformer_bits,
                              derivative_bits=derivative_bits)
    options = dict(bits=bits, naive=naive, window=window, bn_bits=bn_bits)
    new_model = _convert(model, options, keep, report)
    return (new_model, report) if return_report else new_model


def _convert(model, options: dict, keep, report: ConversionReport, path: str = ""):
    backbone = subclass.task_backbone(model)
    if backbone is not None:
        report.notes.append(subclass.note(model, task=True))
        new_backbone = _convert(backbone, options, keep, report,
                                f"{path}/{backbone.name}" if path else backbone.name)
        return subclass.rebuild_task(model, new_backbone)
    if transformers.has_blocks(model):
        return transformers.convert_blocks(model, report.transformer_bits,
                                           report.derivative_bits, keep, report, path)
    if subclass.is_functional_subclass(model):
        report.notes.append(subclass.note(model))
        model = subclass.as_functional(model)
    new_model, load = convert_graph(model, options, keep, report, path)
    load(new_model)
    return new_model


def to_standard(model: keras.Model) -> keras.Model:
    """The inverse of `convert`: every fused layer back to stock Keras layers.

    Each `BNReLUConv2D` / `BNReLUDense` becomes `BatchNormalization -> ReLU
    -> [ZeroPadding2D] -> Conv2D / DepthwiseConv2D` (or
    `[GlobalAveragePooling2D ->] Dense`), with `LeakyReLU(negative_slope=s)`
    for a layer with a nonzero `negative_slope` and `ReLU(max_value=m)` for a
    capped one, plus a 1x1 `Conv2D` for a projection head, with the same
    weights; a `ReLUConv2D` / `ReLUDense` the same without the BN, and an
    `ApproxBatchNormalization` a `keras.layers.BatchNormalization` of the
    same name, config and weights. The model computes the same outputs
    (training and inference) without keras_blpa, for export and serving.
    The linear layer keeps the fused layer's name; the others are named
    `<name>_bn`, `<name>_relu`, `<name>_pad`, `<name>_pool` and
    `<name>_projection`. A grouped convolution with one input channel per
    group comes back as a `DepthwiseConv2D` (what `convert` makes of one).

    Args:
      model: a Functional or Sequential `keras.Model`.

    Returns:
      A new, uncompiled model.

    Raises:
      ValueError: for a subclassed `keras.Model`, a fused layer with
        `naive=True` (its inference quantizes, which stock layers do not) or
        one called more than once.
    """
    backbone = subclass.task_backbone(model)
    if backbone is not None:
        return subclass.rebuild_task(model, to_standard(backbone))
    if transformers.has_blocks(model):
        return transformers.standard_blocks(model)
    if subclass.is_functional_subclass(model):
        model = subclass.as_functional(model)
    new_model, load = standard_graph(model)
    load(new_model)
    return new_model
