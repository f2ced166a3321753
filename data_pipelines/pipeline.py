"""The training input pipeline (docs/ARCHITECTURE.md §6), built on Grain.

ArrayRecord source (TFDS) -> shuffle(seed) -> repeat -> decode + task plan (random_map, keyed by
the global element index) -> per-process slice -> pack (first-fit, checkpointable) -> batch ->
multiprocess prefetch -> numpy dicts, or global ``jax.Array``s on a mesh.

Determinism: every random choice derives from ``config.data.seed`` and the element's index, and
packing is a deterministic function of the sample stream, so the batches of a run are a function of
the config; :class:`TrainIterator` state (JSON) restores the stream exactly.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import numpy as np

from data_pipelines import builders
from data_pipelines.packing import PackIterDataset, RowEncoder
from data_pipelines.sequence_plan import PlanConfig, Planner, Sample, SampleTooLargeError
from unimage_jax import config_validation, script_schema
from unimage_jax.config_validation import ConfigError
from unimage_jax.errors import UserError
from unimage_jax.tokenizer import load_tokenizer, tokenizer_file, train_any_tokenizer


class PlanTransform(grain.transforms.RandomMap):
  """Decodes a stored record and plans one sample; picklable (workers rebuild the tokenizer)."""

  def __init__(self, plan_cfg: PlanConfig, tokenizer_path: str, max_vocab_size: int | None = None):
    self.plan_cfg, self.tokenizer_path, self.max_vocab_size = plan_cfg, tokenizer_path, max_vocab_size
    self._planner: Planner | None = None

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_planner"} | {"_planner": None}

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> Sample:
    if self._planner is None:
      self._planner = Planner(self.plan_cfg, load_tokenizer(self.tokenizer_path, self.max_vocab_size))
    record = builders.decode_record(element)
    if "latents" in element:  # latent_cache.WithLatents: the keyframes' cached VAE latents
      record["latents"] = element["latents"]
    try:
      return self._planner.plan(record, rng)
    except SampleTooLargeError as e:
      raise SampleTooLargeError(f"story {record['story_id']}: {e}; raise config.data.und_len/gen_len/"
                                "vit_len/max_segments or shorten the story") from None


def row_encoder(config) -> RowEncoder:
  m, d = config.model, config.data
  cfg = PlanConfig.from_config(config)
  return RowEncoder(cfg.sizes, latent_dim=m.latent_channels * m.latent_patch_size ** 2,
                    latent_grid=m.max_latent_grid, vit_patch_dim=m.vit.patch_size ** 2 * 3,
                    vit_grid=m.vit.max_patches_per_side,
                    sqrt_length_loss_weighting=bool(d.sqrt_length_loss_weighting),
                    sequence_shards=max(int(config.mesh.get("sequence", 1)), 1),
                    slot_layout=config_validation.slot_layout(d))


class _OneSamplePerRow(grain.transforms.Map):
  """The unpacked baseline: every sample alone in its row (picklable for worker processes)."""

  def __init__(self, encoder: RowEncoder):
    self.encoder = encoder

  def map(self, sample: Sample) -> dict[str, np.ndarray]:
    return self.encoder([sample.segments])


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # only when the caller did not say; keeps workers free of jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return process_index, process_count


class MissingTokenizerError(UserError, FileNotFoundError):
  """``config.data.tokenizer_path`` names no file (and is not the default one built on first use)."""


def check_tokenizer(config):
  """Loads the tokenizer named by config.data.tokenizer_path (SentencePiece ``.model`` or HF
  ``tokenizer.json``/folder) and checks it fits the model's vocab and keeps every script symbol
  one token."""
  path = config.data.tokenizer_path
  if not os.path.exists(tokenizer_file(path)):
    raise MissingTokenizerError(f"tokenizer model not found: config.data.tokenizer_path={path!r}; train one with "
                                "tools/train_tokenizer.py")
  try:
    return load_tokenizer(path, max_vocab_size=config.model.vocab_size)
  except ValueError as e:  # too many pieces for the model, missing control symbols, split symbols
    raise ConfigError(str(e)) from None


def default_tokenizer_path(config) -> str:
  """Where ``ensure_dataset`` builds the StoryWorld tokenizer: ``<data_dir>/../tokenizer/spm.model``."""
  return os.path.join(os.path.dirname(os.path.normpath(config.data.data_dir)), "tokenizer", "spm.model")


def default_hf_tokenizer_path(config) -> str:
  """The HF twin built on first use as well: ``<data_dir>/../tokenizer/hf/tokenizer.json``."""
  return os.path.join(os.path.dirname(default_tokenizer_path(config)), "hf", "tokenizer.json")


def _is_default_tokenizer(config) -> bool:
  path = os.path.abspath(tokenizer_file(config.data.tokenizer_path))
  return config.data.dataset == "storyworld" and path in (
      os.path.abspath(default_tokenizer_path(config)), os.path.abspath(default_hf_tokenizer_path(config)))


def make_sample_dataset(config, *, process_index: int = 0, process_count: int = 1, split: str = "train",
                        repeat: bool = True, start: int = 0) -> grain.MapDataset:
  """Planned samples (before packing): source -> shuffle -> repeat -> slice -> decode + plan.

  Process ``p`` of ``n`` reads the global sample indices ``start + p + k n`` (``start`` > 0 after
  an elastic resume, see ``data_pipelines/elastic.py``).
  """
  d = config.data
  source = builders.load_source(d.data_dir, d.dataset, split, d.dataset_config, default_build_name(config))
  check_tokenizer(config)
  if config.model.autoencoder == "flux_vae":
    from data_pipelines import latent_cache
    source = latent_cache.open_for_config(config, source, split)
  ds = grain.MapDataset.source(source).shuffle(seed=d.seed)
  if repeat:
    ds = ds.repeat(None)
  # Lazy MapDataset: planning is declared before the slice so each element's random stream is
  # keyed by its *global* index (slicing first would give every process the same streams).
  ds = ds.random_map(PlanTransform(PlanConfig.from_config(config), d.tokenizer_path, config.model.vocab_size),
                     seed=d.seed)
  return ds[start + process_index::process_count]


def make_dataset(config, *, process_index: int = 0, process_count: int = 1, split: str = "train",
                 repeat: bool = True, packed: bool = True, start: int = 0) -> grain.IterDataset:
  """Batches of packed rows for one process: dicts of numpy arrays ``[B_local, ...]``.

  ``packed=False`` puts one sample per row (the baseline the benchmark compares against).
  """
  d = config.data
  if d.batch_size % process_count:
    raise ValueError(f"config.data.batch_size={d.batch_size} is not divisible by {process_count} processes")
  ds = make_sample_dataset(config, process_index=process_index, process_count=process_count,
                           split=split, repeat=repeat, start=start)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
  encoder = row_encoder(config)
  if packed:
    it = PackIterDataset(it, encoder.sizes, encoder, num_open_rows=d.pack_open_rows, max_age=d.pack_max_age,
                         min_keep=d.pack_min_keep)
  else:
    it = it.map(_OneSamplePerRow(encoder))
  it = it.batch(d.batch_size // process_count, drop_remainder=True)
  if d.num_workers > 0:
    from absl import flags  # Grain's worker processes read absl flags; libraries may not parse them
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers,
                                                     per_worker_buffer_size=d.prefetch_buffer_size))
  return it


class TrainIterator(grain.DatasetIterator):
  """Iterator of batches with Grain state (``get_state``/``set_state``, JSON-able).

  It is itself a ``grain.DatasetIterator``, so Orbax takes it directly:
  ``ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(it))`` in a CheckpointManager
  (or :func:`save_iterator_state` / :func:`restore_iterator_state`). With a mesh, batches are
  global ``jax.Array``s; the state is that of the host-side stream either way, with where this
  process reads in the global stream (``start``, ``process_index``, ``process_count``) so that
  another number of processes can continue it (:meth:`continue_at`, ``data_pipelines/elastic.py``).
  """

  def __init__(self, dataset: grain.IterDataset, mesh=None, rules=None, *, config=None, process_index: int = 0,
               process_count: int = 1, start: int = 0):
    self.dataset = dataset
    self.grain_iterator = iter(dataset)
    super().__init__(self.grain_iterator)
    self.mesh = mesh
    self.config, self.process_index, self.process_count, self.start = config, process_index, process_count, start
    self.mesh_rules = rules

  def __next__(self) -> dict[str, Any]:
    batch = next(self.grain_iterator)
    if self.mesh is None:
      return batch
    import jax
    from unimage_jax import sharding  # imports jax: only in the trainer's process, not in workers
    # rows by the batch rule, the und/gen buffers' length by the length rule (context parallelism)
    shardings = sharding.batch_shardings(self.mesh, self.mesh_rules, {k: v.shape for k, v in batch.items()})
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}

  def get_state(self) -> dict[str, Any]:
    return {"stream": self.grain_iterator.get_state(), "start": self.start, "process_index": self.process_index,
            "process_count": self.process_count,
            "num_workers": int(self.config.data.num_workers) if self.config is not None else 0}

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores this process's own saved position (same process count), exactly."""
    if "stream" not in state:  # written before the stream position was recorded
      self.grain_iterator.set_state(state)
      return
    if int(state["start"]) != self.start:
      self.continue_at(int(state["start"]))
    self.grain_iterator.set_state(state["stream"])

  def resume_elastic(self, states: dict[int, Any], directory: str = "") -> str:
    """Continues a stream saved by ``len(states)`` processes on this process count (see
    ``data_pipelines/elastic.py`` for the guarantee); returns what happened, for the log."""
    from data_pipelines import elastic
    point = elastic.resume_point(states, directory)
    self.continue_at(point.start)
    return (f"the stream continues at global sample {point.start}; {point.skipped} samples below it are "
            "skipped (not reached, or buffered in open rows); no sample is read twice")

  def continue_at(self, start: int) -> None:
    """Restarts this process's stream at global sample ``start`` (an elastic resume)."""
    if self.config is None:
      raise ValueError("continue_at needs the iterator built by make_train_iterator (it has the config)")
    self.start = start
    self.dataset = make_dataset(self.config, process_index=self.process_index, process_count=self.process_count,
                                start=start)
    self.grain_iterator = iter(self.dataset)
    super().__init__(self.grain_iterator)


