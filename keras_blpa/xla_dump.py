"""Reading what XLA compiled: buffer assignments and live ranges from a dump.

With `XLA_FLAGS=--xla_dump_to=DIR` XLA writes, per compiled module, the
optimized HLO (`*after_optimizations.txt`) and its buffer assignment
(`*after_optimizations-buffer-assignment.txt`): every value's size, the
instruction sequence the CPU runtime executes, and each buffer's live range
in that sequence. That is XLA's own account of its memory, free of allocator
rounding (TF's BFC allocator may hand XLA's single temp buffer a chunk up to
twice its size, which `get_memory_info` then reports).

Used by the memory benchmarks (`profiling`) and by the tests that guard the
compiled program's structure.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field

_VALUE = re.compile(r"value: <\d+ (\S+) @\d+> \(size=(\d+),offset=\d+\): (\w+)\[([\d,]*)\]")
_TEMP = re.compile(r"^allocation \d+: size (\d+), preallocated-temp:", re.M)
_SEQ = re.compile(r"^\s+(\d+):(\S+)$", re.M)
_RANGE = re.compile(r"^\s+(\S+?)\{([^}]*)\}:(\d+)-(\d+)$", re.M)
_PARAM0 = re.compile(r"parameter 0, shape \|\w+\[([\d,]*)\]")
_MODULE = re.compile(r"module_(\d+)\.(.*)\.\w*after_optimizations-buffer-assignment\.txt$")


@dataclass
class Buffer:
    """One HLO value of the entry computation's schedule: an instruction's
    array result, or one element of its tuple result (`name` then carries the
    index, as in `ffi_call.3{1}`, and `instruction` is `ffi_call.3`)."""

    name: str
    size: int
    dtype: str
    dims: tuple[int, ...]
    start: int
    end: int
    instruction: str = ""

    def __post_init__(self):
        if not self.instruction:
            self.instruction = self.name.split("{", 1)[0]


@dataclass
class BufferAssignment:
    """The parts of XLA's buffer assignment that tell what is alive when."""

    path: str
    module: str
    module_id: int
    temp_bytes: int
    sequence: list[str]
    first_parameter_dims: tuple[int, ...] = ()
    buffers: dict[str, Buffer] = field(default_factory=dict)

    def live_at(self, step: int) -> list[Buffer]:
        """Buffers (temporaries, not parameters) alive at schedule step `step`."""
        return [b for b in self.buffers.values() if b.start <= step <= b.end]

    def peak(self) -> tuple[int, int]:
        """`(step, bytes)` where the live temporaries add up to the most bytes."""
        usage = [0] * (len(self.sequence) + 1)
        for b in self.buffers.values():
            for t in range(b.start, min(b.end, len(self.sequence)) + 1):
                usage[t] += b.size
        step = max(range(len(usage)), key=usage.__getitem__)
        return step, usage[step]

    def position(self, name: str) -> int:
        """Schedule step of instruction `name`."""
        return self.sequence.index(name)


def parse(path: str) -> BufferAssignment:
    """Parses one `*-buffer-assignment.txt` file."""
    with open(path) as f:
        text = f.read()
    match = _MODULE.search(os.path.basename(path))
    module_id, module = (int(match.group(1)), match.group(2)) if match else (-1, path)
    temps = [int(m) for m in _TEMP.findall(text)]
    live_range = path.replace("-buffer-assignment.txt", "-live-range.txt")
    if "InstructionSequence:" not in text and os.path.exists(live_range):
        # Newer XLA (jaxlib 0.10) writes the live ranges to a file of their own.
        with open(live_range) as f:
            text += "\n" + f.read()
    head = text.split("InstructionSequence:", 1)
    if len(head) < 2 or "BufferLiveRange:" not in head[1]:
        raise ValueError(f"{path}: no HloLiveRange section (unknown dump format)")
    seq_text, range_text = head[1].split("BufferLiveRange:", 1)
    sequence = [name for _, name in _SEQ.findall(seq_text)]
    values = {}
    for name, size, dtype, dims in _VALUE.findall(text):
        shape = tuple(int(d) for d in dims.split(",") if d)
        values[name] = (int(size), dtype, shape)
    buffers = {}
    for instruction, index, start, end in _RANGE.findall(range_text):
        # Tuple elements (a custom call's several results) are values of their own.
        name = f"{instruction}{{{index}}}" if index else instruction
        if name in values and not instruction.startswith(("arg", "param")):
            size, dtype, dims = values[name]
            buffers[name] = Buffer(name, size, dtype, dims, int(start), int(end), instruction)
    param = _PARAM0.search(text)
    first = tuple(int(d) for d in param.group(1).split(",") if d) if param else ()
    return BufferAssignment(
        path, module, module_id, max(temps, default=0), sequence, first, buffers
    )


def load(dump_dir: str, name_contains: str = "") -> list[BufferAssignment]:
    """Buffer assignments of the modules in `dump_dir`, in compilation order."""
    pattern = os.path.join(dump_dir, "*after_optimizations-buffer-assignment.txt")
    found = [parse(p) for p in glob.glob(pattern) if name_contains in os.path.basename(p)]
    return sorted(found, key=lambda b: b.module_id)


def optimized_hlo(assignment: BufferAssignment) -> str:
    """Text of the optimized HLO module that `assignment` belongs to."""
    path = assignment.path.replace("-buffer-assignment.txt", ".txt")
    with open(path) as f:
        return f.read()


def temp_bytes_by_batch(dump_dir: str, batch_sizes, name_contains: str = "") -> list[int]:
    """XLA's temp buffer per batch size: the largest among the modules whose
    first parameter (the input batch) has that leading dimension."""
    modules = load(dump_dir, name_contains)
    result = []
    for batch in batch_sizes:
        temps = [m.temp_bytes for m in modules if m.first_parameter_dims[:1] == (batch,)]
        if not temps:
            raise ValueError(f"no module in {dump_dir} takes a batch of {batch}")
        result.append(max(temps))
    return result


@dataclass
class Instruction:
    """One instruction of an HLO computation, as printed."""

    name: str
    dtype: str  # element type of the result ("tuple" for tuples)
    dims: tuple[int, ...]
    opcode: str
    operands: list[str]
    text: str

    @property
    def elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


_INSTRUCTION = re.compile(
    r"^\s+(?:ROOT )?%(\S+) = (\(.*?\)|\w+\[[\d,]*\](?:\{[^}]*\})?) ([\w-]+)\((.*)$"
)
_SHAPE = re.compile(r"^(\w+)\[([\d,]*)\]")


def entry_instructions(hlo_text: str) -> list[Instruction]:
    """The entry computation's instructions in order (the schedule, for a
    scheduled module), with their operand names."""
    lines = hlo_text.split("\nENTRY ", 1)[1].split("\n}", 1)[0].splitlines()[1:]
    result = []
    for line in lines:
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        shape_match = _SHAPE.match(shape)
        if shape_match:
            dtype = shape_match.group(1)
            dims = tuple(int(d) for d in shape_match.group(2).split(",") if d)
        else:
            dtype, dims = "tuple", ()
        args = rest.split("), ", 1)[0]
        operands = re.findall(r"%([\w.-]+)", args)
        result.append(Instruction(name, dtype, dims, opcode, operands, line))
    return result
