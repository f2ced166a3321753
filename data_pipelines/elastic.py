"""Resuming the data stream on another number of processes (a pod re-provisioned at another size).

The stream is one global sequence of planned samples (source -> shuffle(seed) -> repeat -> plan),
and process ``p`` of ``n`` reads the global indices ``start + p, start + p + n, ...``. Its saved
state (one JSON per process, Grain's checkpoint handler) says how many of its samples it has read
(the packer's ``next``) and which of those are still buffered in open rows, not yet trained on.

Same process count: every process restores its own state exactly (bit-for-bit resume).

Another count: process ``p`` has read every one of its indices below ``start + p + next_p * n``,
so the smallest index nobody has read past is ``S = max_p(start + p + next_p * n)``; the new
processes read ``S + q, S + q + m, ...``. **Guarantee: no sample is read twice across the restart,
so no story is seen twice within an epoch** (an epoch is a permutation of the stories). The
samples the old processes had not reached below ``S`` and the ones buffered in their open rows are
skipped (counted and logged; a few rows' worth per process). Exactly-once would need the rows the
old processes had half-built, which Grain's per-process state does not let another process adopt.

Refused, with how to restart the data: states from worker processes (``data.num_workers > 0``
slices the stream again per worker), and states without the packer's position.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

from unimage_jax.errors import UserError

_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")
RESTART_HINT = ("to start the data stream over instead (stories repeat), resume with "
                "--config.train.data_resume=restart")


class ElasticResumeError(UserError, ValueError):
  """The saved data position cannot be continued on this number of processes."""


def saved_process_count(directory: str) -> int | None:
  """How many processes wrote the data states in ``directory`` (None when there are none)."""
  counts = {int(m.group(2)) for m in map(_FILE.fullmatch, _listdir(directory)) if m}
  if len(counts) > 1:
    raise ElasticResumeError(f"{directory} holds data states of several process counts {sorted(counts)}; "
                             + RESTART_HINT)
  return counts.pop() if counts else None


def _listdir(directory: str) -> list[str]:
  try:
    return os.listdir(directory)
  except FileNotFoundError:
    return []


def load_states(directory: str) -> dict[int, Any]:
  """``{process index: saved state}`` of every process that wrote ``directory``."""
  states, count = {}, None
  for name in _listdir(directory):
    m = _FILE.fullmatch(name)
    if m:
      with open(os.path.join(directory, name)) as f:
        states[int(m.group(1))] = json.load(f)
      count = int(m.group(2))
  if count is None or sorted(states) != list(range(count)):
    raise ElasticResumeError(f"{directory}: data states of processes {sorted(states)} of {count} are "
                             f"incomplete; {RESTART_HINT}")
  return states


def packer_state(state: Any) -> dict[str, Any] | None:
  """The packer's state inside a (nested) Grain iterator state."""
  if isinstance(state, dict):
    if {"anchor", "next", "ready", "open"} <= state.keys():
      return state
    for value in state.values():
      found = packer_state(value)
      if found is not None:
        return found
  elif isinstance(state, list):
    for value in state:
      found = packer_state(value)
      if found is not None:
        return found
  return None


@dataclasses.dataclass(frozen=True)
class ResumePoint:
  start: int  # the first global sample index the new processes read
  skipped: int  # samples read by nobody, or buffered and never trained on, below ``start``
  saved_processes: int


def resume_point(states: dict[int, Any], directory: str = "") -> ResumePoint:
  """Where ``m`` new processes continue a stream saved by ``len(states)`` processes."""
  n = len(states)
  next_global, skipped = {}, 0
  for p, state in sorted(states.items()):
    if not isinstance(state, dict) or "stream" not in state:
      raise ElasticResumeError(f"{directory}: the data state of process {p} predates elastic resume; "
                               + RESTART_HINT)
    if state.get("num_workers", 0) > 0:
      raise ElasticResumeError(
          f"{directory}: the data was read by {state['num_workers']} worker processes per host "
          "(config.data.num_workers), whose positions cannot move to another process count; resume on the "
          f"saved {n} processes, or {RESTART_HINT}")
    packer = packer_state(state["stream"])
    if packer is None:
      raise ElasticResumeError(f"{directory}: the data state of process {p} has no packer position; " + RESTART_HINT)
    start, count = int(state["start"]), int(state["process_count"])
    if count != n or int(state["process_index"]) != p:
      raise ElasticResumeError(f"{directory}: process {p}'s data state says it is {state['process_index']} of {count}")
    next_global[p] = start + p + int(packer["next"]) * n
    skipped += len({i for m in packer["ready"] + packer["open"] for i, _ in m})  # read, never trained on
  s = max(next_global.values())
  # indices below s that their owner had not reached: owner p misses ceil((s - next_global[p]) / n)
  skipped += sum(-(-(s - g) // n) for g in next_global.values())
  return ResumePoint(start=s, skipped=skipped, saved_processes=n)
