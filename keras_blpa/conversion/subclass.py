"""Functional subclasses: KerasHub backbones and tasks, and user classes.

A class that subclasses Keras's `Functional` (every KerasHub `Backbone` and
`Task`, or a user's `class Net(keras.Model)` whose `__init__` calls
`super().__init__(inputs, outputs)`) has its layer graph like any Functional
model, but its `get_config` returns its constructor's arguments, not the
graph. `convert` and `to_standard` rewrite it as `keras.Model(model.input,
model.output)`: a plain Functional model over the same layers, so with the
same inputs, outputs and weights. A KerasHub task (a model with a nested
`backbone` that its `get_config` names) is rebuilt as its own class around
the rewritten backbone, so that its preprocessor, head, `fit` and saving
stay as they were.
"""

from __future__ import annotations

import keras


def _functional_class():
    # Internal: Keras exports no Functional class (`graph.model_kind` uses it too).
    from keras.src.models.functional import Functional

    return Functional


def is_functional(model) -> bool:
    return isinstance(model, _functional_class())


def is_functional_subclass(model) -> bool:
    """A Functional model of a class of its own (not `keras.Model(inputs, outputs)`)."""
    functional = _functional_class()
    return isinstance(model, functional) and type(model) is not functional


def as_functional(model) -> keras.Model:
    """`model`'s graph as a plain Functional model over the same layers."""
    plain = keras.Model(model.input, model.output, name=model.name)
    plain.trainable = model.trainable
    return plain


def task_backbone(model) -> keras.Model | None:
    """The backbone of a KerasHub-style task, else None.

    A task here is a Functional subclass with a `backbone` attribute that is
    one of its layers and a `get_config()` that names it (KerasHub's `Task`
    protocol: `type(task).from_config(config)` builds the task around
    `config["backbone"]`).
    """
    if not is_functional_subclass(model):
        return None
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, keras.Model) or not any(
        layer is backbone for layer in model.layers
    ):
        return None
    try:
        config = model.get_config()
    except Exception:  # noqa: BLE001 - any failure: not a task we can rebuild
        return None
    return backbone if isinstance(config, dict) and "backbone" in config else None


def rebuild_task(task, backbone: keras.Model) -> keras.Model:
    """`task`'s class around `backbone`, with `task`'s preprocessor and the
    weights of its other layers (the head), matched by name."""
    config = dict(task.get_config())
    config["backbone"] = backbone
    if "preprocessor" in config:
        config["preprocessor"] = getattr(task, "preprocessor", None)
    try:
        new = type(task).from_config(config)
    except Exception as err:
        raise ValueError(
            f"`model` ({task.name}) is a {type(task).__name__} around the backbone "
            f"{task.backbone.name}, but {type(task).__name__}.from_config could not "
            f"rebuild it around the converted backbone: {err}. Convert the backbone "
            "(`model.backbone`) alone and build the task around it."
        ) from err
    for layer in new.layers:
        if layer is backbone or not layer.weights:
            continue
        layer.set_weights(task.get_layer(layer.name).get_weights())
    new.trainable = task.trainable
    return new


def note(model, task: bool = False) -> str:
    """The report's line for a Functional subclass."""
    cls = type(model).__name__
    if task:
        return (
            f"{model.name} is a {cls} (a task): rebuilt as a {cls} with the same "
            f"preprocessor, head and weights around its backbone {model.backbone.name}, "
            "whose layers were rewritten."
        )
    return (
        f"{model.name} is a {cls} (a Functional subclass): the result is a plain "
        "Functional model (keras.Model(inputs, outputs)) with the same inputs, outputs "
        f"and weights. What {cls} adds to Functional (its own methods and attributes, "
        "its get_config and presets) is not kept."
    )
