"""Orbax checkpoints of the whole run: params, tables, optimizer, EMA, counters and data iterator.

Items of a step directory (other tools rely on these names):
  params, tables  pure-dict trees (StandardSave)      opt_state, ema  (StandardSave)
  meta            JSON: step, skipped, rng, config     data            Grain iterator state

Saves are asynchronous (the step loop continues while tensorstore writes); a SIGTERM or an Orbax
preemption notice triggers a final save. Restoring takes abstract targets *with shardings of the
current mesh*, so a run saved on 8 devices resumes on 1 or 4.

Faults (README "Reliability"): a step that cannot be read (truncated, missing files, bad
metadata) is reported, the previous good one is used, and once that one has restored the bad
step is moved aside to ``<step>.corrupt`` so the run recomputes and saves it again (nothing is
deleted; a directory where no step restores is left untouched). A run whose model differs from
its checkpoints is refused by :func:`check_resume` before anything is written, listing the
differing fields; unfinished saves (``<step>.orbax-checkpoint-tmp-*``) are reported and ignored.
"""

from __future__ import annotations

import dataclasses
import json
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

from unimage_jax.config_validation import ConfigError
from unimage_jax.errors import UserError
from unimage_jax.interchange import orbax_io
from unimage_jax.interchange.orbax_io import CheckpointReadError, NoUsableCheckpointError  # noqa: F401 (re-exported)
from unimage_jax.training.state import TrainState

# Model fields that choose how the step runs, not what is saved: they may change on resume.
RUNTIME_MODEL_FIELDS = ("attention_impl", "remat_policy", "attention_query_chunk", "ce_chunk", "compute_dtype",
                        "scan_layers")


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


def _flatten(tree: dict, prefix: str) -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def saved_state_fields(config: dict) -> dict[str, Any]:
  """The config fields that decide the shapes and structure of the saved train state."""
  fields = {k: v for k, v in _flatten(config.get("model", {}), "config.model.").items()
            if k.split(".")[2] not in RUNTIME_MODEL_FIELDS}
  optim = config.get("optim", {})
  if "frozen_groups" in optim:
    fields["config.optim.frozen_groups"] = sorted(optim["frozen_groups"])
  if "ema_decay" in optim:  # EMA on/off adds or drops the ``ema`` item
    fields["config.optim.ema_decay > 0"] = float(optim["ema_decay"]) > 0
  if "grad_clip_norm" in optim:  # clipping on/off changes the optimizer-state tree
    fields["config.optim.grad_clip_norm > 0"] = float(optim["grad_clip_norm"]) > 0
  return fields


def config_differences(saved: dict, current: dict) -> list[str]:
  """``field: saved -> current`` for every state-deciding field both configs have and that differs."""
  a, b = saved_state_fields(saved), saved_state_fields(current)
  return [f"{k}: {a[k]!r} in the checkpoints, {b[k]!r} now" for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]


def _newest_saved_config(directory: str, steps: list[int]) -> dict | None:
  for step in reversed(steps):
    try:
      config = orbax_io.saved_config(directory, step)
    except CheckpointReadError:
      continue
    if config is not None:
      return config
  path = os.path.join(directory, orbax_io.CONFIG_NAME)
  if os.path.isfile(path):
    try:
      with open(path) as f:
        return json.load(f)
    except ValueError:
      return None
  return None


