"""Where a compiled program's memory traffic goes: bytes read and written per operation of its optimised HLO.

XLA's `cost_analysis()` gives one total; this splits it by top-level operation (fusion, convolution, copy, ...) of
the optimised HLO text (`compiled.as_text()`), so the few operations that move most of the bytes can be found and
named by the JAX operation they came from (`op_name` metadata). Per operation: the bytes of its operands plus its
output, in their padded on-device layout (a TPU tile such as `T(8,128)` rounds the two minor-most dimensions up),
times the trip count of the while loops around it (read from `known_trip_count` or the loop condition). A fusion
that only dynamic-slices an operand reads the slice, one that updates a buffer in place writes the update; an
asynchronous copy or slice (`copy-start` / `slice-start`) reads and writes what it copies.

An estimate for ranking, close to but not the same as XLA's own count (`segnext_jax.aot` reports that one).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4}
_BYTES |= {"s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\](\{[^}]*\})?")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) \([^\n]*\{\n(.*?)^\}", re.M | re.S)
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id", "replica-id"}


@dataclasses.dataclass(frozen=True)
class Operation:
    """One top-level operation: its bytes per program run (trip counts included), what it is and came from."""

    bytes: float
    trips: int
    opcode: str  # 'fusion:kLoop', 'convolution', 'copy-start', ...
    name: str
    shape: str
    op_name: str  # the JAX operation it came from, when XLA kept it


def shape_bytes(dtype: str, dims: str, layout: str | None) -> int:
    """Bytes of one array shape as stored: dimensions padded to the layout's first tile, if any."""
    sizes = [int(d) for d in dims.split(",") if d]
    if not sizes:
        return _BYTES[dtype]
    match = re.match(r"\{([\d,]*)(?::(.*))?\}", layout or "")
    if match and match.group(2):
        minor_to_major = [int(d) for d in match.group(1).split(",") if d] or list(range(len(sizes)))[::-1]
        tile = re.search(r"T\(([\d,]+)\)", match.group(2))
        if tile:
            for position, extent in enumerate(reversed([int(t) for t in tile.group(1).split(",")])):
                if position < len(minor_to_major):
                    dim = minor_to_major[position]
                    sizes[dim] = -(-sizes[dim] // extent) * extent
    return math.prod(sizes) * _BYTES[dtype]


def _shapes_bytes(text: str) -> int:
    return sum(shape_bytes(*match.groups()) for match in _SHAPE.finditer(text))


def _operands(rest: str) -> tuple[str, str]:
    """(the operand list, the attributes after it) of an instruction's text after its opening parenthesis."""
    depth = 0
    for i, char in enumerate(rest):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            if depth == 0:
                return rest[:i], rest[i + 1 :]
            depth -= 1
    return rest, ""


def _instructions(body: str):
    for line in body.split("\n"):
        match = _INSTRUCTION.match(line)
        if match:
            yield *match.groups(), line


def _fusion_traffic(body: str) -> tuple[dict[int, int], int | None]:
    """For a fused computation: bytes actually read of parameters that are only dynamic-sliced, by parameter index,
    and the bytes written when its root updates a parameter in place (None otherwise)."""
    parameters, users, shapes, root = {}, defaultdict(list), {}, None
    for name, shape, opcode, rest, line in _instructions(body):
        shapes[name] = shape
        if opcode == "parameter":
            parameters[name] = int(re.search(r"parameter\((\d+)\)", line).group(1))
        for operand in re.findall(r"%([\w.\-]+)", _operands(rest)[0]):
            users[operand].append((opcode, shape))
        if line.lstrip().startswith("ROOT"):
            root = (opcode, rest)
    read = {
        index: sum(_shapes_bytes(shape) for _, shape in users[name])
        for name, index in parameters.items()
        if users[name] and all(opcode == "dynamic-slice" for opcode, _ in users[name])
    }
    written = None
    if root and root[0] == "dynamic-update-slice":
        buffer, update = (re.findall(r"%([\w.\-]+)", _operands(root[1])[0]) + [None, None])[:2]
        if buffer in parameters:
            read[parameters[buffer]] = 0
            written = _shapes_bytes(shapes.get(update, ""))
    return read, written


def _trip_count(line: str, condition: str) -> int:
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    if known:
        return int(known.group(1))
    bound = re.search(r"s32\[\][^\n=]* constant\((\d+)\)", condition)
    return int(bound.group(1)) if bound else 1


def operations(hlo_text: str) -> list[Operation]:
    """Every top-level operation of an optimised HLO module's text with its bytes, heaviest first."""
    computations = {m.group(2): (bool(m.group(1)), m.group(3)) for m in _COMPUTATION.finditer(hlo_text)}
    entry = next(name for name, (is_entry, _) in computations.items() if is_entry)
    trips, pending, result = {entry: 1}, [entry], []
    while pending:
        computation = pending.pop()
        instructions = list(_instructions(computations[computation][1]))
        shapes = {name: shape for name, shape, *_ in instructions}
        for name, shape, opcode, rest, line in instructions:
            if opcode == "while":
                body = re.search(r"body=%?([\w.\-]+)", line).group(1)
                condition = re.search(r"condition=%?([\w.\-]+)", line).group(1)
                trips[body] = trips[computation] * _trip_count(line, computations[condition][1])
                pending.append(body)
                continue
            if opcode in ("call", "conditional"):
                for callee in re.findall(r"(?:to_apply=|branch_computations=\{|computation=)%?([\w.\-]+)", line):
                    if callee in computations and callee not in trips:
                        trips[callee] = trips[computation]
                        pending.append(callee)
                continue
            if opcode in _FREE or opcode.endswith("-done"):  # an asynchronous copy is counted at its start
                continue
            operands, attributes = _operands(rest)
            sizes = [_shapes_bytes(shapes.get(operand, "")) for operand in re.findall(r"%([\w.\-]+)", operands)]
            written = _shapes_bytes(shape)
            if opcode == "fusion":
                read, in_place = _fusion_traffic(computations[re.search(r"calls=%?([\w.\-]+)", attributes).group(1)][1])
                sizes = [read.get(index, size) for index, size in enumerate(sizes)]
                written = written if in_place is None else in_place
                kind = re.search(r"kind=(\w+)", attributes)
                opcode = f"fusion:{kind.group(1)}" if kind else opcode
            if opcode.endswith("-start"):  # ((source), destination, context): reads and writes the destination's size
                written = shape_bytes(*list(_SHAPE.finditer(shape))[1].groups())
                sizes = [written]
            op_name = re.search(r'op_name="([^"]*)"', line)
            count = trips[computation]
            result.append(
                Operation(
                    (sum(sizes) + written) * count, count, opcode, name, shape, op_name.group(1) if op_name else ""
                )
            )
    return sorted(result, key=lambda operation: -operation.bytes)


def by_source(ops: list[Operation]) -> dict[str, float]:
    """Bytes summed by the JAX operation the HLO came from ('fwd'/'bwd' and the op_name's last part, numbers
    dropped), heaviest first: a coarse map of the step."""
    totals = defaultdict(float)
    for operation in ops:
        last = re.sub(r"\.\d+|\d+", "", operation.op_name.rsplit("/", 1)[-1]) or operation.opcode
        totals[("bwd " if "transpose(" in operation.op_name else "fwd ") + last] += operation.bytes
    return dict(sorted(totals.items(), key=lambda item: -item[1]))
