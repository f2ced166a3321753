"""The stored record of one story, shared by every builder and by the pipeline's reader.

Features are plain tensors (text, bytes, int) so TFDS writes ArrayRecord and the pipeline reads it
with random access without TensorFlow. Keyframes are PNG bytes: StoryWorld's flat-colour frames
compress ~20x, which keeps a 1,000-story build small.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.storyworld.renderer import decode_png
from unimage_jax.script_schema import Script


class NoCodePathMixin:
  """Builders here ship no checksums/metadata files beside their code.

  TFDS locates those through ``code_path``, which needs the optional ``importlib_resources``
  package for installed modules; returning None skips the lookup (nothing is downloaded anyway).
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None


def features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "story_id": tfds.features.Text(),
      "script": tfds.features.Text(),  # JSON of Script.to_dict()
      "ground_truth": tfds.features.Text(),  # JSON; "{}" when unknown (user data)
      "keyframes": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),  # PNG
      "image_size": tfds.features.Tensor(shape=(), dtype=np.int32),
  })


def make_example(story_id: str, script: Script, keyframes_png: list[bytes], image_size: int,
                 ground_truth: dict[str, Any] | None = None) -> dict[str, Any]:
  return {
      "story_id": story_id,
      "script": json.dumps(script.to_dict(), ensure_ascii=False),
      "ground_truth": json.dumps(ground_truth or {}),
      "keyframes": list(keyframes_png),
      "image_size": np.int32(image_size),
  }


def _text(v: Any) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def decode_record(raw: dict[str, Any], decode_images: bool = True) -> dict[str, Any]:
  """ArrayRecord example -> {story_id, script: Script, keyframes: [uint8 HxWx3], ground_truth}."""
  script = Script.from_dict(json.loads(_text(raw["script"])))
  frames = [decode_png(bytes(b)) for b in raw["keyframes"]] if decode_images else []
  return {
      "story_id": _text(raw["story_id"]),
      "script": script,
      "keyframes": frames,
      "ground_truth": json.loads(_text(raw["ground_truth"])),
  }
