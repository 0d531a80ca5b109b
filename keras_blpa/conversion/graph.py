"""A Functional or Sequential model's layer graph, read from its config.

`convert` and `to_standard` rewrite `model.get_config()` (public API) and
rebuild with `from_config`: the config lists every layer with the tensors each
of its calls reads (`keras_history = [layer, node, tensor]`), which is the
whole graph. The one piece of Keras internals is `_model_kind`'s class check
(Functional has no public class).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field

import keras

TENSOR = "__keras_tensor__"
OUTPUT = "<model output>"


def model_kind(model, argument: str = "model") -> str:
    """"functional" or "sequential"; a clear ValueError for anything else."""
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`{argument}` must be a keras.Model (Functional or Sequential); received "
            f"{type(model).__name__}."
        )
    if isinstance(model, keras.Sequential):
        if not model.built or not model.inputs:
            raise ValueError(
                f"`{argument}` ({model.name}) is a Sequential model that is not built: "
                "give it an input shape first (`keras.Input(shape)` as its first layer, "
                "or `model.build((None, ...))`)."
            )
        return "sequential"
    # Internal: Keras exports no Functional class; a model made by
    # keras.Model(inputs, outputs) is exactly this class.
    from keras.src.models.functional import Functional

    if type(model) is Functional:
        return "functional"
    raise ValueError(
        f"`{argument}` ({model.name}) is a subclassed keras.Model "
        f"({type(model).__name__}), whose layer graph only exists in its Python `call`, "
        "so it cannot be rewritten. Build the part to convert as a Functional model "
        "(`keras.Model(inputs, outputs)`) or Sequential one and convert that (it can "
        "then be used as a layer inside your model), or use keras_blpa.BNReLUConv2D / "
        "BNReLUDense in place of BatchNormalization -> ReLU -> Conv2D / Dense in `call`."
    )


def tensor_refs(obj):
    """Every `(layer, node, tensor)` reference inside a node's config data."""
    if isinstance(obj, dict):
        if obj.get("class_name") == TENSOR:
            yield tuple(obj["config"]["keras_history"])
        else:
            for value in obj.values():
                yield from tensor_refs(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensor_refs(value)


def remap_refs(obj, mapping: dict):
    """A copy of node data with references replaced through `mapping`."""
    if isinstance(obj, dict):
        if obj.get("class_name") == TENSOR:
            ref = tuple(obj["config"]["keras_history"])
            out = copy.deepcopy(obj)
            out["config"]["keras_history"] = list(mapping.get(ref, ref))
            return out
        return {k: remap_refs(v, mapping) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [remap_refs(v, mapping) for v in obj]
    return obj


def _is_ref(obj) -> bool:
    return (
        isinstance(obj, (list, tuple)) and len(obj) == 3 and isinstance(obj[0], str)
        and all(isinstance(v, int) for v in obj[1:])
    )


def output_refs(obj):
    """References in `output_layers` (a ref, a list of refs, or a dict of them)."""
    if _is_ref(obj):
        yield tuple(obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from output_refs(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from output_refs(value)


def remap_outputs(obj, mapping: dict):
    if _is_ref(obj):
        return list(mapping.get(tuple(obj), tuple(obj)))
    if isinstance(obj, dict):
        return {k: remap_outputs(v, mapping) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [remap_outputs(v, mapping) for v in obj]
    return obj


def tensor(name: str, like: dict, index: int = 0) -> dict:
    """A tensor reference to `name`'s output `index`, shaped like `like`'s
    (the shape is a placeholder: `from_config` looks the tensor up by history)."""
    out = copy.deepcopy(like)
    out["config"]["keras_history"] = [name, 0, index]
    return out


def call_node(ref_tensor: dict) -> dict:
    return {"args": [ref_tensor], "kwargs": {}}


@dataclass
class Graph:
    """Layer configs in order, the layer objects, and who reads what."""

    kind: str
    config: dict
    entries: list = field(default_factory=list)
    layers: dict = field(default_factory=dict)
    readers: dict = field(default_factory=lambda: defaultdict(list))
    inputs: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)
    first_ref: dict = field(default_factory=dict)

    @classmethod
    def of(cls, model) -> Graph:
        kind = model_kind(model)
        config = copy.deepcopy(model.get_config())
        graph = cls(kind=kind, config=config)
        # Operations too (`keras.ops` calls in the graph, e.g. a split), which
        # `model.layers` leaves out but the config lists.
        graph.layers = {op.name: op for op in getattr(model, "operations", model.layers)}
        entries = config["layers"]
        previous = None
        for entry in entries:
            if kind == "sequential":
                # A chain: each layer reads the previous one's output.
                name = entry["config"]["name"]
                nodes = [] if previous is None else [[(previous, 0, 0)]]
                previous = name
            else:
                name = entry["name"]
                nodes = [list(tensor_refs(node)) for node in entry["inbound_nodes"]]
                for node in entry["inbound_nodes"]:
                    for obj in _tensor_dicts(node):
                        graph.first_ref.setdefault(name, obj)
            graph.entries.append((name, entry))
            graph.calls[name] = len(nodes)
            graph.inputs[name] = [ref for node in nodes for ref in node]
            for ref in graph.inputs[name]:
                graph.readers[ref].append(name)
        outputs = (
            [(previous, 0, 0)] if kind == "sequential"
            else list(output_refs(config["output_layers"]))
        )
        for ref in outputs:
            graph.readers[ref].append(OUTPUT)
        return graph

    def class_name(self, name: str) -> str:
        return dict(self.entries)[name]["class_name"] if name != OUTPUT else OUTPUT

    def sole_reader(self, name: str) -> str | None:
        readers = self.readers.get((name, 0, 0), [])
        return readers[0] if len(readers) == 1 else None


def _tensor_dicts(obj):
    if isinstance(obj, dict):
        if obj.get("class_name") == TENSOR:
            yield obj
        else:
            for value in obj.values():
                yield from _tensor_dicts(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensor_dicts(value)


def serialize(layer, name: str, inbound_nodes: list | None) -> dict:
    """A layer's config entry as the model config lists it."""
    entry = keras.saving.serialize_keras_object(layer)
    entry["config"]["name"] = name
    if inbound_nodes is not None:
        entry["name"] = name
        entry["inbound_nodes"] = inbound_nodes
    return entry


def _classes(model) -> dict:
    """Every layer class in `model` (nested models too), by the names a config
    may use, so that unregistered custom layers deserialize."""
    classes = {}
    for layer in model.layers:
        cls = type(layer)
        classes[cls.__name__] = cls
        classes[keras.saving.get_registered_name(cls)] = cls
        if isinstance(layer, keras.Model):
            classes.update(_classes(layer))
    return classes


def rebuild(graph: Graph, new_entries: list, mapping: dict, model):
    """The model from rewritten layer entries (in order) and tensor renames."""
    config = copy.deepcopy(graph.config)
    if graph.kind == "sequential":
        config["layers"] = list(new_entries)
        build = keras.Sequential.from_config
    else:
        config["layers"] = [
            {**entry, "inbound_nodes": remap_refs(entry["inbound_nodes"], mapping)}
            for entry in new_entries
        ]
        config["output_layers"] = remap_outputs(config["output_layers"], mapping)
        build = keras.Model.from_config
    try:
        return build(config, custom_objects=_classes(model))
    except Exception as err:
        raise ValueError(
            f"Could not rebuild `model` ({model.name}) from its config: {err}\n"
            "Every layer must be re-creatable from `layer.get_config()` (custom layers: "
            "implement `get_config` returning the `__init__` arguments)."
        ) from err


def unique_name(base: str, taken: set) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name
