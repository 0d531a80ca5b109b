"""`convert`: stock BatchNormalization -> ReLU -> linear chains to fused layers."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable

import keras
import numpy as np

from keras_blpa.conversion import graph as g
from keras_blpa.conversion import subclass
from keras_blpa.conversion.report import Chain, ConversionReport
from keras_blpa.layers import (
    ApproxBatchNormalization,
    BNReLUConv2D,
    BNReLUDense,
    PaddedMaxPooling2D,
    ReLUConv2D,
    ReLUDense,
)

LINEAR = ("Conv2D", "DepthwiseConv2D", "Dense")
BN_KEYS = (
    "momentum", "epsilon", "center", "scale", "beta_initializer", "gamma_initializer",
    "moving_mean_initializer", "moving_variance_initializer", "beta_regularizer",
    "gamma_regularizer", "beta_constraint", "gamma_constraint", "synchronized",
)
BIAS_KEYS = ("use_bias", "bias_initializer", "bias_regularizer", "bias_constraint")


class _Left(Exception):
    """A chain stays stock; the message says why."""


def is_stock(layer) -> bool:
    return type(layer).__module__.startswith("keras.")


def _slope(value) -> float:
    """A negative slope as a float (NaN for anything that is not a number)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def activation_kind(layer) -> tuple[str, float | None, float | None] | None:
    """(description, negative slope, cap) for an activation layer, None for
    a layer that is not one. The slope is that of a ReLU (0.0) or leaky ReLU
    (`y if y > 0 else slope * y`), the activations that fuse, and the cap a
    capped ReLU's `max_value` (ReLU6: 6.0; None: no cap); the slope is None
    for an activation that does not fuse, whose description says why."""
    if not is_stock(layer):
        return None
    cls = type(layer).__name__
    if cls == "ReLU":
        slope = _slope(layer.negative_slope)
        if layer.threshold:
            return (f"ReLU(threshold={layer.threshold}): a nonzero threshold moves the "
                    "kink off y = 0, where the grid's edge is", None, None)
        if layer.max_value is None:
            if slope == 0.0:
                return "ReLU", 0.0, None
            return f"ReLU(negative_slope={layer.negative_slope})", slope, None
        if slope == 0.0:
            return f"ReLU(max_value={layer.max_value})", 0.0, _slope(layer.max_value)
        return (f"ReLU(max_value={layer.max_value}, negative_slope={layer.negative_slope}): "
                "a capped leaky ReLU", None, None)
    if cls == "LeakyReLU":
        return (f"LeakyReLU(negative_slope={layer.negative_slope})",
                _slope(layer.negative_slope), None)
    if cls == "Activation":
        fn = layer.activation
        if fn is keras.activations.relu:
            return "ReLU", 0.0, None
        if fn is keras.activations.relu6:
            return "Activation('relu6')", 0.0, 6.0
        if fn is keras.activations.leaky_relu:
            # keras.activations.leaky_relu's default slope (0.2 in Keras 3).
            default = inspect.signature(fn).parameters["negative_slope"].default
            return (f"Activation('leaky_relu') (negative_slope={default})", _slope(default),
                    None)
        return f"Activation({getattr(fn, '__name__', fn)!r})", None, None
    if cls in ("PReLU", "ELU", "Softmax"):
        return cls, None, None
    return None


def fusable(kind: tuple) -> tuple[float, float | None]:
    """`(negative_slope, max_value)` of a chain's activation, or `_Left`
    saying why it does not fuse."""
    description, slope, cap = kind
    if slope is None:
        raise _Left(f"the activation is {description}; only ReLU, capped ReLU (ReLU6) and "
                    "leaky ReLU fuse")
    if not (math.isfinite(slope) and slope >= 0.0):
        raise _Left(
            f"the activation is {description}: a leaky ReLU fuses only with a finite "
            "negative_slope >= 0"
        )
    return slope, cap


def _describe(graph: g.Graph, name: str) -> str:
    if name == g.OUTPUT:
        return "the model's output"
    return f"{name} ({type(graph.layers[name]).__name__})"


