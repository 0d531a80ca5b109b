"""XLA awareness: detect an XLA-compiled context and keep XLA from re-fusing.

The helpers wrap internal TensorFlow APIs (checked on TF 2.21) and degrade to
"not XLA" / identity / plain TF when those move, each with one warning that
names what is lost (the memory savings under XLA, or XLA support itself).
"""

from __future__ import annotations

import warnings

import tensorflow as tf

try:
    from tensorflow.python.framework import ops as _tf_ops
    from tensorflow.python.ops import control_flow_util as _cf_util
except ImportError:  # pragma: no cover - other TF versions
    _cf_util = None

try:
    from tensorflow.compiler.tf2xla.ops import gen_xla_ops as _gen_xla_ops
except ImportError:  # pragma: no cover - other TF versions
    _gen_xla_ops = None


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"keras_blpa: {message}", RuntimeWarning, stacklevel=3)


def in_xla_context() -> bool:
    """True while tracing a function that XLA will compile (jit_compile, TPU)."""
    if tf.executing_eagerly():
        return False
    if _cf_util is None:
        _warn_once(
            "detect",
            f"cannot detect XLA compilation in TensorFlow {tf.__version__} (internal "
            "API moved): under jit_compile=True or on TPU the fused layers emit the "
            "compiled op, which has no XLA kernel. Set KERAS_BLPA_DISABLE_CUSTOM_OPS=1 "
            "there (pure TF everywhere; the XLA memory savings are then not assured).",
        )
        return False
    return bool(_cf_util.GraphOrParentsInXlaContext(_tf_ops.get_default_graph()))


def optimization_barrier(*tensors: tf.Tensor) -> list[tf.Tensor]:
    """XLA optimization barrier over `tensors` (identity outside XLA).

    Under XLA, elementwise producers are fused into their consumers: without a
    barrier the backward's decode would be fused with the forward's encode and
    read the full-precision input, which then stays alive. Passing the codes
    through a barrier (together with the upstream gradient in the backward)
    forces XLA to materialize the codes and to decode only after the gradient
    exists.
    """
    if not in_xla_context():
        return list(tensors)
    if _gen_xla_ops is None or not hasattr(_gen_xla_ops, "xla_optimization_barrier"):
        _warn_once(
            "barrier",
            f"XLA's optimization barrier is not reachable in TensorFlow {tf.__version__}; "
            "on GPU and TPU XLA may then fuse the saved codes into the backward pass "
            "and keep float32 activations alive (memory close to stock layers).",
        )
        return list(tensors)
    return list(_gen_xla_ops.xla_optimization_barrier(list(tensors)))


def after(tensor: tf.Tensor, gate: tf.Tensor) -> tf.Tensor:
    """`tensor`, made data-dependent on `gate` under XLA (identity elsewhere).

    XLA drops control dependencies and, on CPU, expands optimization barriers
    before fusion, so its scheduler may hoist a decode that only depends on
    saved codes into the forward pass. A select on a predicate computed from
    `gate` cannot be folded away. The predicate is a full sum of `gate`: XLA
    gives a reduction a kernel of its own and does not duplicate it into its
    consumers, so the decode reads one scalar. (A predicate read from one
    element was fused, with the whole elementwise producer of `gate`, into
    every decode, which kept the previous unit's backward buffers alive.) The
    predicate is False only when the sum is NaN; then floats (weights,
    per-row scales) become NaN and integer codes zero, so the gradient is NaN
    too (zeros everywhere made a NaN upstream gradient finite, wrong weight
    gradients).
    """
    if not in_xla_context():
        return tensor
    total = tf.reduce_sum(gate)
    poison = (tf.fill(tf.shape(tensor), tf.constant(float("nan"), tensor.dtype))
              if tensor.dtype.is_floating else tf.zeros_like(tensor))
    return tf.where(tf.equal(total, total), tensor, poison)


@tf.function(autograph=False)
def _bitwise_or(a, b):
    return tf.bitwise.bitwise_or(a, b)


def _reduce_window_or(t: tf.Tensor, axis: int, k: int) -> tf.Tensor:
    rank = t.shape.rank
    window = [1] * rank
    window[axis] = k
    # Zero padding after the last element; tf2xla folds it to a constant.
    high = tf.one_hot(axis, rank, on_value=-tf.shape(t)[axis] % k, off_value=0, dtype=tf.int32)
    padding = tf.stack([tf.zeros([rank], tf.int32), high], axis=1)
    spec = tf.TensorSpec([], t.dtype)
    return _gen_xla_ops.xla_reduce_window(
        input=t,
        init_value=tf.zeros([], t.dtype),
        window_dimensions=window,
        window_strides=window,
        base_dilations=[1] * rank,
        window_dilations=[1] * rank,
        padding=padding,
        computation=_bitwise_or.get_concrete_function(spec, spec),
    )


def sum_windows():
    """`f(t, axis, k)` packing windows of `k` along `axis` with one XLA
    reduce-window (bitwise or of disjoint bit fields; zero padding), or None.

    Why a reduce-window: XLA:CPU removes optimization barriers before fusion
    and then fuses cheap elementwise producers into their consumers, so codes
    computed elementwise from the forward input are recomputed inside the
    backward, which keeps the float32 input alive. A reduce-window is never
    loop-fused into a consumer on CPU: its result (the packed codes) is a
    buffer of its own, and only that buffer lives until the backward.

    None (with one warning) when the internal op is not reachable.
    """
    if _gen_xla_ops is not None and hasattr(_gen_xla_ops, "xla_reduce_window"):
        return _reduce_window_or
    _warn_once(
        "reduce_window",
        f"XLA's reduce-window op is not reachable in TensorFlow {tf.__version__}; "
        "under jit_compile the fused layers pack their codes with plain ops that "
        "XLA:CPU may fuse into the backward pass, keeping the float32 activations "
        "alive (memory close to stock layers).",
    )
    return None


def tie(tensor: tf.Tensor, source: tf.Tensor) -> tf.Tensor:
    """`tensor`, made data-dependent on `source` under XLA (identity elsewhere).

    Adds `0 * source[0, ..., 0]`, which float semantics keep XLA from folding
    (`0 * x` is NaN for non-finite `x`), so every scheduler must finish
    `source` (a unit's codes) before `tensor` (its forward output) is used:
    the codes are encoded during the forward pass, not deferred next to the
    backward with the float32 input kept alive. `source` must be finite
    (integer codes are).
    """
    if not in_xla_context():
        return tensor
    rank = source.shape.rank
    first = tf.reshape(tf.slice(source, [0] * rank, [1] * rank), [])
    return tensor + 0.0 * tf.cast(first, tensor.dtype)
