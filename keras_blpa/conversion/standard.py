"""`to_standard`: fused layers back to stock Keras layers with the same weights."""

from __future__ import annotations

import keras
import numpy as np

from keras_blpa.conversion import graph as g
from keras_blpa.conversion.fuse import BN_KEYS, transfer
from keras_blpa.layers import ApproxBatchNormalization, BNReLUConv2D, PaddedMaxPooling2D
from keras_blpa.layers.base import BNReLUBase
from keras_blpa.layers.relu_base import ReLUOnlyMixin

_LINEAR_KEYS = (
    "use_bias", "kernel_initializer", "bias_initializer", "kernel_regularizer",
    "bias_regularizer", "kernel_constraint", "bias_constraint", "activity_regularizer",
)


def _stock_layers(fused, names: dict) -> dict:
    """The stock layers equal to `fused`, by role, and their weight loader."""
    cfg = fused.get_config()
    common = dict(dtype=fused.dtype_policy, trainable=fused.trainable)
    layers = {}
    if not isinstance(fused, ReLUOnlyMixin):
        layers["bn"] = keras.layers.BatchNormalization(
            axis=-1, **{k: cfg[k] for k in BN_KEYS}, name=names["bn"], **common
        )
    slope = getattr(fused, "negative_slope", 0.0)
    cap = getattr(fused, "max_value", None)
    if cap is not None:
        # keras.layers.ReLU(max_value=cap) is the fused layer's capped ReLU.
        layers["relu"] = keras.layers.ReLU(
            max_value=cap, name=names["relu"], dtype=fused.dtype_policy
        )
    elif slope:
        # keras.layers.LeakyReLU is tf.nn.leaky_relu: `y if y > 0 else slope * y`,
        # the fused layer's activation.
        layers["relu"] = keras.layers.LeakyReLU(
            negative_slope=slope, name=names["relu"], dtype=fused.dtype_policy
        )
    else:
        layers["relu"] = keras.layers.ReLU(name=names["relu"], dtype=fused.dtype_policy)
    linear_kwargs = {k: cfg.get(k) for k in _LINEAR_KEYS}
    linear_kwargs["activity_regularizer"] = fused.activity_regularizer
    if isinstance(fused, BNReLUConv2D):
        explicit = not isinstance(fused.padding, str)
        if explicit:
            layers["pad"] = keras.layers.ZeroPadding2D(
                fused.padding, name=names["pad"], dtype=fused.dtype_policy
            )
        conv = dict(
            kernel_size=fused.kernel_size, strides=fused.strides,
            padding="valid" if explicit else fused.padding,
            dilation_rate=fused.dilation_rate, name=names["linear"], **common,
        )
        if fused.groups > 1 and int(fused.kernel.shape[2]) == 1:
            # One input channel per group: the DepthwiseConv2D it came from.
            for part in ("initializer", "regularizer", "constraint"):
                linear_kwargs[f"depthwise_{part}"] = linear_kwargs.pop(f"kernel_{part}")
            layers["linear"] = keras.layers.DepthwiseConv2D(
                depth_multiplier=fused.filters // fused.groups, **conv, **linear_kwargs
            )
        else:
            layers["linear"] = keras.layers.Conv2D(
                fused.filters, groups=fused.groups, **conv, **linear_kwargs
            )
        if fused.projection_filters:
            layers["projection"] = keras.layers.Conv2D(
                fused.projection_filters, 1, strides=fused.projection_strides,
                use_bias=getattr(fused, "projection_use_bias", False),
                bias_initializer=cfg["bias_initializer"],
                bias_regularizer=cfg["bias_regularizer"], bias_constraint=cfg["bias_constraint"],
                kernel_initializer=cfg["kernel_initializer"],
                kernel_regularizer=cfg["kernel_regularizer"],
                kernel_constraint=cfg["kernel_constraint"], name=names["projection"],
                **common,
            )
    else:
        if fused.pooling == "avg":
            layers["pool"] = keras.layers.GlobalAveragePooling2D(
                name=names["pool"], dtype=fused.dtype_policy
            )
        layers["linear"] = keras.layers.Dense(
            fused.units, name=names["linear"], **common, **linear_kwargs
        )
    return layers


