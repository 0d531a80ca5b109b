"""The package layout: TensorFlow stays inside `keras_blpa/backend/tensorflow/`,
everything else imports on JAX without it, and the old module paths still
import (for one release) as the new modules, with a warning naming them."""

import ast
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "keras_blpa"
TF_PACKAGE = PACKAGE / "backend" / "tensorflow"


def _module_level_imports(path: Path) -> set[str]:
    """Top-level package names imported at module level (not inside functions)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_tensorflow_package_imports_tensorflow_at_module_level():
    stray = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if TF_PACKAGE in path.parents:
            continue
        imported = _module_level_imports(path)
        if imported & {"tensorflow", "tensorflow_datasets"}:
            stray.append(str(path.relative_to(PACKAGE)))
    assert not stray, f"TensorFlow imported at module level outside backend/tensorflow/: {stray}"


def test_the_checker_sees_a_module_level_import(tmp_path):
    # The check above can fail: a module-level TF import is found.
    module = tmp_path / "m.py"
    module.write_text("import numpy\nfrom tensorflow import nn\n\ndef f():\n    import jax\n")
    assert _module_level_imports(module) == {"numpy", "tensorflow"}


def test_both_backends_name_the_same_roles_alike():
    from keras_blpa import backend

    for name, roles in backend.ROLES.items():
        files = {p.stem for p in (PACKAGE / "backend" / name).glob("*.py")} - {"__init__"}
        assert files == set(roles), name
    # The roles JAX has are TensorFlow's, under the same names.
    assert set(backend.ROLES["jax"]) <= set(backend.ROLES["tensorflow"])


_WITHOUT_TENSORFLOW = textwrap.dedent(
    """
    import importlib, sys
    import importlib.abc

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
                raise ImportError(f"blocked for this test: {name}")
            return None

    sys.meta_path.insert(0, Block())

    import numpy as np
    import keras
    assert keras.backend.backend() == "jax"
    import keras_blpa
    from keras_blpa import backend, grid, validation, profiling, xla_dump, datasets, training
    from keras_blpa import conversion, layers, models
    for role in backend.ROLES["jax"]:
        backend.module(role)

    # The blocker works: the TensorFlow package does not import.
    try:
        importlib.import_module("keras_blpa.backend.tensorflow.quantizer")
    except ImportError:
        pass
    else:
        raise AssertionError("keras_blpa.backend.tensorflow imported without TensorFlow")

    # keras_blpa.ops imports, and names the jnp twin when used.
    from keras_blpa import ops
    try:
        ops.encode
    except ImportError as err:
        assert "keras_blpa.backend.jax.quantizer" in str(err), err
    else:
        raise AssertionError("keras_blpa.ops.encode resolved without TensorFlow")

    # A fused model builds, trains a step and converts on JAX.
    model = models.preact_resnet_cifar(depth=11, classes=3, input_shape=(8, 8, 3), bits=4)
    model.compile("sgd", "sparse_categorical_crossentropy")
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")
    model.fit(x, np.array([0, 1, 2, 0]), epochs=1, batch_size=4, verbose=0)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, padding="same")(inp)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
    out = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(
        keras.layers.Conv2D(4, 3)(h)))
    converted, report = keras_blpa.convert(keras.Model(inp, out), return_report=True)
    assert report.fused, report
    assert "tensorflow" not in sys.modules
    print("ok")
    """
)


def test_everything_outside_the_tensorflow_package_imports_on_jax_without_tensorflow():
    pytest.importorskip("jax")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TENSORFLOW], env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        result.stdout[-3000:] + result.stderr[-3000:]
    )


@pytest.mark.parametrize("old", [
    "keras_blpa.unit", "keras_blpa.relu_unit", "keras_blpa.bn_unit", "keras_blpa.quantizer",
    "keras_blpa.custom_op", "keras_blpa.linear", "keras_blpa.xla",
])
def test_old_tensorflow_paths_are_the_new_modules_and_say_where(old):
    import importlib

    from keras_blpa import _moved

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    new = _moved.MOVED[old]
    assert module is importlib.import_module(new)
    assert any(issubclass(w.category, FutureWarning) and new in str(w.message) for w in caught)


def test_old_jax_paths_are_the_new_modules():
    pytest.importorskip("jax")
    import importlib

    from keras_blpa import _moved

    for old in [name for name in _moved.MOVED if "jax_backend" in name]:
        sys.modules.pop(old, None)
        with pytest.warns(FutureWarning, match=_moved.MOVED[old].replace(".", r"\.")):
            module = importlib.import_module(old)
        assert module is importlib.import_module(_moved.MOVED[old])
    from keras_blpa.jax_backend import ffi  # the old spelling of the loader

    assert ffi.usable is importlib.import_module("keras_blpa.backend.jax.kernels").usable