def _head(graph: g.Graph, act: str, reader: str) -> dict:
    """One linear reader of the ReLU output: {"linear", "pad", "pool"}."""
    if reader == g.OUTPUT:
        raise _Left("the ReLU output is also the model's output")
    head = {"pad": None, "pool": None, "linear": reader}
    layer = graph.layers[reader]
    if not is_stock(layer):
        raise _Left(
            f"subclassed layer {_describe(graph, reader)} between the ReLU and the linear layer"
        )
    cls = graph.class_name(reader)
    after = {"ZeroPadding2D": ("Conv2D", "DepthwiseConv2D"), "GlobalAveragePooling2D": ("Dense",)}
    if cls in after:
        nxt = graph.sole_reader(reader)
        readers = ", ".join(_describe(graph, r) for r in graph.readers[(reader, 0, 0)])
        if nxt is None or nxt == g.OUTPUT or graph.class_name(nxt) not in after[cls]:
            raise _Left(
                f"the ReLU output goes through {_describe(graph, reader)} to {readers}, "
                f"not to one {' / '.join(after[cls])}"
            )
        if graph.calls[reader] != 1 or layer.data_format != "channels_last":
            raise _Left(f"{_describe(graph, reader)} is shared or not channels_last")
        if cls == "GlobalAveragePooling2D" and layer.keepdims:
            raise _Left(f"{reader} has keepdims=True (the fused head pools to 2-D)")
        head["pad" if cls == "ZeroPadding2D" else "pool"] = reader
        head["linear"] = reader = nxt
        cls = graph.class_name(reader)
    if cls not in LINEAR or not is_stock(graph.layers[reader]):
        raise _Left(
            f"the ReLU output is read by {_describe(graph, reader)}, not by a Conv2D, "
            "DepthwiseConv2D or Dense"
        )
    if graph.calls[reader] != 1 or len(graph.inputs[reader]) != 1:
        raise _Left(f"{_describe(graph, reader)} is shared or reads several tensors")
    return head


def _is_projection(graph: g.Graph, head: dict, allow_bias: bool = False) -> bool:
    """A bias-free (or, with `allow_bias`, any), linear 1x1 Conv2D without
    groups or dilation."""
    layer = graph.layers[head["linear"]]
    return (
        head["pad"] is None and graph.class_name(head["linear"]) == "Conv2D"
        and tuple(layer.kernel_size) == (1, 1) and layer.groups == 1
        and tuple(layer.dilation_rate) == (1, 1) and (allow_bias or not layer.use_bias)
        and layer.activation is keras.activations.linear
        and layer.activity_regularizer is None
    )


def _pick_heads(graph: g.Graph, act: str, heads: list) -> tuple:
    """(main, projection or None) among the ReLU output's readers."""
    if len(heads) == 1:
        return heads[0], None
    names = ", ".join(h["linear"] for h in heads)
    why = (
        f"the ReLU output is read by {len(heads)} layers ({names}); a fused layer has one "
        "main head plus at most one bias-free 1x1 Conv2D projection head, and stock "
        "layers reading the activation would keep it in full precision anyway"
    )
    if len(heads) != 2:
        raise _Left(why)
    convs = [h for h in heads if graph.class_name(h["linear"]) in ("Conv2D", "DepthwiseConv2D")]
    projections = [h for h in heads if _is_projection(graph, h)]
    if len(convs) < 2 or not projections:
        raise _Left(why)
    # Two candidates (both bias-free 1x1): the main head is the first one.
    projection = projections[-1]
    main = heads[1] if heads[0] is projection else heads[0]
    return main, projection


