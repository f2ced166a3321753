"""Offline cache of keyframe VAE latents (ArrayRecord), aligned with a built split record by record.

Why offline and not in the step: the VAE is frozen, so a keyframe's latents never change; encoding
them once costs one VAE forward per keyframe for the whole run instead of one per keyframe per
step, and the train step stays the MoT alone (no VAE activations in device memory, no VAE
sharding). BENCHMARKS.md measures both ways in one run (``tools/bench_latents.py``).

Layout of ``<cache_dir>/<dataset>/<build>/<split>/``:

* ``latents-XXXXX.array_record``: record ``i`` of shard ``s`` is source record
  ``s * shard_size + i`` (msgpack ``{story_id, tokens [K, h*w, D] float32, h, w}``: the BAGEL
  patchified, FLUX-normalised latents of the story's K keyframes at ``image_size``);
* ``manifest.json``: VAE fingerprint and config, image size, patch, record count, shard size.

Resumable: each shard is written to ``*.tmp`` and renamed when complete; a rerun keeps finished
shards and encodes only the missing ones. A cache made by another VAE, image size or build is
refused (:class:`LatentCacheError`) with the command that rebuilds it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import numpy as np

from unimage_jax.errors import UserError

MANIFEST = "manifest.json"
VERSION = 1


class LatentCacheError(UserError, ValueError):
  """The latent cache is missing, incomplete, or made by another VAE / build (names the folder)."""


def shard_name(i: int) -> str:
  return f"latents-{i:05d}.array_record"


def cache_dir(config, split: str = "train") -> str:
  """``config.data.latent_cache_dir`` (default ``<data_dir>/../latents``) / dataset / build / split."""
  from data_pipelines import builders, pipeline

  d = config.data
  root = d.latent_cache_dir or os.path.join(os.path.dirname(os.path.normpath(d.data_dir)), "latents")
  build = builders.find_dataset_dir(d.data_dir, d.dataset, d.dataset_config, pipeline.default_build_name(config))
  rel = os.path.relpath(build, os.path.join(d.data_dir, d.dataset))
  return os.path.join(root, d.dataset, rel.replace(os.sep, "_"), split)


@dataclasses.dataclass(frozen=True)
class Expected:
  """What a cache must have been made with to serve this config."""

  fingerprint: str
  image_size: int
  patch: int
  num_records: int

  def problems(self, manifest: dict[str, Any]) -> list[str]:
    out = []
    for key in ("fingerprint", "image_size", "patch", "num_records"):
      if manifest.get(key) != getattr(self, key):
        out.append(f"{key} {manifest.get(key)!r} (this run: {getattr(self, key)!r})")
    if manifest.get("version") != VERSION:
      out.append(f"version {manifest.get('version')!r} (this code: {VERSION})")
    return out


def _pack(story_id: str, tokens: np.ndarray, h: int, w: int) -> bytes:
  from flax import serialization
  return serialization.msgpack_serialize({"story_id": story_id, "tokens": np.asarray(tokens, np.float32),
                                          "h": int(h), "w": int(w)})


def unpack(raw: bytes) -> dict[str, Any]:
  from flax import serialization
  return serialization.msgpack_restore(bytes(raw))


def read_manifest(directory: str) -> dict[str, Any] | None:
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_cache(directory: str, source, encode: Callable[[np.ndarray], np.ndarray], expected: Expected, *,
                vae_config: dict[str, Any], shard_size: int = 256, overwrite: bool = False,
                log: Callable[[str], None] = print) -> dict[str, int]:
  """Encodes every record of ``source`` (a built split) into ``directory``; resumes a partial cache.

  ``encode(uint8 [K, S, S, 3]) -> float32 [K, h*w, D]`` is the VAE codec at ``expected.image_size``.
  Returns counts ``{"shards": n, "encoded": shards written now, "kept": shards already there}``.
  """
  from array_record.python.array_record_module import ArrayRecordWriter

  from data_pipelines.builders import decode_record
  from unimage_jax.images import resize

  manifest = read_manifest(directory)
  if manifest is not None:
    bad = expected.problems(manifest)
    if bad and not overwrite:
      raise LatentCacheError(f"latent cache {directory} was made differently: " + "; ".join(bad) +
                             "; pass --overwrite to rebuild it, or use another config.data.latent_cache_dir")
    if bad:
      for name in os.listdir(directory):
        os.remove(os.path.join(directory, name))
  os.makedirs(directory, exist_ok=True)
  n = len(source)
  shards = (n + shard_size - 1) // shard_size
  manifest = {"version": VERSION, **dataclasses.asdict(expected), "shard_size": shard_size, "shards": shards,
              "vae_config": vae_config, "complete": False}
  _write_json(os.path.join(directory, MANIFEST), manifest)
  encoded = kept = 0
  for s in range(shards):
    final = os.path.join(directory, shard_name(s))
    if os.path.exists(final):
      kept += 1
      continue
    tmp = final + ".tmp"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    for i in range(s * shard_size, min(n, (s + 1) * shard_size)):
      record = decode_record(source[i])
      frames = np.stack([resize(f, expected.image_size) for f in record["keyframes"]])
      tokens = encode(frames)  # [K, h*w, D]
      side = int(round(np.sqrt(tokens.shape[1])))
      writer.write(_pack(record["story_id"], tokens, side, side))
    writer.close()
    os.replace(tmp, final)  # a shard exists under its name only when complete
    encoded += 1
    log(f"latent cache: shard {s + 1}/{shards} ({min(n, (s + 1) * shard_size)} of {n} stories)")
  manifest["complete"] = True
  _write_json(os.path.join(directory, MANIFEST), manifest)
  return {"shards": shards, "encoded": encoded, "kept": kept}


def _write_json(path: str, content: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(content, f, indent=2)
  os.replace(tmp, path)


class LatentCache:
  """Random access to a complete cache: ``cache[i]`` -> ``{story_id, tokens, h, w}`` (picklable)."""

  def __init__(self, directory: str, expected: Expected | None = None, hint: str = "tools/cache_latents.py"):
    self.directory = directory
    manifest = read_manifest(directory)
    if manifest is None or not manifest.get("complete"):
      what = "is missing" if manifest is None else "is incomplete (an interrupted build)"
      raise LatentCacheError(f"latent cache {directory} {what}; build it with {hint}")
    if expected is not None:
      bad = expected.problems(manifest)
      if bad:
        raise LatentCacheError(f"latent cache {directory} does not fit this config: " + "; ".join(bad) +
                               f"; rebuild it with {hint} --overwrite")
    self.manifest = manifest
    self.shard_size = manifest["shard_size"]
    missing = [shard_name(s) for s in range(manifest["shards"])
               if not os.path.exists(os.path.join(directory, shard_name(s)))]
    if missing:
      raise LatentCacheError(f"latent cache {directory} lacks {', '.join(missing)}; rebuild it with {hint}")
    self._readers: dict[int, Any] = {}

  def __len__(self) -> int:
    return self.manifest["num_records"]

  def __getstate__(self):
    return {"directory": self.directory, "manifest": self.manifest, "shard_size": self.shard_size, "_readers": {}}

  def __getitem__(self, index: int) -> dict[str, Any]:
    from array_record.python.array_record_module import ArrayRecordReader

    s, i = divmod(int(index), self.shard_size)
    if s not in self._readers:
      self._readers[s] = ArrayRecordReader(os.path.join(self.directory, shard_name(s)), "readahead_buffer_size:0")
    try:
      return unpack(self._readers[s].read([i])[0])
    except Exception as e:  # noqa: BLE001 - a truncated shard names no file
      raise LatentCacheError(f"{os.path.join(self.directory, shard_name(s))} (record {i}) cannot be read "
                             f"({type(e).__name__}); rebuild the cache with tools/cache_latents.py --overwrite") from None


class WithLatents:
  """A built split's source whose records carry their cached latents (``record["latents"]``).

  Grain random-access source (picklable). The story ids of the two are compared per record, so a
  cache of another build can never feed the wrong keyframes silently.
  """

  def __init__(self, source, cache: LatentCache):
    if len(source) != len(cache):
      raise LatentCacheError(f"latent cache {cache.directory} holds {len(cache)} stories but the split has "
                             f"{len(source)}; rebuild it with tools/cache_latents.py --overwrite")
    self.source, self.cache = source, cache

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = dict(self.source[index])
    latents = self.cache[index]
    sid = record["story_id"]
    sid = sid.decode() if isinstance(sid, bytes) else str(sid)
    if latents["story_id"] != sid:
      raise LatentCacheError(f"latent cache {self.cache.directory} record {index} is story {latents['story_id']!r} "
                             f"but the split has {sid!r}; rebuild it with tools/cache_latents.py --overwrite")
    record["latents"] = latents
    return record


# ----------------------------------------------------------------------------- for a config
def load_checked_vae(config):
  """The config's VAE, checked against the model's latent space (errors name the fields)."""
  from unimage_jax.vae import store
  return store.load_for_config(config)


def expected_for(config, vae, num_records: int) -> Expected:
  from unimage_jax.vae import store
  return Expected(store.fingerprint(vae), int(config.data.image_size), int(config.model.latent_patch_size),
                  int(num_records))


def _source(config, split: str):
  from data_pipelines import builders, pipeline
  d = config.data
  return builders.load_source(d.data_dir, d.dataset, split, d.dataset_config, pipeline.default_build_name(config))


def build_for_config(config, split: str = "train", *, overwrite: bool = False, batch: int = 8,
                     log: Callable[[str], None] = print) -> tuple[str, dict[str, int]]:
  """Encodes a built split with the config's VAE into its cache folder (resuming a partial one)."""
  from unimage_jax.vae import store

  vae = load_checked_vae(config)
  source = _source(config, split)
  codec = store.Codec(vae, config.model.latent_patch_size, batch=batch)
  directory = cache_dir(config, split)
  counts = write_cache(directory, source, codec.encode, expected_for(config, vae, len(source)),
                       vae_config=dataclasses.asdict(vae.config), overwrite=overwrite, log=log)
  return directory, counts


def open_for_config(config, source, split: str = "train", vae=None) -> WithLatents:
  """``source`` with its cached latents; refuses a missing cache or one another VAE/build made."""
  vae = load_checked_vae(config) if vae is None else vae
  hint = f"tools/cache_latents.py --config=<this config> (split {split})"
  cache = LatentCache(cache_dir(config, split), expected_for(config, vae, len(source)), hint=hint)
  return WithLatents(source, cache)
