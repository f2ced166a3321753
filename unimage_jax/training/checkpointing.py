"""Orbax checkpoints of the whole run: params, tables, optimizer, EMA, counters and data iterator.

Items of a step directory (other tools rely on these names):
  params, tables  pure-dict trees (StandardSave)      opt_state, ema  (StandardSave)
  meta            JSON: step, skipped, rng, config     data            Grain iterator state

Saves are asynchronous (the step loop continues while tensorstore writes); a SIGTERM or an Orbax
preemption notice triggers a final save. Restoring takes abstract targets *with shardings of the
current mesh*, so a run saved on 8 devices resumes on 1 or 4. A latest checkpoint that cannot be
read (truncated, missing files, bad metadata) is reported by a warning that names it and the
error, and the previous good one is used.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from unimage_jax.interchange import orbax_io
from unimage_jax.training.state import TrainState


class NoUsableCheckpointError(RuntimeError):
  """Every checkpoint in the directory failed to restore."""


@dataclasses.dataclass
class Restored:
  state: TrainState
  step: int
  data_restored: bool


def _chunked(tree):
  """Storage chunks of at most 64 MB, so exporters can stream a large array chunk by chunk."""
  return jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=orbax_io.CHUNK_BYTES), tree)


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class Checkpointer:
  """Thin policy layer over ``ocp.CheckpointManager`` for the train loop."""

  def __init__(self, directory: str, config: ml_collections.ConfigDict, *, async_save: bool = True):
    self.config = config
    self.directory = directory = os.path.abspath(directory)  # Orbax/TensorStore need absolute paths
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.train.keep_checkpoints,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self.manager = ocp.CheckpointManager(directory, options=options)
    if jax.process_index() == 0:  # export/import tools read the config next to the steps
      with open(os.path.join(directory, orbax_io.CONFIG_NAME), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    self._sigterm = False
    self._previous_handler = None
    self._last_saved = self.manager.latest_step()

  # ------------------------------------------------------------------ preemption
  def install_sigterm_handler(self) -> None:
    """SIGTERM sets a flag; the loop saves at the next step boundary and exits cleanly."""
    def handler(signum, frame):
      logging.warning("SIGTERM received: saving a checkpoint at the next step boundary")
      self._sigterm = True
    self._previous_handler = signal.signal(signal.SIGTERM, handler)

  def should_stop(self, step: int) -> bool:
    return self._sigterm or self.manager.reached_preemption(step)

  # ------------------------------------------------------------------ save
  def save(self, state: TrainState, data_iterator: Any | None, *, force: bool = False) -> bool:
    step = int(state.step)
    if step == self._last_saved:
      return False
    self._last_saved = step
    items = dict(
        params=ocp.args.StandardSave(state.params, save_args=_chunked(state.params)),
        tables=ocp.args.StandardSave(state.tables, save_args=_chunked(state.tables)),
        opt_state=ocp.args.StandardSave(state.opt_state),
        meta=ocp.args.JsonSave({
            "step": step,
            "skipped": int(state.skipped),
            "rng": [int(x) for x in np.asarray(state.rng)],
            "config": self.config.to_dict(),
        }),
    )
    if state.ema is not None:
      items["ema"] = ocp.args.StandardSave(state.ema, save_args=_chunked(state.ema))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)

  # ------------------------------------------------------------------ restore
  def restore_latest(self, abstract: TrainState, shardings: TrainState, data_iterator: Any | None) -> Restored | None:
    """Newest readable checkpoint onto ``shardings``; None when the directory has none."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return None
    errors = []
    for step in steps:
      try:
        return self._restore(step, abstract, shardings, data_iterator)
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous
        message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        errors.append(f"step {step}: {message}")
        logging.warning("checkpoint %s/%d is unusable (%s); falling back to the previous one",
                        self.directory, step, message)
    raise NoUsableCheckpointError(f"no checkpoint in {self.directory} could be restored:\n  " + "\n  ".join(errors))

  def _restore(self, step: int, abstract: TrainState, shardings: TrainState, data_iterator) -> Restored:
    items = dict(
        params=ocp.args.StandardRestore(_with_shardings(abstract.params, shardings.params)),
        tables=ocp.args.StandardRestore(_with_shardings(abstract.tables, shardings.tables)),
        opt_state=ocp.args.StandardRestore(_with_shardings(abstract.opt_state, shardings.opt_state)),
        meta=ocp.args.JsonRestore(),
    )
    if abstract.ema is not None:
      items["ema"] = ocp.args.StandardRestore(_with_shardings(abstract.ema, shardings.ema))
    saved_items = self.manager.item_metadata(step)
    has_data = data_iterator is not None and saved_items is not None and "data" in saved_items.keys()
    if has_data:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    meta = out["meta"]
    if meta["step"] != step:
      raise ValueError(f"meta step {meta['step']} does not match directory step {step}")
    put = lambda x, s: jax.device_put(jnp.asarray(x), s)
    state = TrainState(
        step=put(np.int32(step), shardings.step),
        params=out["params"],
        tables=out["tables"],
        opt_state=out["opt_state"],
        ema=out["ema"] if abstract.ema is not None else None,
        skipped=put(np.int32(meta["skipped"]), shardings.skipped),
        rng=put(np.asarray(meta["rng"], np.uint32), shardings.rng),
    )
    return Restored(state=state, step=step, data_restored=has_data)