def _check_chain(graph: g.Graph, bn: str, act: str, heads: tuple, keep) -> None:
    bn_layer, main, projection = graph.layers[bn], heads[0], heads[1]
    names = [bn, act, *[h[k] for h in heads if h for k in ("pad", "pool", "linear") if h[k]]]
    for name in names:
        if keep(graph.layers[name]):
            raise _Left(f"kept stock by `keep` ({name})")
    rank = len(graph.layers[bn].input.shape)
    if bn_layer.axis not in (-1, rank - 1):
        raise _Left(f"{bn} normalizes axis {bn_layer.axis}, not the channel (last) axis")
    for name in (bn, act):
        if graph.layers[name].activity_regularizer is not None:
            raise _Left(f"{name} has an activity_regularizer")
    linear = graph.layers[main["linear"]]
    if getattr(linear, "data_format", "channels_last") != "channels_last":
        raise _Left(f"{linear.name} is channels_first (fused layers need channels_last)")
    if main["pad"] and linear.padding != "valid":
        raise _Left(f"{main['pad']} pads before {linear.name}, whose padding is not 'valid'")
    for layer in [linear] + ([graph.layers[projection["linear"]]] if projection else []):
        if getattr(layer, "lora_enabled", False):
            raise _Left(f"{layer.name} has LoRA enabled")
        if getattr(layer.dtype_policy, "quantization_mode", None):
            raise _Left(f"{layer.name} is quantized")
        if layer.trainable != bn_layer.trainable:
            raise _Left(f"{bn} and {layer.name} differ in `trainable`")
        if layer.dtype_policy.name != bn_layer.dtype_policy.name:
            raise _Left(f"{bn} and {layer.name} have different dtype policies")
    if projection and linear.activity_regularizer is not None:
        raise _Left(f"{linear.name} has an activity_regularizer and a projection head")


def _unit_options(options: dict) -> dict:
    """`convert`'s options that the fused layers take."""
    return {k: v for k, v in options.items() if k != "bn_bits"}


def _fused_layer(graph: g.Graph, bn: str, heads: tuple, name: str, options: dict,
                 slope: float = 0.0, cap: float | None = None):
    """The fused layer (unbuilt) and a function that loads its weights."""
    bn_layer = graph.layers[bn]
    main, projection = heads
    linear = graph.layers[main["linear"]]
    proj = graph.layers[projection["linear"]] if projection else None
    lin_cfg = linear.get_config()
    bn_cfg = bn_layer.get_config()
    kwargs = {k: bn_cfg[k] for k in BN_KEYS}
    kwargs.update({k: lin_cfg[k] for k in BIAS_KEYS})
    kernel_key = "depthwise" if isinstance(linear, keras.layers.DepthwiseConv2D) else "kernel"
    for part in ("initializer", "regularizer", "constraint"):
        kwargs[f"kernel_{part}"] = lin_cfg[f"{kernel_key}_{part}"]
    if linear.activation is keras.activations.linear and lin_cfg.get("activity_regularizer"):
        kwargs["activity_regularizer"] = lin_cfg["activity_regularizer"]
    kwargs.update(_unit_options(options), name=name, dtype=linear.dtype_policy,
                  trainable=bn_layer.trainable)
    if slope:
        kwargs["negative_slope"] = slope
    if cap is not None:
        kwargs["max_value"] = cap
    if isinstance(linear, keras.layers.Dense):
        layer = BNReLUDense(linear.units, pooling="avg" if main["pool"] else None, **kwargs)
    else:
        padding = graph.layers[main["pad"]].padding if main["pad"] else linear.padding
        if isinstance(linear, keras.layers.DepthwiseConv2D):
            channels = int(linear.kernel.shape[2])
            filters, groups = channels * linear.depth_multiplier, channels
        else:
            filters, groups = linear.filters, linear.groups
        layer = BNReLUConv2D(
            filters, linear.kernel_size, strides=linear.strides, padding=padding,
            dilation_rate=linear.dilation_rate, groups=groups,
            projection_filters=proj.filters if proj else None,
            projection_strides=proj.strides if proj else None, **kwargs,
        )

    def load(fused) -> None:
        for weight in ("gamma", "beta", "moving_mean", "moving_variance"):
            if hasattr(fused, weight):
                getattr(fused, weight).assign(getattr(bn_layer, weight))
        # A depthwise kernel (kh, kw, C, m) is the grouped kernel (kh, kw, 1, C*m):
        # output channel c*m + j in both.
        fused.kernel.assign(np.reshape(linear.kernel.numpy(), fused.kernel.shape))
        if linear.use_bias:
            fused.bias.assign(linear.bias)
        if proj is not None:
            fused.projection_kernel.assign(proj.kernel)

    return layer, load


