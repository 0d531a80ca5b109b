"""The program XLA is given, and the program XLA:CPU makes of it.

GPU and TPU cannot run here, so these tests inspect what XLA compiles:

- before optimization (what every backend receives): each unit's codes are
  bundled with its forward output in an optimization barrier, and in the
  backward pass with the upstream gradient, behind a gate computed from that
  gradient. Backends that keep barriers through fusion (GPU, TPU) rely on
  this; it must not be lost by later changes.
- after optimization on CPU (whose pipeline drops barriers before fusion):
  no backward instruction reads a full-precision forward activation, and no
  buffer of an activation's size lives from the forward into the backward.
  Only the packed codes (uint32 words) cross.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from keras_blpa import quantizer, xla_dump

PROGRAM = os.path.join(os.path.dirname(__file__), "xla_program.py")
FLOATS = ("f16", "bf16", "f32", "f64")


# (bits, negative_slope): the leaky ReLU must keep the same structure.
@pytest.fixture(scope="module", params=[(4, 0.0), (8, 0.0), (4, 0.1)],
                ids=["bits4", "bits8", "bits4-leaky"])
def compiled(request, tmp_path_factory):
    bits, slope = request.param
    out = str(tmp_path_factory.mktemp(f"xla_bits{bits}"))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, PROGRAM, out, "--bits", str(bits), "--negative-slope", str(slope)],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(out, "spec.json")) as f:
        spec = json.load(f)
    (before,) = glob.glob(os.path.join(out, "*blpa_step*before_optimizations.txt"))
    with open(before) as f:
        spec["before"] = xla_dump.entry_instructions(f.read())
    assignment = xla_dump.load(out, "blpa_step")[-1]
    spec["assignment"] = assignment
    spec["after"] = xla_dump.entry_instructions(xla_dump.optimized_hlo(assignment))
    return spec


def _words_shapes(spec) -> Counter:
    return Counter(
        tuple(quantizer.words_shape(u["input_shape"], spec["bits"])) for u in spec["units"]
    )


def _largest_activation(spec) -> int:
    sizes = []
    for unit in spec["units"]:
        n = 1
        for d in unit["input_shape"]:
            n *= d
        sizes.append(n)
    return min(sizes[:-1])  # the conv units' activations (the dense head's is tiny)


def _depends_on(instructions, start: str, target: str) -> bool:
    by_name = {i.name: i for i in instructions}
    seen, stack = set(), [start]
    while stack:
        name = stack.pop()
        if name == target:
            return True
        if name in seen or name not in by_name:
            continue
        seen.add(name)
        stack.extend(by_name[name].operands)
    return False


def _barrier_members(instructions, barrier) -> list:
    """The instructions bundled by an opt-barrier (through its tuple operand)."""
    by_name = {i.name: i for i in instructions}
    (tuple_name,) = barrier.operands
    return [by_name[name] for name in by_name[tuple_name].operands]


def test_codes_bundled_with_forward_output_and_upstream_gradient(compiled):
    before = compiled["before"]
    by_name = {i.name: i for i in before}
    forward, backward = Counter(), Counter()
    for barrier in (i for i in before if i.opcode == "opt-barrier"):
        members = _barrier_members(before, barrier)
        words = [m for m in members if m.dtype == "u32"]
        floats = [m for m in members if m.dtype in FLOATS]
        if len(words) != 1 or not floats:
            continue
        (code,) = words
        # Forward: the codes come straight from the packing reduce-window.
        source = code
        while source.opcode in ("reshape", "copy", "convert", "get-tuple-element"):
            source = by_name[source.operands[0]]
        if source.opcode == "reduce-window":
            forward[code.dims] += 1
            continue
        # Backward: the codes pass a select whose predicate reads the upstream
        # gradient that the same barrier bundles.
        assert source.opcode == "select", source.text
        predicate = source.operands[0]
        assert any(_depends_on(before, predicate, f.name) for f in floats), source.text
        backward[code.dims] += 1
    expected = _words_shapes(compiled)
    assert forward == expected
    assert backward == expected


def _boundary(after) -> tuple[str, int]:
    """The gradient seed, and the position of the first instruction that
    depends on both the seed and the input batch: the start of the backward
    pass proper (reductions of the seed alone may be scheduled anywhere)."""
    params = {i.text.split("parameter(", 1)[1].split(")")[0]: i.name
              for i in after if i.opcode == "parameter"}
    seed, inputs = params["1"], params["0"]
    reads_seed, reads_inputs = {seed}, {inputs}
    for position, instruction in enumerate(after):
        if reads_seed.intersection(instruction.operands):
            reads_seed.add(instruction.name)
        if reads_inputs.intersection(instruction.operands):
            reads_inputs.add(instruction.name)
        if instruction.name in reads_seed and instruction.name in reads_inputs:
            return seed, position
    raise AssertionError("no instruction combines the gradient seed with the forward pass")


def test_backward_reads_no_forward_activation(compiled):
    after = compiled["after"]
    seed, boundary = _boundary(after)
    position = {i.name: p for p, i in enumerate(after)}
    by_name = {i.name: i for i in after}
    limit = _largest_activation(compiled)
    offending = []
    for instruction in after[boundary:]:
        for name in instruction.operands:
            operand = by_name.get(name)
            if operand is None or name == seed or position[name] >= boundary:
                continue
            if operand.dtype in FLOATS and operand.elements >= limit:
                offending.append(f"{instruction.name} reads {name} {operand.dtype}{operand.dims}")
    assert not offending, "\n".join(offending)


def test_only_codes_live_from_forward_into_backward(compiled):
    after = compiled["after"]
    assignment = compiled["assignment"]
    _, boundary = _boundary(after)
    step = assignment.position(after[boundary].name)
    limit = _largest_activation(compiled)
    crossing = [b for b in assignment.buffers.values() if b.start < step <= b.end]
    big = [b for b in crossing if b.dtype in FLOATS and b.size >= 4 * limit // 2]
    assert not big, "\n".join(f"{b.name} {b.dtype}{b.dims} {b.start}-{b.end}" for b in big)
    words = Counter(b.dims for b in crossing if b.dtype == "u32")
    expected = _words_shapes(compiled)
    assert words & expected == expected, (words, expected)
