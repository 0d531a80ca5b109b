"""The program JAX gives XLA for a BLPA training step, and what XLA:CPU makes of it.

The checks of `tests/test_xla_structure.py`, on the JAX unit (`tests/xla_checks.py`):

- before optimization (what the CPU, GPU and TPU compilers all receive): each
  unit's codes share an optimization barrier with its forward output and, in
  the backward, with the upstream gradient behind a gate computed from it.
  XLA:GPU and the TPU compiler keep barriers through fusion and scheduling.
- after optimization on CPU (which drops barriers before fusion): no
  backward instruction reads a full-precision forward activation (an encode
  re-fused into the backward would), and no float buffer of an activation's
  size lives from the forward into the backward (a decode hoisted before its
  upstream gradient exists would); only the packed words cross.

Both paths are compiled: the XLA custom calls (CPU's and CUDA's path, codes
uint8[N, B]) and the jnp quantizer (TPU's path, uint32 words), plain, leaky
and capped (ReLU6-style `max_value`). On the custom calls, also: every encode
runs before the backward begins and every decode after it, with an operand
computed from its upstream gradient.

The same for the units without a fused BN (`ReLUConv2D`, `ReLUDense`,
`ApproxBatchNormalization`) and for `PaddedMaxPooling2D`, which may keep its
input (it needs the maxima) but no padded copy, and pads again in the
backward once the gradient exists. (XLA:CPU keeps neither: it keeps the
forward's argmax indices, and materializes the gradient's zero of the padded
shape in the forward, a constant that `_data_free` sets aside.)
"""

from __future__ import annotations

import os
import re
from collections import Counter

import numpy as np
import pytest
import xla_checks

from keras_blpa import grid
from keras_blpa.backend.jax.linear import weight_gradient_chunks

PROGRAM = os.path.join(os.path.dirname(__file__), "jax_program.py")


@pytest.fixture(scope="module",
                params=[("4", 0.0, None, "custom"), ("8", 0.0, None, "custom"),
                        ("4", 0.1, None, "custom"), ("none", 0.0, None, "custom"),
                        ("4", 0.0, None, "jnp"), ("8", 0.0, None, "jnp"),
                        ("4", 0.1, None, "jnp"), ("4", 0.0, 6.0, "custom"),
                        ("none", 0.0, 6.0, "custom"), ("4", 0.0, 6.0, "jnp")],
                ids=["bits4", "bits8", "bits4-leaky", "exact", "jnp-bits4", "jnp-bits8",
                     "jnp-bits4-leaky", "bits4-capped", "exact-capped", "jnp-bits4-capped"])
def compiled(request, tmp_path_factory):
    bits, slope, cap, kernels = request.param
    out = str(tmp_path_factory.mktemp(f"jax_{kernels}_bits{bits}"))
    flags = ["--jnp"] if kernels == "jnp" else []
    flags += ["--negative-slope", str(slope)] if cap is None else ["--max-value", str(cap)]
    spec = xla_checks.compile_program(PROGRAM, out, "--bits", bits, *flags,
                                      env=dict(os.environ))
    spec["kernels"] = kernels
    if kernels == "custom":  # the program checked is the capped (or plain) one
        attr = f"max_value = {cap or 0.0:e}"
        calls = [i.text for i in spec["before"] if i.opcode == "custom-call"]
        assert calls and all(attr in text for text in calls), calls[:2]
    return spec


def _linear_decodes(unit) -> int:
    """Decodes for a coded unit's linear map on the custom calls: one per
    batch slice of the weight gradient where it runs over slices (a 4-D
    activation, `linear.weight_gradient_chunks`), else one."""
    shape = unit["input_shape"]
    return min(weight_gradient_chunks(), shape[0]) if len(shape) == 4 else 1


def _custom_calls(instructions, target):
    return [i for i in instructions
            if i.opcode == "custom-call" and f'custom_call_target="{target}"' in i.text]