# ---------------------------------------------------- ReLU -> linear, no BN
# A post-activation ResNet's `Add -> ReLU` feeds the next block's
# convolutions (which save the activation for their weight gradients) and its
# shortcut `Add` (which saves nothing): `ReLUConv2D(return_activation=True)`
# keeps a code of the ReLU's input instead and hands the exact activation to
# the `Add`.

# Readers of the activation that keep nothing of it for their backward pass.
PASSTHROUGH = ("Add",)


def _relu_heads(graph: g.Graph, act: str) -> tuple[tuple, list[str]]:
    """`((main, projection or None), passthrough readers)` of a BN-less ReLU."""
    readers = graph.readers.get((act, 0, 0), [])
    passthrough = [r for r in readers if r != g.OUTPUT and graph.class_name(r) in PASSTHROUGH
                   and is_stock(graph.layers[r])]
    heads = [_head(graph, act, r) for r in readers if r not in passthrough]
    if len(heads) == 1:
        return (heads[0], None), passthrough
    projections = [h for h in heads if _is_projection(graph, h, allow_bias=True)]
    if len(heads) != 2 or not projections or any(
        graph.class_name(h["linear"]) != "Conv2D" for h in heads
    ):
        names = ", ".join(h["linear"] for h in heads)
        raise _Left(
            f"the ReLU output is read by {len(heads)} linear layers ({names}); a fused layer "
            "has one main head plus at most one 1x1 Conv2D projection head"
        )
    projection = projections[-1]
    main = heads[1] if heads[0] is projection else heads[0]
    return (main, projection), passthrough


def _check_relu_chain(graph: g.Graph, act: str, heads: tuple, keep, options: dict) -> None:
    main, projection = heads
    linears = [graph.layers[h["linear"]] for h in heads if h]
    names = [act, *[h[k] for h in heads if h for k in ("pad", "pool", "linear") if h[k]]]
    for name in names:
        if keep(graph.layers[name]):
            raise _Left(f"kept stock by `keep` ({name})")
    if options.get("naive"):
        raise _Left("naive=True: the naive baseline has no unit without a BN")
    if graph.calls[act] != 1:
        raise _Left("the ReLU layer is shared (called more than once)")
    if graph.layers[act].activity_regularizer is not None:
        raise _Left(f"{act} has an activity_regularizer")
    linear = linears[0]
    if getattr(linear, "data_format", "channels_last") != "channels_last":
        raise _Left(f"{linear.name} is channels_first (fused layers need channels_last)")
    if main["pad"] and linear.padding != "valid":
        raise _Left(f"{main['pad']} pads before {linear.name}, whose padding is not 'valid'")
    for layer in linears:
        if getattr(layer, "lora_enabled", False):
            raise _Left(f"{layer.name} has LoRA enabled")
        if getattr(layer.dtype_policy, "quantization_mode", None):
            raise _Left(f"{layer.name} is quantized")
        if layer.trainable != linear.trainable:
            raise _Left(f"{linear.name} and {layer.name} differ in `trainable`")
        if layer.dtype_policy.name != graph.layers[act].dtype_policy.name:
            raise _Left(f"{act} and {layer.name} have different dtype policies")
    if projection and linear.activity_regularizer is not None:
        raise _Left(f"{linear.name} has an activity_regularizer and a projection head")


