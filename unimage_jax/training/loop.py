"""The training loop: validate, build mesh/state/data, restore or init, compile once, run, checkpoint."""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from unimage_jax import config_text, sharding
from unimage_jax import tokenizer as tokenizer_lib
from unimage_jax.config_validation import ConfigError, validate_config
from unimage_jax.errors import UserError
from unimage_jax.interchange import orbax_io
from unimage_jax.training import checkpointing, data_source, metrics as metrics_lib, profiling, train_setup


class NonFiniteLossError(UserError, FloatingPointError):
  """Raised with ``train.nonfinite='stop'`` when a step had a non-finite loss or gradient."""


def _progress(total: int, initial: int):
  if jax.process_index() != 0:
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _init_from(state, config: ml_collections.ConfigDict, shardings):
  """Starts from another run's params (e.g. stage 2 from stage 1): fresh optimizer, same shapes."""
  source = config.train.init_from
  try:
    loaded = orbax_io.load_checkpoint(source, config=config)  # the readers' fallback
  except UserError as e:
    raise ConfigError(f"config.train.init_from={source!r}: {e}") from e
  params, tables = loaded.params, loaded.tables
  mismatch = [f"{jax.tree_util.keystr(p)}: {a.shape} vs {b.shape}" for (p, a), b in
              zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(params)) if a.shape != b.shape]
  if jax.tree.structure(state.params) != jax.tree.structure(params) or mismatch:
    raise ConfigError(f"config.train.init_from={source!r} does not match this model: {mismatch[:10] or 'different tree'}")
  params = jax.device_put(jax.tree.map(lambda x, p: x.astype(p.dtype), params, state.params), shardings.params)
  # the EMA starts as a copy, never the params' own buffers: the step donates both (astype of fp32
  # params returns the same array, and donating one buffer twice fails at the first step)
  ema = None if state.ema is None else jax.device_put(
      jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), params), shardings.ema)
  logging.warning("initialised params from %s/%d", loaded.directory, loaded.step)
  return state.replace(params=params, ema=ema, tables=jax.device_put(tables, shardings.tables))


def _already_done(workdir: str, step: int) -> dict[str, Any]:
  """The result of a run whose checkpoint already reached ``config.train.steps``: its last metrics."""
  logging.warning("%s is already at step %d = config.train.steps: nothing to train (raise "
                  "--config.train.steps to continue)", workdir, step)
  try:
    logged = [m for m in metrics_lib.read_metrics(workdir) if m["step"] == step]
  except (OSError, ValueError):
    logged = []
  return dict(logged[-1] if logged else {}, step=step, already_done=True)


def _write_run_files(config: ml_collections.ConfigDict) -> None:
  """The workdir's record of the run (process 0): ``config.json``, ``config.txt`` (sorted ``key = value``
  lines, as ``tools/show_config.py`` prints them) and, for real data, a copy of the tokenizer."""
  workdir = config.train.workdir
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, "config.txt"), "w") as f:
    f.write(config_text.config_text(config))
  if config.data.dataset != "synthetic":
    path = config.data.tokenizer_path  # a self-contained run: the director finds its tokenizer here
    shutil.copyfile(tokenizer_lib.tokenizer_file(path), os.path.join(workdir, tokenizer_lib.workdir_copy_name(path)))


def _restore_or_init(setup: train_setup.TrainSetup, ckpt: checkpointing.Checkpointer, data):
  """(state, first step): the newest checkpoint with its data position, else a fresh state
  (from ``config.train.init_from``'s params when set)."""
  config = setup.config
  restored = ckpt.restore_latest(setup.abstract, setup.shardings, data)
  if restored is None:
    state = setup.init_state()
    if config.train.init_from:
      state = _init_from(state, config, setup.shardings)
    return state, 0
  logging.info("resumed from step %d (data position restored: %s)", restored.step, restored.data_restored)
  if not restored.data_restored:
    logging.warning("checkpoint step %d has no data-iterator state: data order restarts", restored.step)
  return restored.state, restored.step


def _compile(setup: train_setup.TrainSetup, state):
  """The step compiled once, for this state's shardings, before the first batch is drawn."""
  t0 = time.time()
  compiled = setup.compile(state)
  logging.info("train step compiled in %.1fs", time.time() - t0)
  return compiled