def test_codes_bundled_with_forward_output_and_upstream_gradient(compiled):
    if compiled["kernels"] == "custom":
        pytest.skip("the jnp path's barriers (custom calls are opaque to fusion)")
    xla_checks.check_codes_bundled_with_forward_output_and_upstream_gradient(compiled)


def test_backward_reads_no_forward_activation(compiled):
    if compiled["bits"] is None:
        pytest.skip("bits=None keeps xhat itself: float by design")
    xla_checks.check_backward_reads_no_forward_activation(
        compiled, compiled["seed_parameter"], compiled["input_parameter"])


def test_only_codes_live_from_forward_into_backward(compiled):
    if compiled["kernels"] == "jnp":
        xla_checks.check_only_codes_live_from_forward_into_backward(
            compiled, compiled["seed_parameter"], compiled["input_parameter"])
        return
    if compiled["bits"] is None:
        pytest.skip("bits=None keeps xhat itself: float by design")
    bits = compiled["bits"]
    codes = Counter(
        (u["input_shape"][0], int(np.prod(u["input_shape"][1:])) * bits // 8)
        for u in compiled["units"]
    )
    xla_checks.check_only_codes_live_from_forward_into_backward(
        compiled, compiled["seed_parameter"], compiled["input_parameter"],
        codes_dtype="u8", expected=codes)


def test_encodes_run_in_the_forward_and_decodes_wait_for_their_gradient(compiled):
    if compiled["kernels"] == "jnp":
        pytest.skip("custom calls only")
    after = compiled["after"]
    exact = compiled["bits"] is None
    encode = "blpa_exact_forward" if exact else "blpa_encode"
    decode = "blpa_exact_relu" if exact else "blpa_decode_relu"
    seed, start = xla_checks.boundary(after, compiled["seed_parameter"],
                                      compiled["input_parameter"])
    position = {i.name: p for p, i in enumerate(after)}
    units = len(compiled["units"])
    encodes, decodes = _custom_calls(after, encode), _custom_calls(after, decode)
    expected = sum(_linear_decodes(u) for u in compiled["units"])
    assert len(encodes) == units and len(decodes) == expected, (len(encodes), len(decodes))
    assert all(position[e.name] < start for e in encodes)
    for d in decodes:
        assert position[d.name] >= start, d.text
        assert xla_checks.depends_on(after, d.operands[-1], seed), d.text
    assert len(_custom_calls(after, "blpa_exact_sums" if exact else "blpa_bn_sums")) == units


# ---- the units without a fused BN, and PaddedMaxPooling2D --------------------

RELU_KINDS = ("ReLUConv2D", "ReLUDense")
# Decodes of a unit's codes in its backward: the ReLU units and the BN units
# rebuild `a` for the linear map and then the mask; ApproxBatchNormalization
# reads its codes once, in the BN backward.
DECODES = {"ReLUConv2D": 2, "ReLUDense": 2, "ApproxBatchNormalization": 1}


@pytest.fixture(scope="module",
                params=[("relu", "4", "custom"), ("relu", "8", "custom"), ("relu", "4", "jnp"),
                        ("relu", "8", "jnp"), ("pool", "4", "custom"), ("pool", "4", "jnp")],
                ids=["relu-bits4", "relu-bits8", "relu-jnp-bits4", "relu-jnp-bits8",
                     "pool-bits4", "pool-jnp-bits4"])
def unfused(request, tmp_path_factory):
    network, bits, kernels = request.param
    out = str(tmp_path_factory.mktemp(f"jax_{network}_{kernels}_bits{bits}"))
    flags = ["--jnp"] if kernels == "jnp" else []
    spec = xla_checks.compile_program(PROGRAM, out, "--network", network, "--bits", bits,
                                      *flags, env=dict(os.environ))
    spec["kernels"] = kernels
    return spec


def _codes(spec) -> Counter:
    """What each unit keeps: uint8 [N, B] from the custom calls, words from jnp."""
    if spec["kernels"] == "jnp":
        return xla_checks.words_shapes(spec)
    return Counter((u["input_shape"][0], int(np.prod(u["input_shape"][1:])) * spec["bits"] // 8)
                   for u in spec["units"])


def _kept_by_design(spec) -> Counter:
    """Float activations the backward may read: each pooling's own input."""
    return Counter(tuple(p["input_shape"]) for p in spec["pools"])


def _data_free(instructions) -> set:
    """Names of the instructions that read no parameter: constants XLA
    materialized (XLA:CPU expands the pooling gradient's select-and-scatter
    into a scatter onto a broadcast zero of the padded shape, and may
    schedule that broadcast in the forward). No activation data."""
    reads_data = set()
    for instruction in instructions:
        if instruction.opcode == "parameter" or reads_data.intersection(instruction.operands):
            reads_data.add(instruction.name)
    return {i.name for i in instructions} - reads_data


def test_unfused_units_keep_only_codes_across_the_boundary(unfused):
    """After optimization on CPU: where the backward begins, no float buffer
    of half an activation or more is alive but a pooling's input (never its
    padded copy), and every unit's codes are."""
    after, assignment = unfused["after"], unfused["assignment"]
    seed, start = xla_checks.boundary(after, unfused["seed_parameter"],
                                      unfused["input_parameter"])
    step = assignment.position(after[start].name)
    parameters = {i.name for i in after if i.opcode == "parameter"}
    backward_values = xla_checks.from_seed(after, seed)
    crossing = [b for b in assignment.buffers.values()
                if b.start < step <= b.end and b.instruction not in parameters
                and b.instruction not in backward_values]
    limit = xla_checks.largest_activation(unfused)
    constants = _data_free(after)
    floats = [b for b in crossing if b.dtype in xla_checks.FLOATS
              and b.instruction not in constants]
    big = Counter(b.dims for b in floats if b.size >= 4 * limit // 2)
    assert not big - _kept_by_design(unfused), [
        f"{b.name} {b.dtype}{b.dims} {b.start}-{b.end}" for b in floats if b.dims in big]
    padded = {tuple(p["padded_shape"]) for p in unfused["pools"]}
    assert not [b.name for b in floats if b.dims in padded]
    codes = Counter(b.dims for b in crossing if b.dtype == ("u32" if unfused["kernels"] == "jnp"
                                                            else "u8"))
    expected = _codes(unfused)
    assert codes & expected == expected, (codes, expected)


def test_unfused_backward_reads_no_forward_activation(unfused):
    """After optimization: no backward instruction reads a float of an
    activation's size that the forward produced, but a pooling's input."""
    after = unfused["after"]
    seed, start = xla_checks.boundary(after, unfused["seed_parameter"],
                                      unfused["input_parameter"])
    backward_values = xla_checks.from_seed(after, seed)
    position = {i.name: p for p, i in enumerate(after)}
    by_name = {i.name: i for i in after}
    limit = xla_checks.largest_activation(unfused)
    allowed = _kept_by_design(unfused)
    constants = _data_free(after)
    offending = []
    for instruction in after[start:]:
        for name in instruction.operands:
            operand = by_name.get(name)
            if (operand is None or name in backward_values or position[name] >= start
                    or operand.opcode == "parameter" or name in constants):
                continue
            if (operand.dtype in xla_checks.FLOATS and operand.elements >= limit
                    and operand.dims not in allowed):
                offending.append(f"{instruction.name} reads {name} {operand.dtype}{operand.dims}")
    assert not offending, "\n".join(offending)


def test_unfused_encodes_run_in_the_forward_and_decodes_wait_for_their_gradient(unfused):
    if unfused["kernels"] == "jnp":
        pytest.skip("custom calls only")
    after = unfused["after"]
    seed, start = xla_checks.boundary(after, unfused["seed_parameter"],
                                      unfused["input_parameter"])
    position = {i.name: p for p, i in enumerate(after)}
    kinds = Counter(u["kind"] for u in unfused["units"])
    # The first unit reads the step's input, whose gradient nobody asks for:
    # XLA drops its mask decode (a ReLU unit) or its input gradient (a BN).
    first = unfused["units"][0]["kind"]
    encodes = _custom_calls(after, "blpa_encode")
    decodes = _custom_calls(after, "blpa_decode_relu")
    sums = _custom_calls(after, "blpa_bn_sums")
    grads = _custom_calls(after, "blpa_bn_input_grad")
    bn = kinds["ApproxBatchNormalization"]
    assert len(encodes) == len(unfused["units"])
    # Each ReLU unit: its weight gradient's decodes, then the mask's.
    relu_units = [u for u in unfused["units"] if u["kind"] in RELU_KINDS]
    assert len(decodes) == (sum(_linear_decodes(u) + 1 for u in relu_units)
                            - (first in RELU_KINDS)), len(decodes)
    assert (len(sums), len(grads)) == (bn, bn - (first == "ApproxBatchNormalization"))
    bn = sums + grads
    assert all(position[e.name] < start for e in encodes)
    # A decode's last operand is its gate; the BN backward's first is g_a.
    for call, gate in [(d, d.operands[-1]) for d in decodes] + [(b, b.operands[0]) for b in bn]:
        assert position[call.name] >= start, call.text
        assert xla_checks.depends_on(after, gate, seed), call.text


def _op_name(instruction) -> str:
    found = re.search(r'op_name="([^"]*)"', instruction.text)
    return found.group(1) if found else ""


def test_unfused_codes_bundled_and_decodes_behind_the_gradient(unfused):
    """Before optimization (what the GPU and TPU compilers receive), on the
    jnp path: each unit's words leave the packing reduce-window through an
    optimization barrier beside a float (its forward output); each unit's
    decodes (the unpacking shifts of its backward) and each pooling's second
    pad depend on the gradient seed."""
    if unfused["kernels"] == "custom" and not unfused["pools"]:
        pytest.skip("custom calls: their order is checked on the compiled program")
    before = unfused["before"]
    params = {i.text.split("parameter(", 1)[1].split(")")[0]: i.name
              for i in before if i.opcode == "parameter"}
    seed = params[unfused["seed_parameter"]]
    by_name = {i.name: i for i in before}
    for pool in unfused["pools"]:
        scope = f"transpose(jvp({pool['name']}))/"
        pads = [i for i in before if i.dims == tuple(pool["padded_shape"])
                and i.dtype in xla_checks.FLOATS and "pad" in _op_name(i).partition(scope)[2]]
        assert pads and all(xla_checks.depends_on(before, i.name, seed) for i in pads), pool
    if unfused["kernels"] == "custom":
        return  # custom calls: their order is checked on the compiled program
    bundled = Counter()
    for barrier in (i for i in before if i.opcode == "opt-barrier"):
        members = xla_checks.barrier_members(before, barrier)
        words = [m for m in members if m.dtype == "u32"]
        if len(words) == 1 and any(m.dtype in xla_checks.FLOATS for m in members):
            source = words[0]
            while source.opcode in ("reshape", "copy", "convert", "get-tuple-element"):
                source = by_name[source.operands[0]]
            if source.opcode == "reduce-window":
                bundled[_op_name(source).split("/")[1]] += 1
    for unit in unfused["units"]:
        assert bundled[f"jvp({unit['name']})"] == 1, (unit, bundled)
        shape = grid.words_shape(unit["input_shape"], unfused["bits"])
        scope = f"transpose(jvp({unit['name']}))"
        decodes = [i for i in before if i.opcode == "shift-right-logical" and i.dtype == "u32"
                   and len(i.dims) == len(shape) + 1 and scope in _op_name(i)]
        assert len(decodes) == DECODES[unit["kind"]], (unit, [d.text for d in decodes])
        for decode in decodes:
            assert xla_checks.depends_on(before, decode.name, seed), decode.text