def _relu_fused_layer(graph: g.Graph, heads: tuple, name: str, options: dict,
                      return_activation: bool):
    """The fused ReLU -> linear layer (unbuilt) and its weight loader."""
    main, projection = heads
    linear = graph.layers[main["linear"]]
    proj = graph.layers[projection["linear"]] if projection else None
    lin_cfg = linear.get_config()
    kwargs = {k: lin_cfg[k] for k in BIAS_KEYS}
    kernel_key = "depthwise" if isinstance(linear, keras.layers.DepthwiseConv2D) else "kernel"
    for part in ("initializer", "regularizer", "constraint"):
        kwargs[f"kernel_{part}"] = lin_cfg[f"{kernel_key}_{part}"]
    if linear.activation is keras.activations.linear and lin_cfg.get("activity_regularizer"):
        kwargs["activity_regularizer"] = lin_cfg["activity_regularizer"]
    kwargs.update({k: v for k, v in _unit_options(options).items() if k != "naive"}, name=name,
                  dtype=linear.dtype_policy, trainable=linear.trainable,
                  return_activation=return_activation)
    if isinstance(linear, keras.layers.Dense):
        layer = ReLUDense(linear.units, pooling="avg" if main["pool"] else None, **kwargs)
    else:
        padding = graph.layers[main["pad"]].padding if main["pad"] else linear.padding
        if isinstance(linear, keras.layers.DepthwiseConv2D):
            channels = int(linear.kernel.shape[2])
            filters, groups = channels * linear.depth_multiplier, channels
        else:
            filters, groups = linear.filters, linear.groups
        layer = ReLUConv2D(
            filters, linear.kernel_size, strides=linear.strides, padding=padding,
            dilation_rate=linear.dilation_rate, groups=groups,
            projection_filters=proj.filters if proj else None,
            projection_strides=proj.strides if proj else None,
            projection_use_bias=bool(proj and proj.use_bias), **kwargs,
        )

    def load(fused) -> None:
        fused.kernel.assign(np.reshape(linear.kernel.numpy(), fused.kernel.shape))
        if linear.use_bias:
            fused.bias.assign(linear.bias)
        if proj is not None:
            fused.projection_kernel.assign(proj.kernel)
            if proj.use_bias:
                fused.projection_bias.assign(proj.bias)

    return layer, load


def _approx_bn(graph: g.Graph, bn: str, bits: int, window: float | None, keep):
    """The `ApproxBatchNormalization` for a stock BN outside every chain, or
    `_Left` saying why it stays stock."""
    layer = graph.layers[bn]
    if keep(layer):
        raise _Left(f"kept stock by `keep` ({bn})")
    if graph.calls[bn] != 1:
        raise _Left("the BN layer is shared (called more than once)")
    rank = len(layer.input.shape)
    if layer.axis not in (-1, rank - 1):
        raise _Left(f"{bn} normalizes axis {layer.axis}, not the channel (last) axis")
    # The layer refuses renorm, synchronized and the JAX backend itself.
    config = {**layer.get_config(), "axis": -1, "bits": bits, "window": window}
    try:
        return ApproxBatchNormalization(**config)
    except ValueError as err:
        raise _Left(f"ApproxBatchNormalization rejects it: {err}") from None


def _pad_pools(graph: g.Graph, removed: set):
    """(ZeroPadding2D, MaxPooling2D) pairs outside every chain, the pad read
    by the pool alone."""
    for name, _ in graph.entries:
        layer = graph.layers.get(name)
        if name in removed or not isinstance(layer, keras.layers.ZeroPadding2D):
            continue
        reader = graph.sole_reader(name)
        if (is_stock(layer) and reader not in (None, g.OUTPUT) and reader not in removed
                and isinstance(graph.layers[reader], keras.layers.MaxPooling2D)
                and is_stock(graph.layers[reader])):
            yield name, reader


def _padded_pool(graph: g.Graph, pad: str, pool: str, keep) -> PaddedMaxPooling2D:
    """The `PaddedMaxPooling2D` for a pair, or `_Left` saying why it stays stock."""
    pad_layer, pool_layer = graph.layers[pad], graph.layers[pool]
    for layer in (pad_layer, pool_layer):
        if keep(layer):
            raise _Left(f"kept stock by `keep` ({layer.name})")
        if graph.calls[layer.name] != 1:
            raise _Left(f"{layer.name} is shared (called more than once)")
        if layer.data_format != "channels_last":
            raise _Left(f"{layer.name} is channels_first")
    if pool_layer.padding != "valid":
        raise _Left(f"{pool} pads ('same') after {pad}")
    if pad_layer.dtype_policy.name != pool_layer.dtype_policy.name:
        raise _Left(f"{pad} and {pool} have different dtype policies")
    try:
        return PaddedMaxPooling2D(
            padding=pad_layer.padding, pool_size=pool_layer.pool_size,
            strides=pool_layer.strides, name=pool, dtype=pool_layer.dtype_policy,
        )
    except ValueError as err:
        raise _Left(f"PaddedMaxPooling2D rejects it: {err}") from None