def make_train_iterator(config, *, process_index: int | None = None, process_count: int | None = None,
                        mesh=None) -> TrainIterator:
  """The trainer's entry point: packed batches ``[batch_size / process_count, ...]`` per process
  (global ``jax.Array``s sharded by ``config.logical_axis_rules``' ``batch`` rule when ``mesh`` is given)."""
  pi, pc = _process(process_index, process_count)
  return TrainIterator(make_dataset(config, process_index=pi, process_count=pc), mesh=mesh,
                       rules=config.logical_axis_rules, config=config, process_index=pi, process_count=pc)


def save_iterator_state(iterator: TrainIterator, directory: str) -> None:
  """Writes the iterator state with Orbax + Grain's checkpoint handler (one JSON per process)."""
  import orbax.checkpoint as ocp
  with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as ckptr:
    ckptr.save(os.path.abspath(directory), args=grain.checkpoint.CheckpointSave(iterator))


def restore_iterator_state(iterator: TrainIterator, directory: str) -> TrainIterator:
  import orbax.checkpoint as ocp
  with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as ckptr:
    ckptr.restore(os.path.abspath(directory), args=grain.checkpoint.CheckpointRestore(iterator))
  return iterator


# ------------------------------------------------------------------------------- first run
def default_build_name(config) -> str:
  """The StoryWorld build ``ensure_dataset`` makes for this config (preferred among several)."""
  from data_pipelines.builders.storyworld import config_name
  return config_name(config.data.num_stories, config.data.image_size, 0)


