"""What the director returns, and the one error it raises for a bad prompt, checkpoint or setting.

Light on purpose (no JAX): ``unimage_jax/storyboard_io.py`` reads and writes storyboards without
loading a model.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from unimage_jax.errors import UserError
from unimage_jax.script_schema import Script


class DirectorError(UserError, ValueError):
  """Bad prompt, checkpoint or settings; the message names what is wrong."""


@dataclasses.dataclass
class Storyboard:
  prompt: str
  script: Script  # validated (possibly repaired)
  keyframes: list[np.ndarray]  # uint8 [H, W, 3], one per shot
  raw_text: str  # what the model wrote
  repairs: list[str]  # empty when the raw text was already valid
  mode: str = "disentangled"
  seed: int = 0
  references: list[np.ndarray] = dataclasses.field(default_factory=list)  # uint8 [H, W, 3] context images