def _lone_bns(graph: g.Graph, removed: set):
    """Stock BatchNormalization layers that no chain took."""
    for name, _ in graph.entries:
        layer = graph.layers.get(name)
        if (name not in removed and isinstance(layer, keras.layers.BatchNormalization)
                and is_stock(layer)):
            yield name


def _bn_less_relus(graph: g.Graph, seen: set):
    """Stock plain ReLUs outside every BN chain that a linear layer reads."""
    for name, _ in graph.entries:
        layer = graph.layers.get(name)
        if name in seen or layer is None or activation_kind(layer) is None:
            continue
        if activation_kind(layer)[1:] != (0.0, None):
            continue
        readers = graph.readers.get((name, 0, 0), [])
        if any(r != g.OUTPUT and graph.class_name(r) in ("Conv2D", "DepthwiseConv2D", "Dense",
                                                           "ZeroPadding2D",
                                                           "GlobalAveragePooling2D")
               for r in readers):
            yield name


def _chains(graph: g.Graph):
    """(BN, activation) pairs to report, and chains whose reason is known early."""
    for name, _ in graph.entries:
        layer = graph.layers.get(name)
        if not isinstance(layer, keras.layers.BatchNormalization) or not is_stock(layer):
            continue
        readers = graph.readers.get((name, 0, 0), [])
        acts = [r for r in readers if r != g.OUTPUT and activation_kind(graph.layers[r])]
        if acts:
            yield name, acts[0], readers
        elif readers and readers[0] != g.OUTPUT and not is_stock(graph.layers[readers[0]]):
            nxt = graph.sole_reader(readers[0])
            if nxt and nxt != g.OUTPUT and activation_kind(graph.layers[nxt]):
                yield name, nxt, readers


