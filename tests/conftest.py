import importlib.util
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from kernel_requirement import kernels_unavailable  # noqa: E402


@pytest.fixture(autouse=True)
def _float32_policy_and_seed():
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="module")
def op_lib():
    """The loaded TF op library (its raw ops)."""
    import warnings

    from keras_blpa.backend.tensorflow import kernels

    if kernels.disabled():
        pytest.skip("KERAS_BLPA_DISABLE_CUSTOM_OPS is set")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = kernels.load()
    if module is None:
        kernels_unavailable(f"custom op library unavailable: {kernels.load_error()}")
    return module


@pytest.fixture(params=["custom_op", "pure_tf"])
def implementation(request, monkeypatch):
    """Runs a test on both paths: the compiled op and pure TF."""
    from keras_blpa import ops

    if request.param == "pure_tf":
        monkeypatch.setenv("KERAS_BLPA_DISABLE_CUSTOM_OPS", "1")
    elif ops.implementation() != "custom_op":
        kernels_unavailable("compiled op unavailable")
    assert ops.implementation() == request.param
    return request.param


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def load_example():
    """Imports `examples/<name>.py` as a module."""

    def load(name):
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
