"""Collective traffic of a compiled program, read from its optimised HLO text.

Why: a multi-slice plan is only useful if it says what crosses the data-centre network (DCN) each
step; the memory analysis does not. This reads every collective of the compiled module (all-reduce,
all-gather, reduce-scatter, all-to-all, collective-permute, synchronous or ``-start``), its payload
bytes, the devices of each replica group, and how often it runs (the ``known_trip_count`` of every
enclosing ``while``: the scan over layers, the CE chunks, gradient accumulation), and sums the
payload of the collectives whose groups span more than one slice.

Payload = the bytes of the op's result array(s) as one device holds them (for all-gather the
gathered array, for reduce-scatter its input, for all-reduce the reduced array). It bounds what a
device exchanges for that op; a hierarchical implementation sends less than that over DCN, so the
figure is an upper bound for planning, not a measured traffic.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Callable, Iterable, Sequence

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
    "c64": 8, "c128": 16,
}

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\([^{]*\))?\s*(?:->\s*[^{]*)?\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_CALLED = re.compile(r"\b(?:body|condition|to_apply|calls|true_computation|false_computation|branch_computations)"
                     r"=\{?(%?[\w.\-]+(?:,\s*%?[\w.\-]+)*)\}?")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_GROUPS_LIST = re.compile(r"replica_groups=\{((?:\{[\d,\s]*\},?\s*)*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
  name: str
  kind: str  # one of COLLECTIVES
  computation: str
  payload_bytes: int  # per device, per execution
  groups: tuple[tuple[int, ...], ...]  # device ids (partition ids) that communicate together
  executions: int = 1  # times it runs per program execution (enclosing while trip counts)


def array_bytes(shape_text: str) -> list[int]:
  """Bytes of every array in an HLO shape (``bf16[4,128]{1,0}`` or a tuple of them)."""
  out = []
  for dtype, dims in _ARRAY.findall(shape_text):
    if dtype not in DTYPE_BYTES:
      continue
    out.append(DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d))
  return out


def _payload(kind: str, started: bool, shape_text: str) -> int:
  sizes = array_bytes(shape_text)
  if not sizes:
    return 0
  if not started:
    return sum(sizes)
  if kind == "all-gather":  # (operands..., results...)
    return sum(sizes[len(sizes) // 2:])
  if kind == "collective-permute":  # (operand, result, context scalars...)
    return sizes[1] if len(sizes) > 1 else sizes[0]
  return sum(sizes)  # all-reduce-start: the reduced arrays


def replica_groups(attrs: str, num_devices: int | None = None) -> tuple[tuple[int, ...], ...]:
  """Device groups of one collective: explicit lists, the iota form ``[n,k]<=[dims]T(perm)``, or
  ``source_target_pairs`` (each pair one group). Empty groups mean all devices."""
  m = _GROUPS_IOTA.search(attrs)
  if m:
    import numpy as np
    shape = [int(x) for x in m.group(1).split(",")]
    dims = [int(x) for x in m.group(2).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(3):
      ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    return tuple(tuple(int(i) for i in row) for row in ids.reshape(shape))
  m = _PAIRS.search(attrs)
  if m:
    return tuple(tuple(int(x) for x in p.split(",")) for p in re.findall(r"\{(\d+,\d+)\}", m.group(1)))
  m = _GROUPS_LIST.search(attrs)
  if m:
    groups = tuple(tuple(int(x) for x in g.split(",") if x.strip()) for g in re.findall(r"\{([\d,\s]*)\}", m.group(1)))
    groups = tuple(g for g in groups if g)
    if groups:
      return groups
  return (tuple(range(num_devices)),) if num_devices else ()


def parse_collectives(hlo_text: str, num_devices: int | None = None) -> list[Collective]:
  """Every collective of an HLO module with how many times one execution of the module runs it."""
  calls: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)  # caller -> [(callee, times)]
  found: list[Collective] = []
  entry, current = None, None
  for line in hlo_text.splitlines():
    stripped = line.strip()
    if not stripped or stripped.startswith("//") or stripped.startswith("HloModule"):
      continue
    m = _COMPUTATION.match(stripped)
    if m and "=" not in stripped.split("{")[0]:
      current = m.group(1)
      if stripped.startswith("ENTRY"):
        entry = current
      continue
    if stripped == "}":
      continue
    m = _INSTRUCTION.match(line)
    if not m or current is None:
      continue
    name, shape_text, opcode, rest = m.groups()
    trip = _TRIP.search(rest)
    times = int(trip.group(1)) if (opcode == "while" and trip) else 1
    for callees in _CALLED.findall(rest):
      for callee in callees.split(","):
        callee = callee.strip().lstrip("%")
        # a while's condition runs trip+1 times, but it holds no collectives worth counting
        calls[current].append((callee, times))
    started = opcode.endswith("-start")
    kind = opcode[: -len("-start")] if started else opcode
    if kind in COLLECTIVES and not opcode.endswith("-done"):
      found.append(Collective(name=name, kind=kind, computation=current,
                              payload_bytes=_payload(kind, started, shape_text),
                              groups=replica_groups(rest, num_devices)))
  runs = _executions(calls, entry)
  return [dataclasses.replace(c, executions=runs.get(c.computation, 0)) for c in found]


def _executions(calls: dict[str, list[tuple[str, int]]], entry: str | None) -> dict[str, int]:
  """Times each computation runs per execution of ``entry`` (sums over every call path)."""
  if entry is None:
    return {}
  runs: dict[str, int] = collections.defaultdict(int)

  def visit(comp: str, times: int, depth: int = 0):
    if depth > 64:
      return
    runs[comp] += times
    for callee, n in calls.get(comp, ()):
      visit(callee, times * n, depth + 1)

  visit(entry, 1)
  return dict(runs)


@dataclasses.dataclass
class Traffic:
  """Collective payload per device per program execution, split by where it travels."""
  dcn_bytes: int
  ici_bytes: int
  dcn_by_kind: dict[str, int]
  dcn_ops: int  # distinct collectives that cross slices

  def __str__(self) -> str:
    kinds = ", ".join(f"{k} {v / (1 << 30):.2f} GiB" for k, v in sorted(self.dcn_by_kind.items())) or "none"
    return (f"collective payload per device per step: across slices (DCN) {self.dcn_bytes / (1 << 30):.2f} GiB "
            f"in {self.dcn_ops} ops ({kinds}); inside slices (ICI) {self.ici_bytes / (1 << 30):.2f} GiB")


def traffic(collectives: Iterable[Collective], slice_of: Callable[[int], int] | Sequence[int]) -> Traffic:
  """Sums payload x executions, as DCN when any group holds devices of two slices."""
  lookup = slice_of if callable(slice_of) else slice_of.__getitem__
  dcn = ici = ops = 0
  by_kind: dict[str, int] = collections.defaultdict(int)
  for c in collectives:
    total = c.payload_bytes * c.executions
    if any(len({lookup(d) for d in g}) > 1 for g in c.groups):
      dcn += total
      by_kind[c.kind] += total
      ops += 1
    else:
      ici += total
  return Traffic(dcn_bytes=dcn, ici_bytes=ici, dcn_by_kind=dict(by_kind), dcn_ops=ops)