def convert_graph(model, options: dict, keep: Callable, report: ConversionReport,
                  path: str = ""):
    """The converted model and a function that loads its weights from `model`."""
    graph = g.Graph.of(model)
    taken = set(graph.layers)
    at_bn, removed, mapping, loaders = {}, set(), {}, {}
    for bn, act, readers in _chains(graph):
        chain = [bn, act]
        try:
            if len(readers) > 1:
                others = ", ".join(_describe(graph, r) for r in readers if r != act)
                raise _Left(f"the BN output is also read by {others}")
            if act not in graph.readers.get((bn, 0, 0), []) or graph.sole_reader(bn) != act:
                raise _Left(
                    f"subclassed layer {_describe(graph, readers[0])} between the BN and "
                    "the activation"
                )
            slope, cap = fusable(activation_kind(graph.layers[act]))
            if graph.calls[bn] != 1 or graph.calls[act] != 1:
                raise _Left("the BN or ReLU layer is shared (called more than once)")
            act_readers = graph.readers.get((act, 0, 0), [])
            chain += [r for r in act_readers]
            heads = _pick_heads(graph, act, [_head(graph, act, r) for r in act_readers])
            _check_chain(graph, bn, act, heads, keep)
            main, projection = heads
            linear = graph.layers[main["linear"]]
            activated = linear.activation is not keras.activations.linear
            name = (
                g.unique_name(f"{linear.name}_fused", taken) if activated else linear.name
            )
            try:
                fused, load = _fused_layer(graph, bn, heads, name, options, slope, cap)
            except ValueError as err:
                raise _Left(f"the fused layer rejects it: {err}") from None
        except _Left as left:
            report.chains.append(Chain(tuple(dict.fromkeys(chain)), reason=str(left), model=path))
            continue
        parts = [bn, act] + [h[k] for h in heads if h for k in ("pad", "pool", "linear") if h[k]]
        removed.update(parts)
        first = graph.first_ref.get(bn)
        functional = graph.kind == "functional"
        nodes = dict(graph.entries)[bn].get("inbound_nodes")
        if nodes is not None:
            # BatchNormalization's call takes a `mask` the fused layers do not.
            nodes = [{**n, "kwargs": {k: v for k, v in n["kwargs"].items() if k != "mask"}}
                     for n in nodes]
        entries = [g.serialize(fused, name, nodes)]
        if activated:
            out = keras.layers.Activation(
                linear.activation, dtype=linear.dtype_policy,
                activity_regularizer=linear.activity_regularizer,
            )
            node = [g.call_node(g.tensor(name, first))] if functional else None
            entries.append(g.serialize(out, linear.name, node))
        at_bn[bn] = entries
        if projection:
            mapping[(projection["linear"], 0, 0)] = (name, 0, 1)
        loaders[name] = load
        report.chains.append(Chain(
            tuple(parts), fused_as=name, model=path, linear=linear.name,
            projection=projection["linear"] if projection else None, negative_slope=slope,
            max_value=cap,
        ))
        report.stock_layers += len(parts)
        report.fused_layers += 1
    seen = {name for chain in report.chains if chain.model == path for name in chain.layers}
    for act in _bn_less_relus(graph, seen | removed):
        chain = [act, *graph.readers.get((act, 0, 0), [])]
        try:
            heads, passthrough = _relu_heads(graph, act)
            _check_relu_chain(graph, act, heads, keep, options)
            main, projection = heads
            linear = graph.layers[main["linear"]]
            activated = linear.activation is not keras.activations.linear
            name = (
                g.unique_name(f"{linear.name}_fused", taken) if activated else linear.name
            )
            try:
                fused, load = _relu_fused_layer(graph, heads, name, options, bool(passthrough))
            except ValueError as err:
                raise _Left(f"the fused layer rejects it: {err}") from None
        except _Left as left:
            chain = [r for r in chain if r != g.OUTPUT]
            report.chains.append(Chain(tuple(dict.fromkeys(chain)), reason=str(left), model=path))
            continue
        parts = [act] + [h[k] for h in heads if h for k in ("pad", "pool", "linear") if h[k]]
        removed.update(parts)
        first = graph.first_ref.get(act)
        nodes = dict(graph.entries)[act].get("inbound_nodes")
        entries = [g.serialize(fused, name, nodes)]
        if activated:
            out = keras.layers.Activation(
                linear.activation, dtype=linear.dtype_policy,
                activity_regularizer=linear.activity_regularizer,
            )
            node = [g.call_node(g.tensor(name, first))] if graph.kind == "functional" else None
            entries.append(g.serialize(out, linear.name, node))
        at_bn[act] = entries
        if projection:
            mapping[(projection["linear"], 0, 0)] = (name, 0, 1)
        if passthrough:
            mapping[(act, 0, 0)] = (name, 0, 2 if projection else 1)
        loaders[name] = load
        report.chains.append(Chain(
            tuple(parts), fused_as=name, model=path, linear=linear.name,
            projection=projection["linear"] if projection else None, negative_slope=0.0,
        ))
        report.stock_layers += len(parts)
        report.fused_layers += 1
    for name, layer in graph.layers.items():
        inside = _hidden_bns(layer)
        if inside:
            report.chains.append(Chain((name,), model=path, reason=(
                f"{inside} BatchNormalization layer{'s' if inside > 1 else ''} inside the "
                f"custom layer {name} ({type(layer).__name__}), whose call is its own "
                "Python code: convert rewrites only the Functional graph")))
    for pad, pool in list(_pad_pools(graph, removed)):
        try:
            layer = _padded_pool(graph, pad, pool, keep)
        except _Left as left:
            report.pools.append(Chain((pad, pool), reason=str(left), model=path))
            continue
        at_bn[pad] = [g.serialize(layer, pool, dict(graph.entries)[pad].get("inbound_nodes"))]
        removed.add(pool)
        report.pools.append(Chain((pad, pool), fused_as=pool, model=path))
    if options.get("bn_bits") is not None:
        for bn in _lone_bns(graph, removed):
            try:
                layer = _approx_bn(graph, bn, options["bn_bits"], options["window"], keep)
            except _Left as left:
                report.bns.append(Chain((bn,), reason=str(left), model=path))
                continue
            nodes = dict(graph.entries)[bn].get("inbound_nodes")
            at_bn[bn] = [g.serialize(layer, bn, nodes)]
            report.bns.append(Chain((bn,), fused_as=bn, model=path))
    new_entries = []
    for name, entry in graph.entries:
        layer = graph.layers.get(name)
        if name in at_bn:
            new_entries += at_bn[name]
        elif name in removed:
            continue
        elif isinstance(layer, keras.Model):
            entry = _nested(layer, entry, options, keep, report, path, loaders)
            new_entries.append(entry)
        else:
            new_entries.append(entry)
    new_model = g.rebuild(graph, new_entries, mapping, model)
    return new_model, lambda new: transfer(new, model, loaders, removed)


