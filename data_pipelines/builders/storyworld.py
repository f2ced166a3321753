"""TFDS builder for StoryWorld: procedural stories + rendered keyframes, written as ArrayRecord.

Sizes are builder-config fields, so ``storyworld/n1000_s64_seed0`` and a tiny test build live
side by side. Story i of a split is drawn from ``default_rng([seed, split, i])``: a build is
reproducible and independent of sharding.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.builders import records
from data_pipelines.storyworld import generate_story, render_story
from data_pipelines.storyworld.renderer import encode_png

SPLITS = {"train": 0, "validation": 1}


@dataclasses.dataclass
class StoryWorldConfig(tfds.core.BuilderConfig):
  num_stories: int = 1000
  num_validation: int = 50
  image_size: int = 64
  seed: int = 0
  min_shots: int = 3
  max_shots: int = 12


def config_name(num_stories: int, image_size: int, seed: int) -> str:
  return f"n{num_stories}_s{image_size}_seed{seed}"


def make_config(num_stories: int = 1000, image_size: int = 64, seed: int = 0,
                num_validation: int | None = None) -> StoryWorldConfig:
  nv = max(1, num_stories // 20) if num_validation is None else num_validation
  return StoryWorldConfig(name=config_name(num_stories, image_size, seed), num_stories=num_stories,
                          num_validation=nv, image_size=image_size, seed=seed)


def story_for(seed: int, split: str, index: int, min_shots: int = 3, max_shots: int = 12):
  """The exact story a build stores at (split, index); eval regenerates ground truth with it."""
  return generate_story(np.random.default_rng([seed, SPLITS[split], index]), min_shots, max_shots)


class StoryWorld(records.NoCodePathMixin, tfds.core.GeneratorBasedBuilder):
  """Procedural multi-shot stories with keyframes and exact ground truth."""

  name = "storyworld"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [StoryWorldConfig(name="template")]  # real builds pass their own config

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=records.features(),
                                 description="StoryWorld procedural stories (unimage-jax).")

  def _split_generators(self, dl_manager):
    c = self.builder_config
    return {"train": self._generate_examples("train", c.num_stories),
            "validation": self._generate_examples("validation", c.num_validation)}

  def _generate_examples(self, split: str, n: int):
    c = self.builder_config
    for i in range(n):
      story = story_for(c.seed, split, i, c.min_shots, c.max_shots)
      images, visibility = render_story(story, c.image_size)
      truth = story.ground_truth()
      for shot, vis in zip(truth["shots"], visibility):
        for ch, v in zip(shot["characters"], vis):
          ch.update(v)
      key = f"{split}_{i:07d}"
      yield key, records.make_example(key, story.script, [encode_png(im) for im in images],
                                      c.image_size, truth)