def _load(fused) -> callable:
    def load(roles: dict) -> None:
        linear = roles["linear"]
        for weight in ("gamma", "beta", "moving_mean", "moving_variance"):
            if "bn" in roles and hasattr(fused, weight):
                getattr(roles["bn"], weight).assign(getattr(fused, weight))
        linear.kernel.assign(np.reshape(fused.kernel.numpy(), linear.kernel.shape))
        if fused.use_bias:
            linear.bias.assign(fused.bias)
        if "projection" in roles:
            roles["projection"].kernel.assign(fused.projection_kernel)
            if getattr(fused, "projection_use_bias", False):
                roles["projection"].bias.assign(fused.projection_bias)

    return load


def standard_graph(model):
    """The stock model and a function that loads its weights from `model`."""
    graph = g.Graph.of(model)
    taken = set(graph.layers)
    functional = graph.kind == "functional"
    new_entries, mapping, loaders, groups = [], {}, {}, []
    for name, entry in graph.entries:
        layer = graph.layers.get(name)
        if isinstance(layer, ApproxBatchNormalization):
            config = {k: v for k, v in layer.get_config().items() if k not in ("bits", "window")}
            stock = keras.layers.BatchNormalization.from_config(config)
            new_entries.append(g.serialize(stock, name, entry.get("inbound_nodes")))
        elif isinstance(layer, PaddedMaxPooling2D):
            pad_name = g.unique_name(f"{name}_pad", taken)
            pad = keras.layers.ZeroPadding2D(layer.padding, dtype=layer.dtype_policy)
            pool = keras.layers.MaxPooling2D(layer.pool_size, layer.strides, padding="valid",
                                             dtype=layer.dtype_policy)
            nodes = entry.get("inbound_nodes")
            new_entries.append(g.serialize(pad, pad_name, nodes))
            pool_nodes = None if nodes is None else [
                g.call_node(g.tensor(pad_name, graph.first_ref.get(name)))
            ]
            new_entries.append(g.serialize(pool, name, pool_nodes))
        elif isinstance(layer, BNReLUBase):
            if getattr(layer, "naive", False):
                raise ValueError(
                    f"`model` layer {name} has naive=True: it quantizes its activation "
                    "in inference too, which no stock layer does, so stock layers would "
                    "compute a different model. Only naive=False layers convert back."
                )
            if graph.calls[name] != 1:
                raise ValueError(
                    f"`model` layer {name} is called {graph.calls[name]} times (shared); "
                    "to_standard expands only fused layers called once."
                )
            names = {"linear": name}
            for role in ("bn", "relu", "pad", "pool", "projection"):
                names[role] = g.unique_name(f"{name}_{role}", taken)
            roles = _stock_layers(layer, names)
            previous = None
            first = graph.first_ref.get(name)
            for role in ("bn", "relu", "pad", "pool", "linear", "projection"):
                if role not in roles:
                    continue
                if not functional:
                    node = None
                elif previous is None:
                    node = entry["inbound_nodes"]
                else:
                    source = names["relu"] if role == "projection" else previous
                    node = [g.call_node(g.tensor(source, first))]
                new_entries.append(g.serialize(roles[role], names[role], node))
                previous = names[role]
            if "projection" in roles:
                mapping[(name, 0, 1)] = (names["projection"], 0, 0)
            if getattr(layer, "return_activation", False):
                mapping[(name, 0, 1 + ("projection" in roles))] = (names["relu"], 0, 0)
            groups.append((names, _load(layer)))
            for role_name in names.values():
                loaders[role_name] = _noop
        elif isinstance(layer, keras.Model) and _has_fused(layer):
            inner, load = standard_graph(layer)
            loaders[name] = load
            new_entry = keras.saving.serialize_keras_object(inner)
            for key in ("name", "inbound_nodes"):
                if key in entry:
                    new_entry[key] = entry[key]
            new_entries.append(new_entry)
        else:
            new_entries.append(entry)
    new_model = g.rebuild(graph, new_entries, mapping, model)

    def load(new) -> None:
        transfer(new, model, loaders)
        for names, load_group in groups:
            load_group({
                role: new.get_layer(n) for role, n in names.items()
                if any(layer.name == n for layer in new.layers)
            })

    return new_model, load


def _noop(layer) -> None:
    return None


def _has_fused(model) -> bool:
    return any(
        isinstance(layer, (BNReLUBase, ApproxBatchNormalization, PaddedMaxPooling2D))
        or (isinstance(layer, keras.Model) and _has_fused(layer))
        for layer in model.layers
    )