def _hidden_bns(layer) -> int:
    """BatchNormalization layers held inside a custom (non-model) layer."""
    if isinstance(layer, keras.Model) or type(layer).__module__.startswith("keras."):
        return 0
    seen, count, stack = {id(layer)}, 0, [layer]
    while stack:
        for value in vars(stack.pop()).values():
            items = value if isinstance(value, (list, tuple)) else [value]
            for item in items:
                if isinstance(item, keras.layers.Layer) and id(item) not in seen:
                    seen.add(id(item))
                    count += isinstance(item, keras.layers.BatchNormalization)
                    stack.append(item)
    return count


def _nested(layer, entry: dict, options, keep, report, path, loaders) -> dict:
    """A nested Functional / Sequential model, converted in its own right."""
    inner_path = f"{path}/{layer.name}" if path else layer.name
    note = None
    if subclass.is_functional_subclass(layer):
        note = subclass.note(layer)
        layer = subclass.as_functional(layer)
    try:
        g.model_kind(layer, argument=inner_path)
    except ValueError as err:
        report.chains.append(Chain((layer.name,), reason=f"nested model left as is: {err}",
                                   model=path))
        return entry
    before = report.changes()
    inner, load = convert_graph(layer, options, keep, report, inner_path)
    if report.changes() == before:
        return entry
    if note:
        report.notes.append(note)
    loaders[layer.name] = load
    new_entry = keras.saving.serialize_keras_object(inner)
    for key in ("name", "inbound_nodes"):
        if key in entry:
            new_entry[key] = entry[key]
    return new_entry


def transfer(new_model, old_model, loaders: dict, replaced: set = frozenset()) -> None:
    """Weights of `old_model` into `new_model`: by `loaders`, else by layer
    name, else in order: a custom layer rebuilt from its config may name
    itself anew (KerasHub's MobileNet blocks append a suffix). `replaced`:
    old layers that fused layers replace."""
    old_names = {layer.name for layer in old_model.layers}
    new_names = {layer.name for layer in new_model.layers}
    renamed_old = [layer for layer in old_model.layers
                   if layer.name not in new_names | set(loaders) | set(replaced)
                   and layer.weights]
    renamed_new = [layer for layer in new_model.layers
                   if layer.name not in old_names and layer.name not in loaders and layer.weights]
    if len(renamed_old) != len(renamed_new):
        raise ValueError(
            f"Could not match the layers of `model` ({old_model.name}) rebuilt from their "
            f"configs: {[layer.name for layer in renamed_new]} are new names, "
            f"{[layer.name for layer in renamed_old]} are gone. Every layer must keep its "
            "name through `from_config(get_config())`."
        )
    renamed = {id(new): old for new, old in zip(renamed_new, renamed_old)}
    for layer in new_model.layers:
        if layer.name in loaders:
            loaders[layer.name](layer)
        elif layer.weights:
            source = renamed.get(id(layer)) or old_model.get_layer(layer.name)
            layer.set_weights(source.get_weights())


def keep_predicate(keep) -> Callable:
    """`keep` (None, layer names, or a predicate) as a predicate over layers."""
    if keep is None:
        return lambda layer: False
    if callable(keep):
        return lambda layer: bool(keep(layer))
    if isinstance(keep, str):
        keep = [keep]
    if isinstance(keep, Iterable):
        names = set(keep)
        if all(isinstance(n, str) for n in names):
            return lambda layer: layer.name in names
    raise ValueError(
        "`keep` must be None, a layer name, a collection of layer names or a function "
        f"`layer -> bool`; received keep={keep!r}."
    )
