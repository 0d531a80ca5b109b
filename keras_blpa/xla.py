"""XLA awareness: detect an XLA-compiled context and keep XLA from re-fusing.

Both helpers wrap internal TensorFlow APIs (checked on TF 2.21) and degrade to
"not XLA" / identity when those move.
"""

from __future__ import annotations

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


def in_xla_context() -> bool:
    """True while tracing a function that XLA will compile (jit_compile, TPU)."""
    if _cf_util is None or tf.executing_eagerly():
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
    if _gen_xla_ops is None or not in_xla_context():
        return list(tensors)
    return list(_gen_xla_ops.xla_optimization_barrier(list(tensors)))


def after(tensor: tf.Tensor, gate: tf.Tensor) -> tf.Tensor:
    """`tensor`, made data-dependent on `gate` under XLA (identity elsewhere).

    XLA drops control dependencies and, on CPU, expands optimization barriers
    before fusion, so its scheduler may hoist a decode that only depends on
    saved codes into the forward pass. A select on a predicate read from
    `gate` cannot be folded away. The predicate is False only when the first
    element of `gate` is NaN, in which case the gradient is NaN anyway.
    """
    if not in_xla_context():
        return tensor
    first = tf.reshape(gate, [-1])[0]
    return tf.where(tf.equal(first, first), tensor, tf.zeros_like(tensor))
