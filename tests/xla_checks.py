"""Checks of a compiled BLPA step's structure, shared by the TensorFlow
(`tests/test_xla_structure.py`) and JAX (`tests/jax_backend/test_jax_program.py`)
suites. `spec` is what `tests/xla_program.py` or `tests/jax_backend/jax_program.py`
wrote (`bits`, `units` with their input shapes) plus the parsed programs:
`before` and `after` (entry instructions before and after optimization) and
`assignment` (XLA's buffer assignment). TensorFlow-free: the JAX suite uses it.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from collections import Counter

from keras_blpa import grid, xla_dump

FLOATS = ("f16", "bf16", "f32", "f64")


def compile_program(program: str, out: str, *args: str, env: dict) -> dict:
    """Runs `program` (which dumps one `blpa_step` into `out` and writes
    `spec.json`) in a fresh process; the spec with the parsed programs."""
    env = dict(env)
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, program, out, *args], capture_output=True,
                            text=True, env=env, timeout=600)
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


def words_shapes(spec) -> Counter:
    return Counter(grid.words_shape(u["input_shape"], spec["bits"]) for u in spec["units"])


def largest_activation(spec) -> int:
    sizes = []
    for unit in spec["units"]:
        n = 1
        for d in unit["input_shape"]:
            n *= d
        sizes.append(n)
    return min(sizes[:-1])  # the conv units' activations (the dense head's is tiny)


def depends_on(instructions, start: str, target: str) -> bool:
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


def barrier_members(instructions, barrier) -> list:
    """The instructions bundled by an opt-barrier (through its tuple operand)."""
    by_name = {i.name: i for i in instructions}
    (tuple_name,) = barrier.operands
    return [by_name[name] for name in by_name[tuple_name].operands]


def check_codes_bundled_with_forward_output_and_upstream_gradient(spec) -> None:
    """Before optimization (what every backend receives): each unit's codes
    share an optimization barrier with its forward output, fresh from the
    packing reduce-window, and in the backward with the upstream gradient,
    behind a select whose predicate reads that gradient."""
    before = spec["before"]
    by_name = {i.name: i for i in before}
    forward, backward = Counter(), Counter()
    for barrier in (i for i in before if i.opcode == "opt-barrier"):
        members = barrier_members(before, barrier)
        words = [m for m in members if m.dtype == "u32"]
        floats = [m for m in members if m.dtype in FLOATS]
        if len(words) != 1 or not floats:
            continue
        (code,) = words
        source = code
        while source.opcode in ("reshape", "copy", "convert", "get-tuple-element"):
            source = by_name[source.operands[0]]
        if source.opcode == "reduce-window":
            forward[code.dims] += 1
            continue
        assert source.opcode == "select", source.text
        predicate = source.operands[0]
        assert any(depends_on(before, predicate, f.name) for f in floats), source.text
        backward[code.dims] += 1
    expected = words_shapes(spec)
    assert forward == expected
    assert backward == expected


def boundary(after, seed_parameter: str, input_parameter: str) -> tuple[str, int]:
    """The gradient seed, and the position of the first instruction that
    depends on both the seed and the input batch: the start of the backward
    pass proper (reductions of the seed alone may be scheduled anywhere)."""
    params = {i.text.split("parameter(", 1)[1].split(")")[0]: i.name
              for i in after if i.opcode == "parameter"}
    seed, inputs = params[seed_parameter], params[input_parameter]
    reads_seed, reads_inputs = {seed}, {inputs}
    for position, instruction in enumerate(after):
        if reads_seed.intersection(instruction.operands):
            reads_seed.add(instruction.name)
        if reads_inputs.intersection(instruction.operands):
            reads_inputs.add(instruction.name)
        if instruction.name in reads_seed and instruction.name in reads_inputs:
            return seed, position
    raise AssertionError("no instruction combines the gradient seed with the forward pass")


def from_seed(after, seed: str) -> set:
    """Instructions computed from the gradient seed: backward values, also
    those scheduled before the boundary (a pooled head's broadcast gradient
    needs only the seed; in a real step the seed needs the forward output)."""
    reached = {seed}
    for instruction in after:
        if reached.intersection(instruction.operands):
            reached.add(instruction.name)
    return reached


def check_backward_reads_no_forward_activation(spec, seed_parameter, input_parameter) -> None:
    """After optimization: no backward instruction reads a full-precision
    tensor of an activation's size that the forward pass produced."""
    after = spec["after"]
    seed, start = boundary(after, seed_parameter, input_parameter)
    backward_values = from_seed(after, seed)
    position = {i.name: p for p, i in enumerate(after)}
    by_name = {i.name: i for i in after}
    limit = largest_activation(spec)
    offending = []
    for instruction in after[start:]:
        for name in instruction.operands:
            operand = by_name.get(name)
            if operand is None or name in backward_values or position[name] >= start:
                continue
            if operand.opcode == "parameter":
                continue  # the step's inputs (weights, the batch) are not temporaries
            if operand.dtype in FLOATS and operand.elements >= limit:
                offending.append(f"{instruction.name} reads {name} {operand.dtype}{operand.dims}")
    assert not offending, "\n".join(offending)


def check_only_codes_live_from_forward_into_backward(spec, seed_parameter, input_parameter,
                                                     codes_dtype: str = "u32",
                                                     expected: Counter | None = None) -> None:
    """After optimization: no float buffer of half an activation's size or
    more is alive where the backward begins; every unit's codes are (the
    words, or `expected` shapes of `codes_dtype`)."""
    after = spec["after"]
    assignment = spec["assignment"]
    seed, start = boundary(after, seed_parameter, input_parameter)
    step = assignment.position(after[start].name)
    limit = largest_activation(spec)
    parameters = {i.name for i in after if i.opcode == "parameter"}
    backward_values = from_seed(after, seed)
    crossing = [b for b in assignment.buffers.values()
                if b.start < step <= b.end and b.instruction not in parameters
                and b.instruction not in backward_values]
    big = [b for b in crossing if b.dtype in FLOATS and b.size >= 4 * limit // 2]
    assert not big, "\n".join(f"{b.name} {b.dtype}{b.dims} {b.start}-{b.end}" for b in big)
    words = Counter(b.dims for b in crossing if b.dtype == codes_dtype)
    expected = words_shapes(spec) if expected is None else expected
    assert words & expected == expected, (words, expected)
