"""StoryWorld's cast and places: identities with a fixed look, so consistency is measurable.

A character is a named coloured shape with a size and an accessory; a place is a sky colour, a
ground colour and one prop. Every attribute is drawn by the renderer and kept as ground truth, so
"does <Character2> look the same in shot 5 as in shot 1" has an exact answer.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (250, 130, 190),
    "white": (245, 245, 245),
}
SIZES: dict[str, float] = {"small": 0.16, "medium": 0.22, "large": 0.28}  # height, world units
ACCESSORIES = ("none", "hat", "scarf")
ACCESSORY_COLOURS = {"hat": (20, 20, 20), "scarf": (0, 150, 150)}
NAMES = ("Mira", "Bo", "Tess", "Kai", "Nell", "Ravi", "Ona", "Pip", "Lux", "Juno", "Fen", "Ada",
         "Milo", "Zara", "Ike", "Wren", "Otto", "Lia", "Sami", "Dex", "Nia", "Hugo", "Ivy", "Rex")


@dataclasses.dataclass(frozen=True)
class CharacterSpec:
  name: str
  shape: str
  colour: str
  size: str
  accessory: str

  def describe(self) -> str:
    acc = {"none": "", "hat": " wearing a black hat", "scarf": " wearing a teal scarf"}[self.accessory]
    return f"{self.name}, a {self.size} {self.colour} {self.shape}{acc}."


@dataclasses.dataclass(frozen=True)
class PlaceSpec:
  name: str
  sky: tuple[int, int, int]
  ground: tuple[int, int, int]
  prop: str  # tree | house | lamp | rock | cactus | sun
  prop_x: float  # world x of the prop, so camera moves are visible
  description: str


PLACES = (
    PlaceSpec("meadow", (150, 200, 250), (90, 170, 70), "tree", 0.12, "A sunny meadow with green grass and a tree under a light blue sky."),
    PlaceSpec("beach", (120, 190, 240), (230, 210, 150), "sun", 0.85, "A sandy beach under a bright sun and a clear sky."),
    PlaceSpec("street", (40, 40, 80), (110, 110, 120), "lamp", 0.88, "A grey street at night lit by a single lamp."),
    PlaceSpec("desert", (250, 200, 140), (210, 160, 90), "cactus", 0.1, "A hot orange desert with one tall cactus."),
    PlaceSpec("village", (170, 210, 240), (150, 120, 80), "house", 0.85, "A quiet village square in front of a small house."),
    PlaceSpec("cave", (60, 50, 45), (100, 85, 70), "rock", 0.14, "A dim brown cave with a big rock."),
    PlaceSpec("snowfield", (210, 225, 240), (250, 250, 252), "tree", 0.88, "A white snowfield with a lonely pine under a pale sky."),
    PlaceSpec("garden", (180, 230, 200), (60, 130, 60), "house", 0.1, "A green garden next to a small house."),
)


def sample_cast(rng: np.random.Generator, n: int) -> list[CharacterSpec]:
  """n characters with distinct names and distinct (shape, colour) looks."""
  names = rng.choice(len(NAMES), size=n, replace=False)
  looks = rng.choice(len(SHAPES) * len(COLOURS), size=n, replace=False)
  colours = list(COLOURS)
  cast = []
  for name_i, look in zip(names, looks):
    cast.append(CharacterSpec(
        name=NAMES[int(name_i)],
        shape=SHAPES[int(look) % len(SHAPES)],
        colour=colours[int(look) // len(SHAPES)],
        size=list(SIZES)[int(rng.integers(len(SIZES)))],
        accessory=ACCESSORIES[int(rng.integers(len(ACCESSORIES)))],
    ))
  return cast


def sample_places(rng: np.random.Generator, n: int) -> list[PlaceSpec]:
  return [PLACES[int(i)] for i in rng.choice(len(PLACES), size=n, replace=False)]


def character_mask(image: np.ndarray) -> np.ndarray:
  """bool [H, W]: the pixels of a StoryWorld render painted with a character or accessory colour.

  Exact on renders at the size they were drawn (flat colours, no anti-aliasing): no place's sky,
  ground or prop uses these colours (``tests/test_storyworld.py`` checks it). image: uint8 [H, W, 3].
  """
  colours = np.asarray(list(COLOURS.values()) + list(ACCESSORY_COLOURS.values()), np.int16)  # [C, 3]
  pixels = np.asarray(image, np.int16)[..., None, :]  # [H, W, 1, 3]
  return np.any(np.all(pixels == colours, axis=-1), axis=-1)
