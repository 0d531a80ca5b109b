"""The BN -> ReLU -> linear unit with BLPA's memory-saving custom gradient.

`bn_relu_linear` is the one place where the method lives: the forward pass
runs at full precision; the gradient function keeps only the packed codes of
`xhat` (or `xhat` itself when `bits=None`), the per-channel statistics and the
weights. The linear map (convolution or dense) is pluggable.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import tensorflow as tf

from keras_blpa import grid
from keras_blpa.backend.tensorflow import kernels, quantizer, xla

try:  # Internal API, used only to save memory in eager mode.
    from tensorflow.python.eager import record as _record
except ImportError:  # pragma: no cover - other TF versions
    _record = None


class LinearMap(Protocol):
    """What a unit needs from its linear map `outputs = W(a)`.

    A map may have several heads reading the same `a` (a conv and a
    projection shortcut): `weights` and `grads` are lists, one entry per
    weight tensor and per output respectively. The map owns its biases.
    """

    def forward(self, a: tf.Tensor, weights: list[tf.Tensor]) -> list[tf.Tensor]: ...

    def grad_weights(
        self, a: tf.Tensor, grads: list[tf.Tensor], weights: list[tf.Tensor]
    ) -> list[tf.Tensor]: ...

    def grad_input(
        self, weights: list[tf.Tensor], grads: list[tf.Tensor], a_shape: tf.Tensor
    ) -> tf.Tensor: ...


def bn_relu_linear(
    x: tf.Tensor,
    gamma: tf.Tensor,
    beta: tf.Tensor,
    weights: list[tf.Tensor],
    *,
    linear: LinearMap,
    bits: int | None,
    naive: bool,
    epsilon: float,
    window: float | None = None,
    synchronized: bool = False,
    negative_slope: float = 0.0,
    max_value: float | None = None,
    name: str = "bn_relu_linear",
) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:
    """Training-mode forward of BN (batch statistics) -> ReLU -> linear.

    Args:
      x: input, channels last, in the compute dtype.
      gamma, beta: float32 `[C]` (ones / zeros when BN has no scale / center).
      weights: the linear map's weights (kernels, biases) in the compute dtype.
      linear: the linear map.
      bits: 4, 8 or None (keep `xhat` exactly).
      naive: quantize in the forward pass too (the paper's baseline).
      epsilon: BN's epsilon.
      window: quantizer range in standard deviations (None: the default for
        `bits`, see `quantizer.DEFAULT_WINDOW`).
      synchronized: take the batch moments over the global batch of a
        `tf.distribute` strategy (all-reduced across replicas), and all-reduce
        the backward's per-channel sums, so that every replica's gradients are
        those of one replica on the concatenated batch. With one replica in
        sync, or outside any replica context, this is the unsynchronized unit.
      negative_slope: leaky ReLU, `y if y > 0 else negative_slope * y` (as
        `tf.nn.leaky_relu`); 0 is the ReLU. The codes do not depend on it.
      max_value: cap the ReLU, `min(max(y, 0), max_value)` (ReLU6: 6), with
        a second grid edge at the cap's kink (`quantizer.cap_params`); None:
        no cap. Needs `negative_slope=0`. With `bits=None` a capped unit
        runs the pure-TF exact path (the op's exact kernels have no cap).
      name: the layer's name, for the error on second-order gradients.

    Returns:
      `(outputs, mean, variance)`: the linear map's outputs, and the batch
      moments (float32 `[C]`, no gradient) for the moving-average update.
    """
    axes = list(range(x.shape.rank - 1))
    compute_dtype = x.dtype
    # Looked up while tracing the forward; the gradient runs in the same
    # replica function, so the backward's all-reduce uses the same context.
    replica = _sync_context(synchronized)
    # Rounded as the op's float attr is, so that every path agrees.
    slope = _float32_slope(negative_slope)
    cap = grid.resolve_max_value(max_value, slope)

    def unit(*inputs):
        # Stop the outer tape from recording (and keeping alive) the forward's
        # full-precision intermediates in eager mode.
        x, gamma, beta, *weights = (tf.stop_gradient(t) for t in inputs)
        x32 = tf.cast(x, tf.float32)
        if replica is None:
            mean, variance = tf.nn.moments(x32, axes)
        else:
            mean, variance, count = _global_moments(x32, axes, replica, name)
        inv_std = tf.math.rsqrt(variance + epsilon)
        x_shape = tf.shape(x)
        if bits is None and cap is not None:
            saved, _, _, a = quantizer.normalize_relu_capped(
                x32, mean, inv_std, gamma, beta, cap
            )
        elif bits is None:
            a, saved = kernels.bn_relu_exact(
                x32, mean, inv_std, gamma, beta, negative_slope=slope
            )
        else:
            params = quantizer.quantizer_params(gamma, beta, bits, window, max_value=cap)
            caps = None if cap is None else quantizer.cap_params(gamma, beta, params, bits, cap)
            codes = _Codes(bits, params, x_shape, slope, caps)
            a, saved = codes.encode(x32, mean, inv_std, gamma, beta)
            if naive:
                # `+ 0 * a`: the codes are finite even for a NaN or Inf input;
                # the exact `a` carries it into the output, as stock layers do.
                a = codes.decode_relu(saved, gamma, beta) + 0.0 * a
        # Finish encoding before the linear map so that graph executors cannot
        # defer the encoder (and keep its float32 inputs alive); under XLA a
        # barrier makes the codes materialize instead of being fused away.
        saved, a = xla.optimization_barrier(saved, a)
        with tf.control_dependencies([saved]):
            outputs = linear.forward(tf.cast(a, compute_dtype), weights)

        # Only the outputs' shapes and dtypes: in eager mode `grad` lives on the
        # tape until the backward pass, and capturing the outputs themselves
        # would keep one full-precision tensor per unit alive.
        output_specs = [(tf.shape(out), out.dtype) for out in outputs]

        def grad(*upstream):
            # Moment gradients are ignored; an unused head gets a zero gradient.
            grads = [
                tf.zeros(shape, dtype) if g is None else g
                for g, (shape, dtype) in zip(upstream[: len(output_specs)], output_specs)
            ]
            # Decode only once the upstream gradient exists, so that graph
            # executors (and XLA) cannot run it early and hold the result.
            saved_now, *grads = xla.optimization_barrier(
                xla.after(saved, grads[0]), *grads
            )
            with tf.control_dependencies(grads):
                if bits is None and cap is not None:
                    a_approx = quantizer.relu_exact_capped(saved_now, gamma, beta, cap)
                elif bits is None:
                    a_approx = kernels.relu_exact(
                        saved_now, gamma, beta, negative_slope=slope
                    )
                else:
                    a_approx = codes.decode_relu(saved_now, gamma, beta)
            a_approx = tf.cast(a_approx, compute_dtype)
            d_weights = linear.grad_weights(a_approx, grads, weights)
            del a_approx
            # Sequence the big backprops so that their working sets (and those
            # of neighbouring units) do not overlap.
            with tf.control_dependencies(d_weights):
                # XLA ignores control dependencies: a data gate on the (small)
                # weights keeps the input gradient after the weight gradients.
                weights_now = [xla.after(w, d_weights[0]) for w in weights]
                g_a = tf.cast(linear.grad_input(weights_now, grads, x_shape), tf.float32)
            # With static shapes nothing else ties the second decode to g_a.
            with tf.control_dependencies([g_a]):
                if replica is not None:
                    if bits is None:
                        xhat, mask = saved_now, _exact_mask(saved_now, gamma, beta, cap)
                    else:
                        xhat, mask = codes.decode(saved_now)
                    g_x, d_gamma, d_beta = _global_bn_backward(
                        g_a, xhat, mask, gamma, inv_std, count, replica, name, slope
                    )
                    del xhat, mask
                elif bits is None and cap is not None:
                    g_x, d_gamma, d_beta = quantizer.relu_bn_backward(
                        g_a, saved_now, _exact_mask(saved_now, gamma, beta, cap), gamma,
                        inv_std,
                    )
                elif bits is None:
                    g_x, d_gamma, d_beta = kernels.bn_backward_exact(
                        g_a, saved_now, gamma, beta, inv_std, negative_slope=slope
                    )
                else:
                    g_x, d_gamma, d_beta = codes.decode_bn_backward(
                        g_a, saved_now, gamma, inv_std
                    )
            return _first_order_only(
                [tf.cast(g_x, compute_dtype), d_gamma, d_beta, *d_weights], name
            )

        return (*outputs, mean, variance), grad

    inputs = [x, gamma, beta, *weights]
    if tf.executing_eagerly() and _record is not None:
        # Eager `tf.custom_gradient` keeps the forward's result alive on the
        # tape (one full-precision tensor per unit); record the same
        # forward/gradient pair directly so that only `grad`'s captures stay.
        results, grad = unit(*inputs)
        _record.record_operation("BNReLULinear", list(results[:-2]), inputs, grad)
    else:
        results = tf.custom_gradient(unit)(*inputs)
    *outputs, mean, variance = results
    return outputs, tf.stop_gradient(mean), tf.stop_gradient(variance)


def _exact_mask(xhat, gamma, beta, cap: float | None) -> tf.Tensor:
    """The gradient mask rebuilt from the exact `xhat`: `y > 0`, and below the cap."""
    if cap is None:
        return quantizer.exact_mask(xhat, gamma, beta)
    return quantizer.exact_masks_capped(xhat, gamma, beta, cap)[0]


def _float32_slope(negative_slope: float) -> float:
    return float(np.float32(negative_slope))


def _sync_context(synchronized: bool) -> tf.distribute.ReplicaContext | None:
    """The replica context to all-reduce in, or None when there is nothing to sync.

    None unless `synchronized`, inside a replica context (`strategy.run`,
    `model.fit`), with more than one replica in sync. Cross-replica context
    (a call under `strategy.scope()` but outside `strategy.run`) uses the
    local batch, as `keras.layers.BatchNormalization(synchronized=True)` does.
    """
    if not synchronized:
        return None
    replica = tf.distribute.get_replica_context()
    if replica is None or replica.num_replicas_in_sync <= 1:
        return None
    return replica


def _all_reduce_sum(replica, value: tf.Tensor, name: str) -> tf.Tensor:
    """`replica.all_reduce(SUM, value)`, with an error that names the strategy."""
    try:
        return replica.all_reduce(tf.distribute.ReduceOp.SUM, value)
    except NotImplementedError as err:
        strategy = type(replica.strategy).__name__
        raise ValueError(
            f"{name!r} has synchronized=True, but {strategy} cannot all-reduce "
            f"across its replicas ({err}). Use synchronized=False with this "
            "strategy, or a strategy whose replicas all-reduce (MirroredStrategy, "
            "MultiWorkerMirroredStrategy, TPUStrategy)."
        ) from err


def _global_moments(
    x32: tf.Tensor, axes: list[int], replica, name: str
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """`(mean, variance, count)` of the global batch, per channel (float32).

    Two all-reduces: `[sum, count]`, then the sum of squared deviations from
    the global mean (centred, so no `E[x^2] - E[x]^2` cancellation). Each
    replica may hold a different (even empty) share of the batch.
    """
    local_count = tf.cast(tf.reduce_prod(tf.shape(x32)[:-1]), tf.float32)
    totals = _all_reduce_sum(
        replica, tf.concat([tf.reduce_sum(x32, axes), local_count[None]], 0), name
    )
    count = totals[-1]
    mean = totals[:-1] / count
    squares = _all_reduce_sum(
        replica, tf.reduce_sum(tf.math.squared_difference(x32, mean), axes), name
    )
    return mean, squares / count, count


def _global_bn_backward(
    g_a: tf.Tensor,
    xhat: tf.Tensor,
    mask: tf.Tensor,
    gamma: tf.Tensor,
    inv_std: tf.Tensor,
    count: tf.Tensor,
    replica,
    name: str,
    negative_slope: float = 0.0,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """`quantizer.relu_bn_backward` with the per-channel sums of the global batch.

    The input gradient uses the all-reduced sums and the global `count`; the
    returned `d_gamma`, `d_beta` are this replica's own sums, since the
    strategy sums variable gradients across replicas itself.
    """
    axes = list(range(g_a.shape.rank - 1))
    g_y = quantizer.leaky(g_a, mask, negative_slope)
    d_beta = tf.reduce_sum(g_y, axes)
    d_gamma = tf.reduce_sum(g_y * xhat, axes)
    sums = _all_reduce_sum(replica, tf.stack([d_beta, d_gamma]), name)
    g_x = (gamma * inv_std) * (g_y - sums[0] / count - xhat * (sums[1] / count))
    return g_x, d_gamma, d_beta


def _first_order_only(gradients: list[tf.Tensor], name: str) -> list[tf.Tensor]:
    """The unit's gradients, unchanged; differentiating them raises.

    The backward pass is a hand-written first-order gradient computed from the
    saved codes, whose inputs are cut from the forward graph: a tape that
    differentiates it (gradient penalties, nested tapes, Hessian-vector
    products, forward-mode jvp) would get wrong numbers or a missing-gradient
    error from the op. This turns both into one clear error.
    """

    @tf.custom_gradient
    def identity(*tensors):
        def grad(*_):
            raise NotImplementedError(
                f"Second-order gradients through the fused BLPA layer {name!r} are "
                "not supported (a gradient of its gradient: a gradient penalty, "
                "nested GradientTapes, a Hessian-vector product or forward-mode "
                "autodiff). Its backward pass is a first-order gradient rebuilt "
                "from the saved codes, with bits=None too. Build this part of the "
                "model from stock keras.layers.BatchNormalization, ReLU and "
                "Conv2D/Dense layers."
            )

        return [tf.identity(t) for t in tensors], grad

    return identity(*gradients)


class _Codes:
    """How a unit stores its codes: flat bytes, or uint32 words under XLA.

    Outside XLA the compiled op (or its bit-identical pure-TF twin) packs the
    codes into flat bytes. Inside an XLA-compiled function the codes go into
    uint32 words packed by a reduce-window (`quantizer.pack_words`,
    `xla.sum_windows`) and the forward output is tied to them (`xla.tie`):
    XLA:CPU drops optimization barriers before fusion, and without these it
    recomputes the codes from the float32 input inside the backward pass,
    keeping that input alive. Both layouts hold the same codes, a capped
    ReLU's (`cap`) too.
    """

    def __init__(
        self, bits: int, params: quantizer.QuantParams, shape: tf.Tensor, slope: float,
        cap: quantizer.CapParams | None = None,
    ):
        self.bits = bits
        self.params = params
        self.shape = shape
        self.slope = slope
        self.cap = cap
        self.words = xla.in_xla_context()

    def _decode_capped_words(self, codes):
        return quantizer.decode_capped(codes, self.params, self.cap, self.shape, self.bits,
                                       words=True)

    def encode(self, x32, mean, inv_std, gamma, beta) -> tuple[tf.Tensor, tf.Tensor]:
        """`(a, codes)`: the exact ReLU output and the packed codes."""
        if not self.words:
            return kernels.bn_relu_encode(
                x32, mean, inv_std, gamma, beta, self.params, self.bits,
                negative_slope=self.slope, cap=self.cap,
            )
        if self.cap is not None:
            a, words = quantizer.bn_relu_encode_capped(
                x32, mean, inv_std, gamma, beta, self.params, self.cap, self.bits,
                words=True, sum_windows=xla.sum_windows(),
            )
            return xla.tie(a, words), words
        a, words = quantizer.bn_relu_encode_words(
            x32, mean, inv_std, gamma, beta, self.params, self.bits, xla.sum_windows(),
            negative_slope=self.slope,
        )
        return xla.tie(a, words), words

    def decode_relu(self, codes, gamma, beta) -> tf.Tensor:
        if not self.words:
            return kernels.decode_relu(
                codes, self.params, gamma, beta, self.shape, self.bits,
                negative_slope=self.slope, cap=self.cap,
            )
        if self.cap is not None:
            return quantizer.relu_from_decoded_capped(
                *self._decode_capped_words(codes), gamma, beta, self.cap.max_value
            )
        xhat, mask = quantizer.decode_words(codes, self.params, self.shape, self.bits)
        return quantizer.relu_from_decoded(
            xhat, mask, gamma, beta, negative_slope=self.slope
        )

    def decode(self, codes) -> tuple[tf.Tensor, tf.Tensor]:
        """`(xhat, mask)`, float32 and bool of the input's shape."""
        if not self.words:
            return kernels.decode(codes, self.params, self.shape, self.bits, cap=self.cap)
        if self.cap is not None:
            return self._decode_capped_words(codes)[:2]
        return quantizer.decode_words(codes, self.params, self.shape, self.bits)

    def decode_bn_backward(self, g_a, codes, gamma, inv_std):
        if not self.words:
            return kernels.decode_bn_backward(
                g_a, codes, self.params, gamma, inv_std, self.bits,
                negative_slope=self.slope, cap=self.cap,
            )
        if self.cap is not None:
            xhat, mask, _ = self._decode_capped_words(codes)
            return quantizer.relu_bn_backward(g_a, xhat, mask, gamma, inv_std)
        xhat, mask = quantizer.decode_words(codes, self.params, self.shape, self.bits)
        return quantizer.relu_bn_backward(
            g_a, xhat, mask, gamma, inv_std, negative_slope=self.slope
        )


def bn_relu_linear_inference(
    x: tf.Tensor,
    mean: tf.Tensor,
    variance: tf.Tensor,
    gamma: tf.Tensor,
    beta: tf.Tensor,
    weights: list[tf.Tensor],
    *,
    linear: LinearMap,
    bits: int | None,
    naive: bool,
    epsilon: float,
    window: float | None = None,
    negative_slope: float = 0.0,
    max_value: float | None = None,
    name: str = "bn_relu_linear",
) -> list[tf.Tensor]:
    """Forward with given statistics (inference): plain ops, plain autodiff.

    Only `naive=True` quantizes here: its approximation is part of the model.
    It runs in plain TF ops, never the compiled op, so that exported models
    (`model.export`, SavedModel) load and serve without keras_blpa.
    """
    x32 = tf.cast(x, tf.float32)
    inv_std = tf.math.rsqrt(variance + epsilon)
    y = (x32 - mean) * inv_std * gamma + beta
    negative_slope = _float32_slope(negative_slope)
    cap = grid.resolve_max_value(max_value)
    if cap is not None:
        # As `keras.layers.ReLU(max_value=cap)` computes it.
        a = tf.nn.relu6(y) if cap == 6.0 else tf.clip_by_value(tf.nn.relu(y), 0.0, cap)
    else:
        a = tf.nn.leaky_relu(y, negative_slope) if negative_slope else tf.nn.relu(y)
    if naive and bits is not None:
        params = quantizer.quantizer_params(gamma, beta, bits, window, max_value=cap)
        if cap is not None:
            a_quantized = quantizer.quantize_relu_capped(
                x32, mean, inv_std, gamma, beta, params,
                quantizer.cap_params(gamma, beta, params, bits, cap), bits,
            )
        else:
            a_quantized = quantizer.quantize_relu(
                x32, mean, inv_std, gamma, beta, params, bits, negative_slope=negative_slope
            )
        # Straight-through: the quantized value forward (bit for bit: `a - a`
        # is exactly 0 for finite `a`, NaN for NaN or Inf, which so surfaces),
        # the exact ReLU's gradient backward, so that a frozen naive layer
        # still passes gradients to the layers before it.
        a = tf.stop_gradient(a_quantized) + (a - tf.stop_gradient(a))
    return linear.forward(tf.cast(a, x.dtype), weights)