def check_resume(config: ml_collections.ConfigDict, directory: str) -> None:
  """Refuses, before anything is written, a run its checkpoints cannot continue; reports leftovers.

  Refused (ConfigError): a model or optimizer structure other than the checkpoints' (every
  differing field listed), ``config.train.steps`` below the newest saved step, and a new run's
  ``config.train.init_from`` that holds no checkpoint.
  """
  directory = os.path.abspath(directory)
  source = config.train.init_from
  if source and not orbax_io.finished_steps(directory) and not orbax_io.run_steps(source):
    raise ConfigError(f"config.train.init_from={source!r} holds no checkpoint steps" +
                      ("" if os.path.isdir(source) else " (the folder does not exist)"))
  for name in orbax_io.unfinished_saves(directory):
    logging.warning("%s/%s is an unfinished save (the run stopped while writing it); it is ignored and "
                    "left in place", directory, name)
  steps = orbax_io.finished_steps(directory)
  if not steps:
    if orbax_io.unfinished_saves(directory):
      logging.warning("no finished checkpoint in %s: training starts from step 0", directory)
    return
  saved = _newest_saved_config(directory, steps)
  errors = config_differences(saved, config.to_dict()) if saved is not None else []
  if errors:
    errors.append(f"resume with the checkpoints' settings, or use a new --workdir (or "
                  f"--config.train.init_from={os.path.dirname(directory)} to start from its params)")
  if steps[-1] > config.train.steps:
    errors.append(f"config.train.steps={config.train.steps} is below the newest checkpoint's step {steps[-1]}; "
                  "raise it to continue this run")
  if errors:
    raise ConfigError(f"this run does not match its checkpoints in {directory}:\n  " + "\n  ".join(errors))


def _shape_differences(abstract: Any, saved: Any, item: str) -> list[str]:
  want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
  have = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(saved)}
  out = [f"{item}{k}: missing in the checkpoint" for k in sorted(want.keys() - have.keys())]
  out += [f"{item}{k}: not in this model" for k in sorted(have.keys() - want.keys())]
  out += [f"{item}{k}: {have[k]} in the checkpoint, {want[k]} now" for k in sorted(want.keys() & have.keys())
          if want[k] != have[k]]
  return out


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
    """Newest readable checkpoint onto ``shardings``; None when the directory has none.

    Steps that fail to read are moved aside (``<step>.corrupt``) once an older one restored, so
    the run recomputes them and saves them again.
    """
    if not orbax_io.finished_steps(self.directory):
      return None

    def load(step: int) -> Restored:
      self._check_shapes(step, abstract)  # a different model is refused, never taken for corruption
      try:
        return self._restore(step, abstract, shardings, data_iterator)
      except UserError:
        # refused, not unreadable (e.g. elastic.ElasticResumeError: a data position that cannot move
        # to this process count): the message says how to resume; never fall back or move the step aside
        raise
      except Exception as e:  # noqa: BLE001 - any failure to read a step falls back to the previous
        raise CheckpointReadError(orbax_io.error_summary(e)) from None

    step, restored = orbax_io.with_fallback(self.directory, load, on_fallback=self._move_aside)
    self._last_saved = step
    return restored

  def _move_aside(self, failed: list[int], good: int) -> None:
    if jax.process_index() == 0:
      for step in failed:
        path = orbax_io.move_aside(self.directory, step)
        logging.warning("moved the unreadable checkpoint %s/%d to %s; it is recomputed from step %d and saved again",
                        self.directory, step, path, good)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("unimage_jax.checkpoint_move_aside")
    self.manager.reload()

  def _check_shapes(self, step: int, abstract: TrainState) -> None:
    ckpt = orbax_io.LazyCheckpoint(self.directory, step)
    errors = []
    for item in ("params", "tables"):
      errors += _shape_differences(getattr(abstract, item), ckpt.metadata(item), item)
    if errors:
      raise ConfigError(f"checkpoint {self.directory}/{step} holds another model than this config:\n  "
                        + "\n  ".join(errors[:20]) + ("\n  ..." if len(errors) > 20 else ""))

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
    elastic_states = None
    if has_data and self.config.train.data_resume == "restart":
      logging.warning("config.train.data_resume=restart: the data stream starts over (stories seen before repeat)")
      has_data = False
    if has_data:
      from data_pipelines import elastic  # noqa: PLC0415 (the data package is optional for the trainer)
      data_dir = os.path.join(self.directory, str(step), "data")
      saved_count = elastic.saved_process_count(data_dir)
      if saved_count is not None and saved_count != jax.process_count():
        elastic_states = elastic.load_states(data_dir)  # every process reads all: the workdir is shared
      else:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    if elastic_states is not None:
      message = data_iterator.resume_elastic(elastic_states, os.path.join(self.directory, str(step), "data"))
      logging.warning("data saved by %d processes continues on %d: %s", len(elastic_states), jax.process_count(),
                      message)
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
