"""TFDS builder importing a user's storyboards (JSONL + image folder) into ArrayRecord."""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from data_pipelines.builders import records
from data_pipelines.builders.user_import import EmptyImportError, ImportReport, read_storyboards
from data_pipelines.storyworld.renderer import encode_png


@dataclasses.dataclass
class StoryboardsConfig(tfds.core.BuilderConfig):
  jsonl_path: str = ""
  image_dir: str = ""
  image_size: int = 64
  skip_bad_records: bool = False


class Storyboards(records.NoCodePathMixin, tfds.core.GeneratorBasedBuilder):
  """User scripts with keyframes. ``self.report`` holds imported/skipped counts after a build."""

  name = "storyboards"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [StoryboardsConfig(name="template")]  # real builds pass their own config

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.report = ImportReport()

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=records.features(),
                                 description="User storyboards imported by unimage-jax.")

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    c = self.builder_config
    self.report = ImportReport()
    for line, story_id, script, images in read_storyboards(
        c.jsonl_path, c.image_dir, c.image_size, c.skip_bad_records, self.report):
      yield f"{line:09d}", records.make_example(story_id, script, [encode_png(im) for im in images],
                                                c.image_size)
    if self.report.imported == 0:  # TFDS would fail with a bare "No examples were yielded"
      raise EmptyImportError(c.jsonl_path, self.report)
