"""The gradient BLPA is meant to compute, from the codes a layer saved.

For a `BN -> ReLU -> linear` unit that is: stock autodiff of the linear map
(float64 Keras layers with the fused layer's weights) at the activation
rebuilt from the codes, the forward pass's exact ReLU mask (beyond the
grid's window, the mask the method specifies: `specified_mask`), and BN's
backward with the decoded `xhat` in place of the exact one. The codes are
unpacked and decoded here in float64 NumPy, independently of the library's
decoders; only the grid's per-channel parameters (`quantizer_params`, a
function of gamma and beta alone) come from the library.

`check_codes` checks what the codes must hold (every mask bit exact, every
value inside the grid within half a bin); `check_gradients` compares a
layer's gradients with the oracle's by relative error (norm of the
difference over the norm of the oracle's gradient).
"""

from __future__ import annotations

import keras
import numpy as np

from keras_blpa import grid

# The BN units every backend's oracle test runs, by name: `make(bits)`.
BN_UNITS = {
    "conv": lambda bits: _fused().BNReLUConv2D(6, 3, bits=bits),
    "conv_strided_valid": lambda bits: _fused().BNReLUConv2D(5, 3, strides=2, padding="valid",
                                                             bits=bits),
    "conv_projection": lambda bits: _fused().BNReLUConv2D(6, 3, strides=2, projection_filters=4,
                                                          projection_strides=2, bits=bits),
    "conv_leaky": lambda bits: _fused().BNReLUConv2D(6, 3, bits=bits, negative_slope=0.1),
    "conv_capped": lambda bits: _fused().BNReLUConv2D(6, 3, bits=bits, max_value=1.5),
    "dense_pooled": lambda bits: _fused().BNReLUDense(7, pooling="avg", bits=bits),
}


# The ReLU-only units every backend's oracle test runs, by name: `make(bits)`
# ("relu_dense" takes a matrix, the others NHWC).
RELU_UNITS = {
    "relu_conv": lambda bits: _fused().ReLUConv2D(6, 3, bits=bits),
    "relu_conv_activation": lambda bits: _fused().ReLUConv2D(5, 1, strides=2, bits=bits,
                                                             return_activation=True),
    "relu_dense_pooled": lambda bits: _fused().ReLUDense(7, pooling="avg", bits=bits),
    "relu_dense": lambda bits: _fused().ReLUDense(5, bits=bits),
}


def _fused():
    import keras_blpa

    return keras_blpa


