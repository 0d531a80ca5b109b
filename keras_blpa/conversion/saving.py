"""Saving and loading a converted model whose config does not list its layers.

A KerasHub backbone (and any Functional subclass with a `get_config` of its
own) serializes its constructor's arguments, not its layers: saved as it is,
a converted backbone would load with stock blocks. So `convert` gives such a
model a class of its own, a subclass of its class (same name, methods and
`isinstance`) whose `get_config` adds, under the key `"keras_blpa"`, the
conversion's options and which of its layers were converted. Keras saves it
under the registered name `keras_blpa>ConvertedModel`; loading builds the
stock model from its config, converts the same layers again, and Keras then
loads the saved weights into it, on either backend.

Loading needs `import keras_blpa` first (the name is registered on import).
Without it Keras finds the stock class, whose constructor ignores the key:
the stock model with the same weights, to serve without keras_blpa.
"""

from __future__ import annotations

import functools

import keras

KEY = "keras_blpa"
REGISTERED_NAME = "keras_blpa>ConvertedModel"


class ConvertedModel:
    """The mixin of every converted class; registered for loading (module docstring)."""

    _blpa_conversion: dict

    def get_config(self) -> dict:
        stock = stock_class(type(self))
        config = dict(super().get_config())
        config[KEY] = {
            **self._blpa_conversion,
            "class": {"module": stock.__module__, "class_name": stock.__name__,
                      "registered_name": keras.saving.get_registered_name(stock)},
        }
        return config

    @classmethod
    def from_config(cls, config: dict, custom_objects=None):
        from keras_blpa.conversion import transformers

        config = dict(config)
        conversion = dict(config.pop(KEY))
        stock = keras.saving.deserialize_keras_object(
            {**conversion.pop("class"), "config": config}, custom_objects=custom_objects)
        transformers.reconvert(stock, conversion)
        return stock


keras.saving.register_keras_serializable(package="keras_blpa", name="ConvertedModel")(
    ConvertedModel)


@functools.cache
def _converted_class(stock: type) -> type:
    cls = type(stock.__name__, (ConvertedModel, stock),
               {"__module__": stock.__module__, "__qualname__": stock.__qualname__})
    keras.saving.register_keras_serializable(package="keras_blpa", name="ConvertedModel")(cls)
    # Registering maps the class to the name; loading must find the mixin,
    # whose `from_config` builds whichever stock class the config names.
    keras.saving.get_custom_objects()[REGISTERED_NAME] = ConvertedModel
    return cls


def stock_class(cls: type) -> type:
    """`cls` itself, or the stock class a converted class subclasses."""
    if issubclass(cls, ConvertedModel):
        return next(base for base in cls.__mro__[1:]
                    if not issubclass(base, ConvertedModel))
    return cls


def stock_config(model) -> dict:
    """`model.get_config()` without the conversion's key."""
    config = dict(model.get_config())
    config.pop(KEY, None)
    return config


def needs_mark(model) -> bool:
    """Whether `model`'s config leaves out its layers (a KerasHub backbone):
    saved unmarked, it would load stock."""
    from keras_blpa.conversion import subclass

    if not subclass.is_functional_subclass(model):
        return False
    try:
        config = stock_config(model)
    except Exception:  # noqa: BLE001 - a model that cannot be saved anyway
        return False
    return "layers" not in config


def mark(model, conversion: dict) -> None:
    """Makes `model` (converted in place) save what was converted."""
    model.__class__ = _converted_class(stock_class(type(model)))
    model._blpa_conversion = conversion

