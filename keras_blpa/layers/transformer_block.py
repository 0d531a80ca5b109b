"""What KerasHub's TransformerEncoder and TransformerDecoder become under BLPA.

`BLPABlockMixin` runs a block's training forward through the transformer
units (`keras_blpa.transformer`), reading the weights of the block's own
sublayers (its `MultiHeadAttention`, `LayerNormalization`s and `Dense`s), so
that a converted block holds exactly the weights of the original:

pre-norm (`normalize_first=True`, GPT-2):

    q, k, v = norm_linear(x; LN1 -> query/key/value)      one code of LN1's xhat
    x      += attention_linear(q, k, v -> output)          codes of q, k, v
    x      += norm_mlp(x; LN2 -> intermediate Dense -> f -> output Dense)
              one code of LN2's xhat, f' code + code of f(h)

post-norm (`normalize_first=False`, BERT):

    q, k, v = activation_linear(x; identity -> query/key/value)   a code of x
    y, out  = norm_mlp(x + attention_linear(q, k, v); LN1 -> intermediate -> f -> output)
    x       = norm_linear(y + out; LN2)

Dropout masks are redrawn from the block's dropout seeds in the backward
pass. Inference, cached decoding, returned attention scores and
cross-attention run the stock code path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import keras
from keras import ops

from keras_blpa.transformer import codes, derivative
from keras_blpa.transformer.activation_linear import activation_linear
from keras_blpa.transformer.attention_linear import attention_linear
from keras_blpa.transformer.norm_linear import norm_linear
from keras_blpa.transformer.norm_mlp import norm_mlp

_HUB_ACTIVATIONS = {"keras_hub>gelu_approximate": "gelu_tanh"}


def activation_name(fn) -> str:
    """The canonical name (`derivative.SUPPORTED`) of a Keras activation, or a
    ValueError naming it."""
    name = keras.activations.serialize(fn)
    if isinstance(name, dict):
        name = _HUB_ACTIVATIONS.get(name.get("config"), name.get("config"))
    return derivative.check_activation(name)


@functools.cache
def _trailing_contraction(equation: str) -> int | None:
    """How many trailing axes of `a` an EinsumDense `equation` contracts with
    the kernel's leading axes (`"abc,cde->abde"`: 1, `"abcd,cde->abe"`: 2),
    the output being `a`'s other axes then the kernel's; None for any other
    equation (ellipses, transposed kernels, axes that are not contracted)."""
    inputs, _, out = equation.replace(" ", "").partition("->")
    lhs, _, rhs = inputs.partition(",")
    if not all(t.isalpha() and len(set(t)) == len(t) for t in (lhs, rhs, out)):
        return None
    contracted = len(set(lhs) & set(rhs))
    if contracted == 0 or lhs[len(lhs) - contracted:] != rhs[:contracted] \
            or out != lhs[:len(lhs) - contracted] + rhs[contracted:]:
        return None
    return contracted


def dense_product(equation: str | None, a, kernel):
    """`a @ kernel` (a Dense's product, `equation` None) or
    `einsum(equation, a, kernel)` (an EinsumDense's), as one 2-D matmul
    where the equation contracts `a`'s trailing axes with the kernel's
    leading ones: `a` as `[rows, contracted]`, the kernel as `[contracted,
    rest]`, the product reshaped back. Its gradients are then two 2-D
    matmuls, where TensorFlow differentiates an einsum through einsums
    (`_MklEinsum`) or a batched matmul and a sum."""
    if equation is None:
        return ops.matmul(a, kernel)
    contracted = _trailing_contraction(equation)
    sizes = tuple(a.shape[len(a.shape) - contracted:]) if contracted else ()
    if not contracted or None in sizes or tuple(kernel.shape[:contracted]) != sizes \
            or None in kernel.shape:
        return ops.einsum(equation, a, kernel)
    inner = math.prod(sizes)
    rest = tuple(kernel.shape[contracted:])
    product = ops.matmul(ops.reshape(a, (-1, inner)), ops.reshape(kernel, (inner, -1)))
    return ops.reshape(product, (*ops.shape(a)[:len(a.shape) - contracted], *rest))


def heads(layers: list) -> tuple[list, Callable]:
    """`(weights, linear)` of Dense / EinsumDense layers reading one input:
    `linear(a, *weights)` is their outputs, without activation."""
    spec, weights = [], []
    for layer in layers:
        equation = getattr(layer, "equation", None)
        bias = getattr(layer, "bias", None)
        spec.append((equation, bias is not None))
        weights += [layer.kernel] + ([bias] if bias is not None else [])

    def linear(a, *weights):
        outputs, i = [], 0
        for equation, has_bias in spec:
            kernel = weights[i]
            out = dense_product(equation, a, kernel)
            if has_bias:
                out = out + weights[i + 1]
            outputs.append(out)
            i += 1 + has_bias
        return outputs

    return [ops.convert_to_tensor(w) for w in weights], linear


def quantized(block) -> bool:
    """Whether a layer inside `block` computes with a quantized kernel
    (`model.quantize("int8")`, ...): the units read float kernels, so such a
    block runs KerasHub's code. Keras exports no walk over a layer's
    sublayers; `_flatten_layers` is internal, and without it none is found
    quantized but the block itself."""
    walk = getattr(block, "_flatten_layers", None)
    layers = list(walk(include_self=True)) if walk is not None else [block]
    return any(getattr(layer, "quantization_mode", None) for layer in layers)


def _norm_weights(layer) -> tuple:
    features = layer.gamma.shape[-1] if layer.gamma is not None else layer.beta.shape[-1]
    gamma = layer.gamma if layer.gamma is not None else ops.ones((features,))
    beta = layer.beta if layer.beta is not None else ops.zeros((features,))
    return ops.convert_to_tensor(gamma), ops.convert_to_tensor(beta)


def check_block(block) -> None:
    """A ValueError naming what a block uses that the units do not cover."""
    for norm in (block._self_attention_layer_norm, block._feedforward_layer_norm):
        if getattr(norm, "rms_scaling", False) or norm.axis not in (-1, [-1], (-1,), 2, [2]):
            raise ValueError(
                f"{block.name}: the BLPA block needs LayerNormalization over the last axis "
                f"without rms_scaling; {norm.name} has axis={norm.axis}, "
                f"rms_scaling={getattr(norm, 'rms_scaling', False)}. Keep the stock block."
            )
    activation_name(block._feedforward_intermediate_dense.activation)


class BLPABlockMixin:
    """The BLPA training forward of a KerasHub transformer block (module docstring).

    Args (beside the KerasHub block's own):
      bits: 4 or 8, the row codes' width; None keeps the exact tensors (the
        stock gradient, less memory than stock).
      derivative_bits: 1 to 4, the width of the activation's derivative code.
    """

    def _init_blpa(self, bits: int | None, derivative_bits: int) -> None:
        codes.check_bits(bits)
        derivative.check_derivative_bits(derivative_bits)
        self.bits = bits
        self.derivative_bits = derivative_bits

    def _blpa_config(self) -> dict:
        return {"bits": self.bits, "derivative_bits": self.derivative_bits}

    def _dropout_layers(self) -> tuple:
        """The block's dropout layers (any of their seed generators seeds the units)."""
        return (self._self_attention_dropout, self._self_attention_layer._dropout_layer,
                self._feedforward_dropout)

    def _seed(self):
        """A fresh dropout seed, or None when the block has no dropout."""
        for layer in self._dropout_layers():
            generator = getattr(layer, "seed_generator", None)
            if generator is not None:
                return generator.next()
        return None

    def _blpa_forward(self, x, mask):
        # `__call__` casts the input to the compute dtype (and its autocast
        # scope the kernels); `stateless_call` does neither. The units cast
        # the kernels to the activations' dtype themselves.
        x = ops.cast(x, self.compute_dtype)
        attention = self._self_attention_layer
        ln1, ln2 = self._self_attention_layer_norm, self._feedforward_layer_norm
        qkv_weights, qkv = heads(
            [attention._query_dense, attention._key_dense, attention._value_dense])
        out_weights, out = heads([attention._output_dense])
        inner_weights, inner = heads([self._feedforward_intermediate_dense])
        ffn_weights, ffn = heads([self._feedforward_output_dense])
        activation = activation_name(self._feedforward_intermediate_dense.activation)
        bits, name = self.bits, self.name
        attention_seed, ffn_seed = self._seed(), self._seed()

        if self.normalize_first:
            _, q, k, v = norm_linear(x, *_norm_weights(ln1), qkv_weights, linear=qkv,
                                     epsilon=ln1.epsilon, bits=bits, name=name)
        else:
            q, k, v = activation_linear(x, qkv_weights, linear=qkv, activation="linear",
                                        bits=bits, name=name)
        (attended,) = attention_linear(
            q, k, v, mask, attention_seed, out_weights, linear=out,
            scale=attention._inverse_sqrt_key_dim,
            dot_equation=attention._dot_product_equation,
            combine_equation=attention._combine_equation,
            attention_dropout=attention._dropout,
            dropout=self._self_attention_dropout.rate, bits=bits, name=name)
        x = x + attended
        mlp_norm = ln2 if self.normalize_first else ln1
        residual, ffn_out = norm_mlp(
            x, *_norm_weights(mlp_norm), inner_weights, ffn_weights, ffn_seed, inner=inner,
            outer=ffn, width=self._feedforward_intermediate_dense.units,
            epsilon=mlp_norm.epsilon, activation=activation, bits=bits,
            derivative_bits=self.derivative_bits, dropout=self._feedforward_dropout.rate,
            name=name)
        if self.normalize_first:
            residual = x
        x = residual + ffn_out
        if not self.normalize_first:
            (x,) = norm_linear(x, *_norm_weights(ln2), [], linear=lambda y: [],
                               epsilon=ln2.epsilon, bits=bits, name=name)
        return x