class _StepLogger:
  """Every ``train.log_every`` steps (and the last): the step's metrics with the window's step time,
  tokens/s and MFU to ``metrics.jsonl``/TensorBoard and the progress bar; enforces ``nonfinite='stop'``."""

  def __init__(self, config: ml_collections.ConfigDict, throughput: metrics_lib.Throughput, start: int,
               skipped: int):
    self.config, self.throughput = config, throughput
    self.writer = metrics_lib.MetricsWriter(config.train.workdir, resume_step=start)
    self.bar = _progress(config.train.steps, start)
    self.last: dict[str, Any] = {}
    self.skipped_seen = skipped
    self.window_start, self.window_steps = time.time(), 0

  def step_done(self, done: int, metrics: dict[str, jax.Array]) -> None:
    self.window_steps += 1
    if done % self.config.train.log_every == 0 or done == self.config.train.steps:
      self._log(done, metrics)

  def _log(self, done: int, metrics: dict[str, jax.Array]) -> None:
    fetched = {k: float(v) for k, v in jax.device_get(metrics).items()}
    fetched.update(self.throughput.rates((time.time() - self.window_start) / self.window_steps))
    self.writer.write(done, fetched)
    self.last = dict(fetched, step=done)
    if self.bar is not None:
      self.bar.update(self.window_steps)
      self.bar.set_postfix(loss=f"{fetched['loss']:.4f}", ce=f"{fetched['ce']:.3f}", mse=f"{fetched['mse']:.3f}")
    if self.config.train.nonfinite == "stop" and fetched["skipped"] > self.skipped_seen:
      raise NonFiniteLossError(
          f"non-finite loss or gradient between steps {done - self.window_steps + 1} and {done} "
          f"(loss={fetched['loss']}, grad_norm={fetched['grad_norm']}); set config.train.nonfinite='skip' "
          "to skip such steps instead")
    self.skipped_seen = int(fetched["skipped"])
    self.window_start, self.window_steps = time.time(), 0

  def close(self) -> None:
    self.writer.close()
    if self.bar is not None:
      self.bar.close()


def _run_steps(setup: train_setup.TrainSetup, compiled, state, start: int, data,
               ckpt: checkpointing.Checkpointer) -> dict[str, Any]:
  """Steps ``start + 1 .. train.steps``: checkpoints every ``train.checkpoint_every`` and at the end,
  stops early (after a save) on preemption; returns the last logged metrics."""
  config = setup.config
  logger = _StepLogger(config, metrics_lib.Throughput.of(config, setup.mesh), start, int(state.skipped))
  profiler = profiling.StepProfiler(config.train.profile_steps, config.train.workdir)
  try:
    for step in range(start, config.train.steps):
      done = step + 1
      profiler.before(done)  # the trace includes the step's data loading
      batch = next(data)
      with jax.profiler.StepTraceAnnotation("train", step_num=done):
        state, metrics = compiled(state, batch)
      profiler.after(done, metrics)
      logger.step_done(done, metrics)
      if config.train.checkpoint_every and done % config.train.checkpoint_every == 0:
        ckpt.save(state, data)
      if ckpt.should_stop(done):
        logging.warning("stopping at step %d on preemption; saving", done)
        ckpt.save(state, data, force=True)
        break
    else:
      ckpt.save(state, data, force=True)
  finally:
    profiler.stop()
    ckpt.close()
    logger.close()
  return logger.last


def train(config: ml_collections.ConfigDict, *, devices=None) -> dict[str, Any]:
  """Runs ``config.train.steps`` steps in ``config.train.workdir``; returns the last logged metrics."""
  validate_config(config)
  setup = train_setup.setup_train(config, sharding.make_mesh(config.mesh, devices))
  workdir = config.train.workdir
  # before anything is written: a run its checkpoints cannot continue is refused here
  checkpoints = os.path.join(workdir, orbax_io.CHECKPOINTS)
  checkpointing.check_resume(config, checkpoints)
  data = data_source.make_data_iterator(config, setup.mesh)  # builds the default data on first use
  _write_run_files(config)  # only once the data and tokenizer are known to be good
  ckpt = checkpointing.Checkpointer(checkpoints, config)
  ckpt.install_sigterm_handler()
  state, start = _restore_or_init(setup, ckpt, data)
  if start >= config.train.steps:  # only a restored run can be there (validate_config: steps > 0)
    ckpt.close()
    return _already_done(workdir, start)
  return _run_steps(setup, _compile(setup, state), state, start, data, ckpt)


__all__ = ["train", "NonFiniteLossError", "ConfigError"]