def tokenizer_corpus(data_dir: str, dataset: str, config_name: str = "", prefer: str = "") -> list[str]:
  """Every script line of a built train split (the tokenizer's training text)."""
  source = builders.load_source(data_dir, dataset, "train", config_name, prefer)
  lines: list[str] = []
  for i in range(len(source)):
    script = builders.decode_record(source[i], decode_images=False)["script"]
    lines += script_schema.render(script).splitlines()
  return lines


def ensure_dataset(config, verbose: bool = True) -> None:
  """Builds the default StoryWorld data and tokenizer if missing (a fresh machine's first run).

  Multi-host: call it on one process (or per host with a local data_dir) before the others read.
  """
  d = config.data
  default = default_tokenizer_path(config)
  if not os.path.exists(tokenizer_file(d.tokenizer_path)) and not _is_default_tokenizer(config):
    # only the default StoryWorld tokenizer is built on first use: a mistyped path is an error,
    # not a reason to train a new tokenizer (and create its folders) somewhere unexpected
    raise MissingTokenizerError(
        f"tokenizer model not found: config.data.tokenizer_path={d.tokenizer_path!r}; train one with "
        f"tools/train_tokenizer.py --output={d.tokenizer_path}" +
        (f", or leave a default ({default} or {default_hf_tokenizer_path(config)}), which is built on first use"
         if d.dataset == "storyworld" else ""))
  # StoryWorld without an explicit dataset_config reads the build of this config's num_stories and
  # image_size: build it when missing, even beside other builds (reading "the only build" there
  # would silently train on another size or story count)
  wanted = default_build_name(config)
  if d.dataset == "storyworld" and not d.dataset_config:
    missing = wanted not in builders.built_configs(d.data_dir, d.dataset)
  else:
    try:
      builders.find_dataset_dir(d.data_dir, d.dataset, d.dataset_config, wanted)
      missing = False
    except builders.DatasetNotBuiltError:
      if d.dataset != "storyworld":
        raise
      missing = True
  if missing:
    if verbose:
      print(f"building StoryWorld ({d.num_stories} stories, {d.image_size}px) into {d.data_dir}")
    builders.build_storyworld(d.data_dir, d.num_stories, d.image_size, seed=0)
  if not os.path.exists(tokenizer_file(d.tokenizer_path)):
    if verbose:
      print(f"training the tokenizer ({config.model.vocab_size} pieces) into {d.tokenizer_path}")
    corpus = tokenizer_corpus(d.data_dir, d.dataset, d.dataset_config, default_build_name(config))
    train_any_tokenizer(corpus, d.tokenizer_path, config.model.vocab_size)
  check_tokenizer(config)
  if config.model.autoencoder == "flux_vae":
    ensure_latents(config, verbose)


def ensure_latents(config, verbose: bool = True) -> None:
  """Encodes the train split's keyframes into the latent cache when it is missing or partial (the
  first run of a VAE config; resumable). A cache made by another VAE or build is refused, not
  silently replaced. A tiny StoryWorld VAE at the default path is trained first (``vae.train``)."""
  from data_pipelines import latent_cache
  from unimage_jax.vae import training as vae_training

  vae_training.ensure_default_vae(config, verbose)
  directory = latent_cache.cache_dir(config, "train")
  manifest = latent_cache.read_manifest(directory)
  if manifest is not None and manifest.get("complete"):
    return
  if verbose:
    print(f"encoding the keyframes with the VAE into {directory}")
  latent_cache.build_for_config(config, "train", log=print if verbose else (lambda _: None))

