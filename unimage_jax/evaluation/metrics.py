"""StoryWorld metrics of one story (script + keyframes) and their averages.

Every number is computed from the script's own meaning (``script_semantics``), the renderer's
picture of that meaning (``expected``) and the detector's reading of the keyframes - no learned
judge. Definitions (README "Evaluation" has the same text):

* validity: the raw text parses and validates under the schema (1/0); ``repaired`` says whether
  the director had to repair it.
* cast consistency: the share of passed checks among (a) per character: its line names name,
  shape, colour and size, and every line defining that tag in the raw text says the same;
  (b) per shot: every <CharacterN> it references is defined; (c) per matched appearance in a
  keyframe: detected colour, shape, size and accessory agree with the description.
* agreement: per shot, F1 over scene elements {the place} + {each character required in frame}:
  a character counts when a detection of its described colour and shape stands in its expected
  slot with its described size; averaged over shots.
* identity consistency: over characters matched in >= 2 shots, the share of appearances whose
  colour, shape, size and accessory agree with that character's most common look.
* prompt adherence (the script against the prompt it was written for): ``prompt_names`` 1 when
  the names of the <CharacterN> lines are exactly the StoryWorld names the prompt mentions,
  ``prompt_places`` 1 when the <EnvironmentN> lines describe exactly the places it mentions,
  ``prompt_count`` 1 when the script has as many characters as the prompt names; None when the
  prompt names no StoryWorld character (resp. place), e.g. a free prompt.

A trait the detector cannot read (too little in frame) is not checked; a size or shape is
accepted when it explains the blob within ``detector.MARGIN`` IoU of the best (32 px frames).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Iterable, Sequence

import numpy as np

from data_pipelines.storyworld import cast as cast_lib
from data_pipelines.storyworld.grammar import NUM_SLOTS, Story
from unimage_jax import script_schema as ss
from unimage_jax.evaluation import detector, expected, script_semantics

METRICS = ("validity", "cast_consistency", "agreement", "identity_consistency",
           "prompt_names", "prompt_places", "prompt_count")
_PROMPT_WORD = re.compile(r"[A-Za-z]+")


@dataclasses.dataclass
class StoryInput:
  """What is scored: the director's Storyboard fields (or a ground-truth record's)."""

  story_id: str
  prompt: str
  script: ss.Script
  keyframes: list[np.ndarray]  # uint8 [S, S, 3] per shot
  raw_text: str
  repairs: list[str]


def from_storyboard(story_id: str, sb: Any) -> StoryInput:
  return StoryInput(story_id, sb.prompt, sb.script, list(sb.keyframes), sb.raw_text, list(sb.repairs))


def from_record(record: dict[str, Any]) -> StoryInput:
  """A decoded StoryWorld record as if a perfect director had written it (the upper bound)."""
  script = record["script"]
  return StoryInput(record["story_id"], script.prompt, script, list(record["keyframes"]),
                    ss.render(script), [])


# ------------------------------------------------------------------------------- validity
def validity(raw_text: str) -> tuple[bool, str]:
  """(valid as written, error message)."""
  try:
    ss.validate(ss.parse(raw_text))
    return True, ""
  except ss.ScriptError as e:
    return False, str(e)


def script_cast_checks(script: ss.Script, raw_text: str,
                       sem: script_semantics.Semantics) -> list[tuple[str, bool]]:
  """Checks (a) and (b) of cast consistency, as (name, passed)."""
  defined: dict[int, set[str]] = collections.defaultdict(set)
  for line in raw_text.splitlines():
    m = ss.LINE_RE.match(line.strip())
    if m and m.group(1) == "Character" and m.group(2):
      defined[int(m.group(2))].add(m.group(3).strip())
  checks = []
  for i, traits in enumerate(sem.cast, start=1):
    stable = len(defined.get(i, {script.characters[i - 1]})) <= 1
    checks.append((f"character{i}", traits.complete and stable))
  n = len(script.characters)
  for k, shot in enumerate(script.shots, start=1):
    refs = ss.referenced(shot.frame, "Character") + ss.referenced(shot.video, "Character")
    checks.append((f"shot{k}_refs", all(1 <= r <= n for r in refs)))
  return checks


# ------------------------------------------------------------------------------- matching
@dataclasses.dataclass
class Match:
  expected: expected.ExpectedCharacter
  detection: detector.Detection
  identity: bool  # matched by look (colour + shape); False: only by position


def match(exp: Sequence[expected.ExpectedCharacter], dets: Sequence[detector.Detection],
          traits: Sequence[script_semantics.Traits], gate: float) -> list[Match]:
  """Pairs expected characters with detections: first by look (nearest of the described colour
  and a plausible shape), then the rest by position; pairs farther apart than ``gate`` pixels
  (half a slot) are refused in the second pass."""
  out: list[Match] = []
  free = set(range(len(dets)))
  todo = [e for e in exp if e.visible_pixels > 0]
  for e in sorted(todo, key=lambda e: -e.visible_pixels):
    t = traits[e.index]
    cands = [j for j in free if dets[j].colour == t.colour
             and (dets[j].shape is None or t.shape in dets[j].plausible("shape"))]
    if cands:
      j = min(cands, key=lambda j: abs(dets[j].centre_x - e.centre_x))
      free.discard(j)
      out.append(Match(e, dets[j], True))
  done = {m.expected.index for m in out}
  for e in sorted((e for e in todo if e.index not in done), key=lambda e: -e.visible_pixels):
    cands = [j for j in free if abs(dets[j].centre_x - e.centre_x) <= gate]
    if cands:
      j = min(cands, key=lambda j: abs(dets[j].centre_x - e.centre_x))
      free.discard(j)
      out.append(Match(e, dets[j], False))
  return out


def looks_like(d: detector.Detection, t: script_semantics.Traits) -> bool:
  """Detected appearance agrees with described traits (unreadable traits are not checked)."""
  return (d.colour == t.colour
          and (d.shape is None or t.shape in d.plausible("shape"))
          and (d.size is None or t.size in d.plausible("size"))
          and (d.accessory is None or d.accessory == t.accessory))


# ------------------------------------------------------------------------- prompt adherence
def prompt_mentions(prompt: str) -> tuple[list[str], list[str]]:
  """(StoryWorld character names, place names) a prompt mentions, in prompt order."""
  words = _PROMPT_WORD.findall(prompt)
  names = [w for w in dict.fromkeys(words) if w in cast_lib.NAMES]
  places = [w for w in dict.fromkeys(w.lower() for w in words) if w in {p.name for p in cast_lib.PLACES}]
  return names, places


def prompt_adherence(prompt: str, sem: script_semantics.Semantics) -> dict[str, float | None]:
  """Does the cast/places/character count of the script follow the prompt? (1/0, None = not asked)."""
  names, places = prompt_mentions(prompt)
  cast_names = [t.name for t in sem.cast]
  script_places = [p.name if p is not None else None for p in sem.places]
  return {
      # a cast line without a name (no comma) reads as None: a mismatch, not a crash
      "prompt_names": float(sorted(cast_names, key=str) == sorted(names)) if names else None,
      "prompt_places": float(sorted(script_places, key=str) == sorted(places)) if places else None,
      "prompt_count": float(len(cast_names) == len(names)) if names else None,
  }


# ---------------------------------------------------------------------------------- story
def score_story(inp: StoryInput) -> dict[str, Any]:
  """All metrics of one story, with the per-shot details behind them."""
  ok, error = validity(inp.raw_text)
  script = inp.script
  sem = script_semantics.interpret(script)
  checks = script_cast_checks(script, inp.raw_text, sem)
  result: dict[str, Any] = {
      "story_id": inp.story_id, "prompt": inp.prompt, "shots": len(script.shots),
      "validity": float(ok), "validity_error": error, "repaired": bool(inp.repairs),
      "interpretable": sem.complete, "script_cast_checks": [n for n, p in checks if not p],
      **prompt_adherence(inp.prompt, sem),
  }
  if len(inp.keyframes) != len(script.shots):
    result["keyframe_error"] = f"{len(inp.keyframes)} keyframes for {len(script.shots)} shots"
  cast_passed = [p for _, p in checks]
  if not sem.complete or "keyframe_error" in result:
    result.update(cast_consistency=float(np.mean(cast_passed)) if cast_passed else 0.0,
                  agreement=0.0, identity_consistency=None, per_shot=[])
    return result
  story = sem.story(script)
  per_shot, looks = [], collections.defaultdict(list)
  for k, image in enumerate(inp.keyframes):
    shot, matched = score_shot(sem, story, k, image)
    for m in matched:
      cast_passed.append(looks_like(m.detection, sem.cast[m.expected.index]))
      looks[m.expected.index].append(m.detection)
    per_shot.append(shot)
  result["per_shot"] = per_shot
  result["agreement"] = float(np.mean([s["agreement"] for s in per_shot]))
  result["cast_consistency"] = float(np.mean(cast_passed))
  result["identity_consistency"] = identity_consistency(looks.values())
  return result


def score_shot(sem: script_semantics.Semantics, story: Story, k: int,
               image: np.ndarray) -> tuple[dict[str, Any], list[Match]]:
  """Shot ``k``'s (0-based) keyframe against the scene its script describes: the per-shot row
  (agreement, place, characters found) and the matches of the characters it requires."""
  S = image.shape[0]
  exp = expected.expected_characters(story, k, S)
  cam = expected.camera(story, k)
  dets = detector.detect(image, cam)
  place = detector.detect_place(image)
  matches = match(exp, dets, sem.cast, 0.5 * cam[2] * S / NUM_SLOTS)
  required = {e.index for e in exp if e.required}
  counted = [m for m in matches if m.expected.index in required]
  tp = 0
  for m in counted:
    t = sem.cast[m.expected.index]
    tp += (m.identity and m.detection.slot == m.expected.slot
           and (m.detection.size is None or t.size in m.detection.plausible("size")))
  matched = {id(m.detection) for m in matches}
  fp = sum(1 for d in dets if id(d) not in matched)
  place_ok = place == story.places[story.shots[k]["env"]].name
  place_changed = k > 0 and story.shots[k]["env"] != story.shots[k - 1]["env"]
  n_exp, n_det = 1 + len(required), 1 + len(counted) + fp
  tp_all = tp + place_ok
  precision, recall = tp_all / n_det, tp_all / n_exp
  f1 = 2 * precision * recall / (precision + recall) if tp_all else 0.0
  row = {"agreement": f1, "precision": precision, "recall": recall, "place": place, "place_ok": place_ok,
         "place_changed": place_changed,
         "required": sorted(required), "found": tp, "false_detections": fp, "detections": len(dets)}
  return row, counted


def failed_story(story_id: str, prompt: str, error: str) -> dict[str, Any]:
  """A prompt the director could not direct (no valid script within its attempts): it scores 0
  wherever the prompt asked for something, so a failure is never dropped from the averages."""
  names, places = prompt_mentions(prompt)
  return {"story_id": story_id, "prompt": prompt, "shots": 0, "validity": 0.0,
          "validity_error": error, "director_error": error, "repaired": False, "interpretable": False,
          "script_cast_checks": [], "prompt_names": 0.0 if names else None,
          "prompt_places": 0.0 if places else None, "prompt_count": 0.0 if names else None,
          "cast_consistency": 0.0, "agreement": 0.0, "identity_consistency": None, "per_shot": []}


def identity_consistency(appearances: Iterable[list[detector.Detection]]) -> float | None:
  """Share of appearances of multiply-seen characters that keep the character's usual look."""
  total = kept = 0
  for dets in appearances:
    if len(dets) < 2:
      continue
    colour = collections.Counter(d.colour for d in dets).most_common(1)[0][0]
    shape = collections.Counter(s for d in dets for s in d.plausible("shape")).most_common(1)
    size = collections.Counter(s for d in dets for s in d.plausible("size")).most_common(1)
    accs = collections.Counter(d.accessory for d in dets if d.accessory is not None).most_common(1)
    for d in dets:
      total += 1
      kept += (d.colour == colour
               and (d.shape is None or not shape or shape[0][0] in d.plausible("shape"))
               and (d.size is None or not size or size[0][0] in d.plausible("size"))
               and (d.accessory is None or not accs or d.accessory == accs[0][0]))
  return kept / total if total else None


