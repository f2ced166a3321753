"""Collective traffic of a compiled program, read from its optimised HLO text.

Why: a multi-slice plan is only useful if it says what crosses the data-centre network (DCN) each
step; the memory analysis does not. This reads every collective of the compiled module (all-reduce,
all-gather, reduce-scatter, all-to-all, collective-permute, synchronous or ``-start``) with its
payload bytes and device groups, and how often it runs (the trip count of every enclosing
``while``: the scan over layers, the CE chunks, gradient accumulation).

DCN bytes come from two places. A multi-slice TPU executable is compiled per slice: its ICI
collectives name devices inside one slice, and what crosses slices is explicit, as ``send`` ops to
the Megascale runtime (``_xla_megascale_transfer_type``, e.g. ``ALL_REDUCE``); their operand bytes
are what one device sends over DCN. Elsewhere (one program over all devices), a collective whose
group holds devices of two slices counts as DCN.

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

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_CALLED = re.compile(r"\b(body|condition|to_apply|calls|called_computations|true_computation|false_computation|"
                     r"branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONSTANT = re.compile(r"^\s*%?([\w.\-]+)\s*=\s*[su](?:8|16|32|64)\[\]\S*\s+constant\((-?\d+)\)")
_COMPARE = re.compile(r"compare\(%?([\w.\-]+),\s*%?([\w.\-]+)\),\s*direction=(LT|LE|GT|GE|NE)")
_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
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
  """Every collective of an HLO module (and every Megascale DCN ``send``, as kind ``dcn-<type>``)
  with how many times one execution of the module runs it."""
  calls: dict[str, list[tuple[str, str | None]]] = collections.defaultdict(list)  # caller -> [(callee, while)]
  whiles: dict[str, tuple[int | None, str]] = {}  # while instruction -> (known trip count, condition)
  constants: dict[str, dict[str, int]] = collections.defaultdict(dict)  # computation -> integer scalars
  roots: dict[str, tuple[str, str, str]] = {}  # computation -> ROOT compare (lhs, rhs, direction)
  found: list[Collective] = []
  entry, current = None, None
  for line in hlo_text.splitlines():
    if not line.strip() or line.lstrip().startswith(("//", "HloModule")):
      continue
    if not line[0].isspace():  # computation headers start at column 0, instructions are indented
      m = _COMPUTATION.match(line.strip())
      if m:
        current = m.group(2)
        if m.group(1):
          entry = current
      continue
    m = _INSTRUCTION.match(line)
    if not m or current is None:
      continue
    name, shape_text, opcode, rest = m.groups()
    c = _CONSTANT.match(line)
    if c:
      constants[current][c.group(1)] = int(c.group(2))
    if line.lstrip().startswith("ROOT") and opcode == "compare":
      cm = _COMPARE.search(line)
      if cm:
        roots[current] = cm.groups()
    called = {key: [x.strip().lstrip("%") for x in value.strip("{}").split(",") if x.strip()]
              for key, value in _CALLED.findall(rest)}
    if opcode == "while":
      trip = _TRIP.search(rest)
      whiles[name] = (int(trip.group(1)) if trip else None, called.get("condition", [""])[0])
    for key, callees in called.items():
      for callee in callees:
        calls[current].append((callee, name if (opcode == "while" and key == "body") else None))
    if opcode == "send" and _MEGASCALE.search(rest):
      sizes = array_bytes(shape_text)
      found.append(Collective(name=name, kind="dcn-" + _MEGASCALE.search(rest).group(1).lower(),
                              computation=current, payload_bytes=sizes[0] if sizes else 0, groups=()))
      continue
    started = opcode.endswith("-start")
    kind = opcode[: -len("-start")] if started else opcode
    if kind in COLLECTIVES and not opcode.endswith("-done"):
      found.append(Collective(name=name, kind=kind, computation=current,
                              payload_bytes=_payload(kind, started, shape_text),
                              groups=replica_groups(rest, num_devices)))
  trips = {w: known if known is not None else _trip_from_condition(cond, constants, roots)
           for w, (known, cond) in whiles.items()}
  runs = _executions(calls, trips, entry)
  return [dataclasses.replace(c, executions=runs.get(c.computation, 0)) for c in found]


def _trip_from_condition(cond: str, constants, roots) -> int:
  """``i < N`` loops from 0 (what scans and fori loops lower to): N; 1 when it cannot be read."""
  root = roots.get(cond)
  if root is None:
    return 1
  lhs, rhs, direction = root
  bound = constants[cond].get(rhs, constants[cond].get(lhs))
  if bound is None:
    return 1
  return max(bound + (direction == "LE"), 1)


def _executions(calls, trips: dict[str, int], entry: str | None) -> dict[str, int]:
  """Times each computation runs per execution of ``entry`` (sums over every call path)."""
  if entry is None:
    return {}
  runs: dict[str, int] = collections.defaultdict(int)

  def visit(comp: str, times: int, depth: int = 0):
    if depth > 64:
      return
    runs[comp] += times
    for callee, loop in calls.get(comp, ()):
      visit(callee, times * (trips.get(loop, 1) if loop else 1), depth + 1)

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
    kinds = ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(self.dcn_by_kind.items())) or "none"
    return (f"collective payload per device per step: across slices (DCN) {format_bytes(self.dcn_bytes)} "
            f"in {self.dcn_ops} ops ({kinds}); inside slices (ICI) {format_bytes(self.ici_bytes)}")


def format_bytes(n: int) -> str:
  for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n} B"


def traffic(collectives: Iterable[Collective], slice_of: Callable[[int], int] | Sequence[int]) -> Traffic:
  """Sums payload x executions: DCN for Megascale sends and for groups holding devices of two
  slices (``slice_of``: partition id -> slice index), ICI otherwise."""
  lookup = slice_of if callable(slice_of) else slice_of.__getitem__
  dcn = ici = ops = 0
  by_kind: dict[str, int] = collections.defaultdict(int)
  for c in collectives:
    total = c.payload_bytes * c.executions
    if c.kind.startswith("dcn-") or any(len({lookup(d) for d in g}) > 1 for g in c.groups):
      dcn += total
      by_kind[c.kind] += total
      ops += 1
    else:
      ici += total
  return Traffic(dcn_bytes=dcn, ici_bytes=ici, dcn_by_kind=dict(by_kind), dcn_ops=ops)
