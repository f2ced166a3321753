"""The Grain pipeline: batch contract, determinism, exact resume, per-process slices, mesh arrays."""

import json

import jax
import numpy as np
import pytest

import data_fixtures
from data_pipelines import pipeline
from data_pipelines.packing import row_efficiency
from unimage_jax import layout

MIX = {"interleaved": 1.0, "script": 1.0, "keyframe": 1.0}


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batch_contract():
  c = data_fixtures.tiny_config(tasks=MIX, batch_size=8)
  it = pipeline.make_train_iterator(c, process_index=0, process_count=1)
  batch = next(it)
  row = layout.empty_row(layout.BufferSizes(512, 256, 64, 64), 192, 192)
  assert batch.keys() == row.keys()
  for k, v in row.items():
    assert batch[k].shape == (8,) + v.shape and batch[k].dtype == v.dtype, k
  assert np.all(batch["und_labels"][batch["und_loss_weights"] == 0] == layout.IGNORE_LABEL)
  assert (batch["und_labels"] >= 0).sum() > 0 and (batch["gen_segment_kinds"] == layout.KIND_NOISE).sum() > 0


def test_deterministic_for_a_seed():
  c = data_fixtures.tiny_config(tasks=MIX)
  a, b = (pipeline.make_train_iterator(c, process_index=0, process_count=1) for _ in range(2))
  for _ in range(3):
    assert _equal(next(a), next(b))
  c2 = data_fixtures.tiny_config(tasks=MIX, seed=1)
  assert not _equal(next(pipeline.make_train_iterator(c2, process_index=0, process_count=1)),
                    next(pipeline.make_train_iterator(c, process_index=0, process_count=1)))


def test_restore_mid_epoch_reproduces_next_batches(tmp_path):
  c = data_fixtures.tiny_config(tasks=MIX)
  it = pipeline.make_train_iterator(c, process_index=0, process_count=1)
  for _ in range(7):  # 120 stories: mid-epoch
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  pipeline.save_iterator_state(it, str(tmp_path / "it"))
  want = [next(it) for _ in range(4)]
  fresh = pipeline.make_train_iterator(c, process_index=0, process_count=1)
  fresh.set_state(state)
  assert all(_equal(next(fresh), w) for w in want)
  orbax = pipeline.restore_iterator_state(pipeline.make_train_iterator(c, process_index=0, process_count=1),
                                          str(tmp_path / "it"))
  assert all(_equal(next(orbax), w) for w in want)


def test_restore_with_worker_processes():
  c = data_fixtures.tiny_config(num_workers=2)
  it = pipeline.make_train_iterator(c, process_index=0, process_count=1)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  fresh = pipeline.make_train_iterator(c, process_index=0, process_count=1)
  fresh.set_state(state)
  assert all(_equal(next(fresh), w) for w in want)


def test_packing_efficiency_interleaved():
  # the plain interleaved layout, whose und : gen ratio these 512 + 256 test rows were sized for
  c = data_fixtures.tiny_config(tasks={"interleaved": 1.0, "header": 0.0, "opening": 0.0}, keyframe_caption="none")
  it = pipeline.make_train_iterator(c, process_index=0, process_count=1)
  eff = np.mean([row_efficiency(next(it)) for _ in range(20)])
  assert eff >= 0.9, eff


def test_process_slices_are_disjoint():
  c = data_fixtures.tiny_config(batch_size=8)
  ids = [[pipeline.make_sample_dataset(c, process_index=p, process_count=2, repeat=False)[i].story_id
          for i in range(60)] for p in range(2)]
  assert not set(ids[0]) & set(ids[1]) and len(set(ids[0])) == 60
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.make_dataset(c, process_index=0, process_count=3)
  half = next(pipeline.make_train_iterator(c, process_index=1, process_count=2))
  assert half["und_token_ids"].shape == (4, 512)


def test_global_arrays_on_mesh():
  c = data_fixtures.tiny_config(batch_size=8)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  batch = next(pipeline.make_train_iterator(c, mesh=mesh))
  x = batch["gen_latents"]
  assert isinstance(x, jax.Array) and x.shape == (8, 256, 192)
  assert x.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))


def test_missing_tokenizer_is_clear(tmp_path):
  c = data_fixtures.tiny_config()
  c.data.tokenizer_path = str(tmp_path / "missing.model")
  with pytest.raises(FileNotFoundError, match="config.data.tokenizer_path"):
    pipeline.make_train_iterator(c, process_index=0, process_count=1)


def test_tokenizer_larger_than_model_vocab_is_rejected():
  c = data_fixtures.tiny_config()
  c.model.vocab_size = 512
  with pytest.raises(ValueError, match="config.model.vocab_size"):
    pipeline.make_train_iterator(c, process_index=0, process_count=1)


def test_orbax_checkpoint_manager_composite(tmp_path):
  import grain
  import orbax.checkpoint as ocp
  c = data_fixtures.tiny_config()
  it = pipeline.make_train_iterator(c, process_index=0, process_count=1)
  for _ in range(3):
    next(it)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  want = [next(it) for _ in range(2)]
  fresh = pipeline.make_train_iterator(c, process_index=0, process_count=1)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert all(_equal(next(fresh), w) for w in want)


def test_storyboards_dataset_feeds_the_pipeline(tmp_path):
  """A user import (64px images) trains through the same pipeline (resized to 32px)."""
  from data_pipelines import builders
  from data_pipelines.builders.storyworld import story_for
  from data_pipelines.storyworld import render_story
  from PIL import Image
  (tmp_path / "img").mkdir()
  lines = []
  for i in range(6):
    story = story_for(5, "train", i)
    images, _ = render_story(story, 64)
    d = story.script.to_dict()
    for k, (shot, im) in enumerate(zip(d["shots"], images)):
      Image.fromarray(im).save(tmp_path / "img" / f"{i}_{k}.png")
      shot["keyframe"] = f"{i}_{k}.png"
    lines.append(json.dumps(d))
  (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
  builders.build_storyboards(str(tmp_path / "data"), str(tmp_path / "s.jsonl"), str(tmp_path / "img"), 64)
  c = data_fixtures.tiny_config(tasks=MIX, dataset="storyboards", batch_size=2)
  c.data.data_dir = str(tmp_path / "data")
  batch = next(pipeline.make_train_iterator(c, process_index=0, process_count=1))
  assert batch["gen_latents"].shape == (2, 256, 192) and row_efficiency(batch) > 0.3


def test_processes_draw_independent_plans():
  """Task and cut choices differ across processes (random streams keyed by global index)."""
  c = data_fixtures.tiny_config(tasks=MIX)
  plans = [[pipeline.make_sample_dataset(c, process_index=p, process_count=2)[i].task for i in range(40)]
           for p in range(2)]
  assert plans[0] != plans[1]
  single = pipeline.make_sample_dataset(c, process_index=0, process_count=1)
  assert [single[2 * i].task for i in range(40)] == plans[0]  # process 0 sees global elements 0, 2, 4...