def score_ground_truth(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
  """Scores decoded StoryWorld records themselves: the upper bound (~1.0 on every metric)."""
  return [score_story(from_record(r)) for r in records]


def average(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Means over stories (a metric a story cannot have, e.g. identity with 1 shot, is skipped)."""
  out: dict[str, Any] = {"stories": len(results), "shots": int(sum(r["shots"] for r in results))}
  for name in METRICS:
    vals = [r[name] for r in results if r.get(name) is not None]
    out[name] = float(np.mean(vals)) if vals else None
  out["repaired"] = int(sum(r["repaired"] for r in results))
  out["interpretable"] = int(sum(r["interpretable"] for r in results))
  shots = [s for r in results for s in r.get("per_shot", [])]
  out["place_accuracy"] = float(np.mean([s["place_ok"] for s in shots])) if shots else None
  out["characters_drawn"] = characters_drawn(shots)
  out["place_accuracy_changed"] = place_accuracy_changed(shots)
  return out


def place_accuracy_changed(shots: Sequence[dict[str, Any]]) -> float | None:
  """Place accuracy over the shots whose place differs from the previous shot's.

  Why a column of its own: most shots stay where the previous one was, so a model that copies
  the previous keyframe's background, never reading the frame line's ``<EnvironmentK>``, still
  scores well on place accuracy; on these shots copying is always wrong.
  """
  changed = [s["place_ok"] for s in shots if s.get("place_changed")]
  return float(np.mean(changed)) if changed else None


def characters_drawn(shots: Sequence[dict[str, Any]]) -> float | None:
  """Share of the characters the shots require that are drawn right (colour, shape, slot, size).

  Why a column of its own: agreement mixes the place with the characters, and identity
  consistency skips stories where no character is found twice, so neither shows a storyboard
  whose places are right but whose characters are missing; this share does.
  """
  required = sum(len(s["required"]) for s in shots)
  return sum(s["found"] for s in shots) / required if required else None