def random_bn_unit(layer, x_shape, seed=0) -> tuple[np.ndarray, list]:
    """Builds `layer` with thresholds spread over the window, both signs of
    gamma and one channel always on; returns an input and upstream gradients."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=x_shape) * 2.0 + 0.5).astype("float32")
    layer.build(x_shape)
    channels = x_shape[-1]
    gamma = rng.uniform(0.5, 1.5, channels) * rng.choice([-1.0, 1.0], channels)
    beta = rng.normal(size=channels)
    beta[0], gamma[0] = 8.0, 1.0  # threshold far below the window
    layer.gamma.assign(gamma.astype("float32"))
    layer.beta.assign(beta.astype("float32"))
    outputs = layer(x, training=False)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    upstream = [rng.normal(size=o.shape).astype("float32") for o in outputs]
    return x, upstream


def unpack(saved: np.ndarray, shape: tuple[int, ...], bits: int, words: bool) -> np.ndarray:
    """Integer codes of `shape` from flat bytes (`pack`: element 2j in the
    low nibble) or from uint32 words (`pack_words`: element i of the word
    axis in word i // k, at bit (i % k) * bits)."""
    saved = np.asarray(saved)
    if not words:
        flat = saved.astype(np.uint8).reshape(-1)
        if bits == 4:
            flat = np.stack([flat & 15, flat >> 4], axis=1).reshape(-1)
        return flat[: int(np.prod(shape))].reshape(shape).astype(np.int64)
    per_word = 32 // bits
    axis = grid.word_axis(len(shape))
    words_arr = np.moveaxis(saved.astype(np.uint64), axis, 0)
    parts = [(words_arr >> (bits * j)) & ((1 << bits) - 1) for j in range(per_word)]
    # Element i = word * per_word + j.
    codes = np.stack(parts, axis=1).reshape(-1, *words_arr.shape[1:])[: shape[axis]]
    return np.moveaxis(codes, 0, axis).astype(np.int64)


def decode(codes: np.ndarray, params, bits: int, cap=None):
    """`(xhat, on, saturated)` in float64: bin centres, the ReLU mask `y > 0`
    and (with a cap) the saturated mask `y >= max_value`."""
    lo, k, flip = (np.asarray(p, np.float64) for p in params[:3])
    width = grid.bin_width(bits, params.window)
    xhat = lo + (codes + 0.5) * width
    on = (codes >= k) != (flip > 0.5)
    saturated = np.zeros_like(on)
    if cap is not None:
        saturated = (codes >= np.asarray(cap.kc)) != (np.asarray(cap.flip) > 0.5)
    return xhat, on, saturated


def exact_forward(x: np.ndarray, gamma, beta, epsilon: float, max_value=None):
    """Float64 batch normalization and masks of the exact forward pass."""
    x = np.asarray(x, np.float64)
    axes = tuple(range(x.ndim - 1))
    mean, var = x.mean(axes), x.var(axes)
    inv_std = 1.0 / np.sqrt(var + epsilon)
    xhat = (x - mean) * inv_std
    y = np.asarray(gamma, np.float64) * xhat + np.asarray(beta, np.float64)
    saturated = np.zeros_like(y, bool) if max_value is None else y >= max_value
    return xhat, inv_std, y, y > 0, saturated


def specified_mask(mask: np.ndarray, xhat: np.ndarray, gamma, beta, window: float,
                   cap=None) -> np.ndarray:
    """The mask the codes must hold (BLPA.md, "The quantizer"): the ReLU's
    `y > 0` (with `cap`, the saturated `y >= cap`), exact, except where a
    channel's kink lies outside the window (`y` stays on one side of it over
    the whole window) and a value lies beyond the window: there the
    channel's mask inside the window holds. In a randomly initialized
    ResNet50V2 (64x64, batch 4) that is 1 or 2 elements of 16k-262k in 6 of
    49 units, 0.001 to 0.12 past the threshold in `y`; in MobileNetV2's
    ReLU6 units up to 51 of 393k."""
    gamma, beta = np.asarray(gamma, np.float64), np.asarray(beta, np.float64)
    half = window / 2

    def side(y):
        return y > 0 if cap is None else y >= cap

    constant = side(-half * gamma + beta) == side(half * gamma + beta)
    return np.where(constant & (np.abs(xhat) > half), side(beta), mask)


def check_codes(codes, params, bits: int, x, gamma, beta, epsilon: float, cap=None) -> None:
    """Every mask bit rebuilt from the codes equals `specified_mask` (away
    from float rounding at the kinks), and every value inside the grid decodes
    within half a bin (1.5 bins where a cap's edge clamps it)."""
    max_value = None if cap is None else cap.max_value
    xhat, _, y, on, saturated = exact_forward(x, gamma, beta, epsilon, max_value)
    on = specified_mask(on, xhat, gamma, beta, params.window)
    if cap is not None:
        saturated = specified_mask(saturated, xhat, gamma, beta, params.window, max_value)
    decoded, on_codes, sat_codes = decode(codes, params, bits, cap)
    clear = np.abs(y) > 1e-5
    if cap is not None:
        clear &= np.abs(y - max_value) > 1e-5
    bad_mask = clear & ((on_codes != on) | (sat_codes != saturated))
    assert not bad_mask.any(), f"{bad_mask.sum()} mask bits wrong of {bad_mask.size}"
    width = grid.bin_width(bits, params.window)
    lo = np.asarray(params.lo, np.float64)
    inside = (xhat > lo + 1e-4) & (xhat < lo + (1 << bits) * width - 1e-4)
    bound = (0.5 if cap is None else 1.5) * width + 1e-4
    error = np.where(inside, np.abs(decoded - xhat), 0.0)
    assert error.max() <= bound, f"decoded {error.max() / width:.2f} bins from xhat"


def _stock_linear(layer) -> tuple[list, keras.Layer]:
    """Float64 stock layers computing the fused layer's linear map, with its weights."""
    config = layer.get_config()
    maps = []
    if "filters" in config:
        padding = config["padding"]
        pad = None
        if not isinstance(padding, str):
            pad, padding = keras.layers.ZeroPadding2D(padding, dtype="float64"), "valid"
        conv = keras.layers.Conv2D(
            config["filters"], config["kernel_size"], config["strides"], padding,
            dilation_rate=config["dilation_rate"], groups=config["groups"],
            use_bias=config["use_bias"], dtype="float64",
        )
        maps.append(([pad] if pad else []) + [conv])
        weights = [layer.kernel] + ([layer.bias] if config["use_bias"] else [])
        params = [(conv, weights)]
        if config["projection_filters"]:
            projection = keras.layers.Conv2D(
                config["projection_filters"], 1, config["projection_strides"], "valid",
                use_bias=False, dtype="float64",
            )
            maps.append([projection])
            params.append((projection, [layer.projection_kernel]))
    else:
        dense = keras.layers.Dense(config["units"], use_bias=config["use_bias"],
                                   dtype="float64")
        pool = [keras.layers.GlobalAveragePooling2D(dtype="float64")] if (
            config["pooling"] == "avg") else []
        maps.append(pool + [dense])
        params = [(dense, [layer.kernel] + ([layer.bias] if config["use_bias"] else []))]
    return maps, params


def bn_unit_gradients(layer, x, upstream: list, codes, params, bits: int, cap=None) -> list:
    """The oracle's `[d_x, d_gamma, d_beta, *d_linear_weights]` for a fused BN
    unit `layer` (trainable weights in `layer.trainable_weights` order) at
    input `x`, given the upstream gradients of its outputs and its codes
    (`codes=None`: bits=None, the exact `xhat` in their place)."""
    gamma = np.asarray(layer.gamma, np.float64)
    beta = np.asarray(layer.beta, np.float64)
    slope = float(np.float32(layer.negative_slope))
    max_value = layer.max_value if codes is None else None if cap is None else cap.max_value
    xhat, inv_std, _, on, saturated = exact_forward(x, gamma, beta, layer.epsilon, max_value)
    if codes is None:
        xhat_dec = xhat
    else:
        xhat_dec = decode(codes, params, bits, cap)[0]
        on = specified_mask(on, xhat, gamma, beta, params.window)
        if max_value is not None:
            saturated = specified_mask(saturated, xhat, gamma, beta, params.window, max_value)
    y_dec = gamma * xhat_dec + beta
    if max_value is None:
        a_dec = np.where(on, y_dec, slope * y_dec)
        d_a_d_y = np.where(on, 1.0, slope)
    else:
        a_dec = np.where(saturated, max_value, np.where(on, np.minimum(y_dec, max_value), 0.0))
        d_a_d_y = (on & ~saturated).astype(np.float64)
    d_a, linear = linear_vjp(layer, a_dec, upstream)
    # BN's backward with the decoded xhat, the specified mask.
    g_y = d_a * d_a_d_y
    axes = tuple(range(g_y.ndim - 1))
    d_beta = g_y.sum(axes)
    d_gamma = (g_y * xhat_dec).sum(axes)
    d_x = gamma * inv_std * (g_y - g_y.mean(axes) - xhat_dec * (g_y * xhat_dec).mean(axes))
    by_name = {"gamma": d_gamma, "beta": d_beta}
    linear_names = [w.path for w in _linear_variables(layer)]
    by_name.update(zip(linear_names, linear))
    ordered = [by_name[w.name] if w.name in ("gamma", "beta") else by_name[w.path]
               for w in layer.trainable_weights]
    return [d_x, *ordered]


def _float64():
    """A context in which the backend computes in float64 (JAX: x64 on)."""
    import contextlib

    if keras.backend.backend() != "jax":
        return contextlib.nullcontext()
    import jax

    # jax >= 0.7: `jax.enable_x64(True)`; before: `jax.experimental.enable_x64()`.
    return jax.enable_x64(True) if hasattr(jax, "enable_x64") else (
        jax.experimental.enable_x64())


def linear_vjp(layer, a: np.ndarray, upstream: list) -> tuple[np.ndarray, list]:
    """Stock float64 autodiff of the fused layer's linear map at the activation
    `a`: `(d_a, d_linear_weights)`, the weights in `_linear_variables` order."""
    with _float64():
        return _linear_vjp(layer, a, upstream)


def linear_forward(layer, a: np.ndarray) -> list[np.ndarray]:
    """The fused layer's linear map at `a`, in float64 stock Keras layers."""
    with _float64():
        return _linear_vjp(layer, a, None)


def _grid(layer):
    """The layer's grid (and cap grid) from the library's `quantizer_params`."""
    from keras_blpa import backend

    q = backend.module("quantizer")
    gamma, beta = np.asarray(layer.gamma), np.asarray(layer.beta)
    params = q.quantizer_params(gamma, beta, layer.bits, layer.window,
                                max_value=layer.max_value)
    cap = None if layer.max_value is None else q.cap_params(gamma, beta, params, layer.bits,
                                                            layer.max_value)
    return params, cap


def bin_centred_input(layer, shape, rng) -> tuple[np.ndarray, np.ndarray]:
    """An input whose `xhat` under the layer's moving statistics lies 0.2 to
    0.8 of the way through a random bin of each channel's grid, and its
    codes: no float rounding can move it to another bin, so the codes are
    known without the library's encoder (with a cap, moved onto the side of
    the cap's edge that the exact `y >= max_value` says, as the method
    requires)."""
    bits = layer.bits
    params, cap = _grid(layer)
    lo = np.asarray(params.lo, np.float64)
    codes = rng.integers(0, 1 << bits, size=shape)
    xhat = lo + (codes + rng.uniform(0.2, 0.8, size=shape)) * grid.bin_width(bits, params.window)
    if cap is not None:
        y = np.asarray(layer.gamma, np.float64) * xhat + np.asarray(layer.beta, np.float64)
        kc, flip = np.asarray(cap.kc), np.asarray(cap.flip) > 0.5
        saturated, aligned = y >= cap.max_value, np.asarray(cap.aligned) > 0.5
        # Saturated codes lie at or above kc (below it where flip): clamp.
        above = np.where(saturated != flip, np.maximum(codes, kc), np.minimum(codes, kc - 1))
        codes = np.where(aligned, above, codes).astype(np.int64)
    inv_std = 1.0 / np.sqrt(np.asarray(layer.moving_variance, np.float64) + layer.epsilon)
    x = np.asarray(layer.moving_mean, np.float64) + xhat / inv_std
    return x.astype("float32"), codes


def naive_inference(layer, codes: np.ndarray) -> np.ndarray:
    """What a naive layer's inference must compute for an input with these
    codes (`bin_centred_input`): the (capped) ReLU of the decoded values,
    then the linear map, in float64."""
    gamma = np.asarray(layer.gamma, np.float64)
    beta = np.asarray(layer.beta, np.float64)
    params, cap = _grid(layer)
    xhat, on, saturated = decode(codes, params, layer.bits, cap)
    y = gamma * xhat + beta
    if cap is None:
        a = np.where(on, y, 0.0)
    else:
        a = np.where(saturated, cap.max_value, np.where(on, np.minimum(y, cap.max_value), 0.0))
    return linear_forward(layer, a)[0]


def _linear_vjp(layer, a: np.ndarray, upstream: list | None):
    maps, owners = _stock_linear(layer)
    for chain in maps:
        out = keras.Input(a.shape[1:], dtype="float64")
        for sub in chain:
            out = sub(out)
    for owner, weights in owners:
        owner.set_weights([np.asarray(w, np.float64) for w in weights])
    variables = [w for owner, _ in owners for w in owner.trainable_weights]
    cotangents = [np.asarray(g, np.float64) for g in upstream or []]

    def outputs(a, values):
        mapping = dict(zip((id(v) for v in variables), values))
        results = []
        for chain in maps:
            out = a
            for sub in chain:
                own = [mapping[id(v)] for v in sub.trainable_weights]
                out, _ = sub.stateless_call(own, [], out)
            results.append(out)
        return results

    values = [np.asarray(v, np.float64) for v in variables]
    if upstream is None:
        return [np.asarray(o, np.float64) for o in outputs(np.asarray(a, np.float64), values)]
    if keras.backend.backend() == "jax":
        import jax

        _, vjp = jax.vjp(outputs, np.asarray(a, np.float64), values)
        d_a, d_weights = vjp(cotangents)
    else:
        import tensorflow as tf

        a_t = tf.constant(a, tf.float64)
        values_t = [tf.constant(v) for v in values]
        with tf.GradientTape() as tape:
            tape.watch([a_t, *values_t])
            loss = sum(tf.reduce_sum(o * g) for o, g in zip(outputs(a_t, values_t),
                                                              cotangents))
        d_a, *d_weights = tape.gradient(loss, [a_t, *values_t])
    return np.asarray(d_a, np.float64), [np.asarray(d, np.float64) for d in d_weights]


def _linear_variables(layer) -> list:
    weights = [layer.kernel] + ([layer.bias] if layer.use_bias else [])
    if getattr(layer, "projection_filters", None):
        weights.append(layer.projection_kernel)
    return weights


def relative_errors(actual: list, expected: list) -> list[float]:
    return [float(np.linalg.norm(np.asarray(a, np.float64) - e) / np.linalg.norm(e))
            for a, e in zip(actual, expected)]


def _by_path(layer, gradients: dict) -> list:
    """`gradients` (keyed by variable path) in `layer.trainable_weights` order."""
    return [gradients[w.path] for w in layer.trainable_weights]


def relu_unit_gradients(layer, z, upstream: list, codes, params, bits: int,
                        encoder_gamma, encoder_beta) -> list:
    """The oracle's `[d_z, *d_weights]` for a ReLU -> linear unit (no BN):
    the activation rebuilt from the codes (`encoder_gamma * xhat +
    encoder_beta` is `z` on its one-sided grid, `relu_unit.relu_grid`), the
    exact mask `z > 0`. With `return_activation`, the last upstream gradient
    is that of the exact `relu(z)` output."""
    z = np.asarray(z, np.float64)
    on = z > 0
    xhat_dec, _, _ = decode(codes, params, bits)
    z_dec = np.asarray(encoder_gamma, np.float64) * xhat_dec + np.asarray(encoder_beta,
                                                                         np.float64)
    a_dec = np.where(on, z_dec, 0.0)
    linear_upstream = upstream[:-1] if layer.return_activation else upstream
    d_a, d_weights = linear_vjp(layer, a_dec, linear_upstream)
    if layer.return_activation:
        d_a = d_a + np.asarray(upstream[-1], np.float64)
    paths = [w.path for w in _linear_variables(layer)]
    return [d_a * on, *_by_path(layer, dict(zip(paths, d_weights)))]


def check_relu_codes(codes, params, bits: int, z, encoder_gamma, encoder_beta) -> None:
    """The ReLU unit's codes: the mask `z > 0` exact (away from float
    rounding at 0), every `z` of the grid's range within half a bin."""
    z = np.asarray(z, np.float64)
    xhat_dec, on_codes, _ = decode(codes, params, bits)
    scale = np.asarray(encoder_gamma, np.float64)  # z units per xhat unit
    z_dec = scale * xhat_dec + np.asarray(encoder_beta, np.float64)
    top = np.asarray(encoder_beta, np.float64) + scale * (
        np.asarray(params.lo, np.float64) + (1 << bits) * grid.bin_width(bits, params.window))
    clear = np.abs(z) > 1e-5 * np.maximum(top, 1.0)
    bad = clear & (on_codes != (z > 0))
    assert not bad.any(), f"{bad.sum()} mask bits wrong of {bad.size}"
    width = grid.bin_width(bits, params.window) * scale
    inside = (z > 0) & (z < top - 1e-4)
    error = np.where(inside, np.abs(z_dec - z) / width, 0.0)
    assert error.max() <= 0.5 + 1e-3, f"decoded {error.max():.2f} bins from z"


def approx_bn_gradients(layer, x, upstream, codes, params, bits: int) -> list:
    """The oracle's `[d_x, d_gamma, d_beta]` for `ApproxBatchNormalization`:
    BN's backward with `xhat` decoded from the codes (its centred grid)."""
    gamma = np.asarray(layer.gamma, np.float64)
    _, inv_std, _, _, _ = exact_forward(x, gamma, np.zeros_like(gamma), layer.epsilon)
    xhat_dec, _, _ = decode(codes, params, bits)
    g = np.asarray(upstream[0], np.float64)
    axes = tuple(range(g.ndim - 1))
    d_x = gamma * inv_std * (g - g.mean(axes) - xhat_dec * (g * xhat_dec).mean(axes))
    return [d_x, (g * xhat_dec).sum(axes), g.sum(axes)]


def _activation(y: np.ndarray, on: np.ndarray, slope: float, max_value) -> np.ndarray:
    if max_value is None:
        return np.where(on, y, slope * y)
    return np.clip(y, 0.0, max_value)


def float64_twin(model, replace: dict | None = None) -> keras.Model:
    """A functional `model` cloned into float64 layers with its weights; the
    layers named in `replace` become `replace[name](layer)` instead."""
    replace = replace or {}

    def clone(layer):
        if layer.name in replace:
            return replace[layer.name](layer)
        return layer.__class__.from_config({**layer.get_config(), "dtype": "float64"})

    inputs = keras.Input(model.input_shape[1:], dtype="float64")
    twin = keras.models.clone_model(model, input_tensors=inputs, clone_function=clone)
    for original, copy in zip(model.layers, twin.layers):
        if original.name not in replace and original.weights:
            copy.set_weights([np.asarray(w, np.float64) for w in original.get_weights()])
    return twin


def model_gradients(model, x: np.ndarray, y: np.ndarray, units: dict) -> dict:
    """The oracle's gradients of a mean sparse cross-entropy (from logits)
    for a whole model whose BLPA units are all BN units: `{variable path:
    gradient}`.

    `units` maps each fused unit's name to `(x32, codes, params, cap, words)`:
    its input and the codes it saved in the step under test. The model is
    cloned into float64 stock layers with the same weights, each unit
    replaced by one whose forward is exact and whose backward is
    `bn_unit_gradients` at that unit's input and codes (TensorFlow, eager).
    """
    import tensorflow as tf

    unit_grads = {}

    class OracleUnit(keras.Layer):
        def __init__(self, fused):
            super().__init__(dtype="float64", name=f"{fused.name}_oracle")
            self.fused = fused

        def compute_output_shape(self, shape):
            return self.fused.compute_output_shape(shape)

        def call(self, inputs):
            fused = self.fused
            x32, codes, params, cap, words = units[fused.name]
            q = unpack(codes, x32.shape, fused.bits, words)

            @tf.custom_gradient
            def unit(inputs):
                _, _, pre, on, _ = exact_forward(inputs.numpy(), fused.gamma, fused.beta,
                                                 fused.epsilon)
                slope = float(np.float32(fused.negative_slope))
                outs = linear_forward(fused, _activation(pre, on, slope, fused.max_value))

                def grad(*upstream, variables=None):
                    upstream = [np.zeros(o.shape) if g is None else g.numpy()
                                for o, g in zip(outs, upstream)]
                    d_x, *d_weights = bn_unit_gradients(fused, x32, upstream, q, params,
                                                        fused.bits, cap)
                    for w, g in zip(fused.trainable_weights, d_weights):
                        unit_grads[w.path] = g
                    return tf.constant(d_x), [None] * len(variables or [])

                outs = [tf.constant(o) for o in outs]
                return (outs if len(outs) > 1 else outs[0]), grad

            return unit(inputs)

    twin = float64_twin(model, {name: OracleUnit for name in units})
    stock_pairs = []
    for original, copy in zip(model.layers, twin.layers):
        if original.name not in units:
            stock_pairs += zip(original.trainable_weights, copy.trainable_weights)
    x64 = tf.constant(x, tf.float64)
    with tf.GradientTape() as tape:
        logits = twin(x64, training=True)
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            tf.constant(y), logits, from_logits=True))
    stock_grads = tape.gradient(loss, [copy for _, copy in stock_pairs])
    grads = {o.path: g.numpy() for (o, _), g in zip(stock_pairs, stock_grads)}
    grads.update(unit_grads)
    return grads
