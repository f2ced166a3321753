"""Storyboard files: script JSON, keyframe PNGs, an HTML storyboard and a video hand-off JSONL.

The hand-off file is what audio-video generators consume: one line per shot with the frame and
video prompts (with ID tags kept *and* expanded to their descriptions, since an external model
does not know ``<Character1>``), dialogue lines with their speaker, sound cues and the keyframe.
"""

from __future__ import annotations

import html
import json
import os
import re

import numpy as np
from PIL import Image

from unimage_jax import script_schema
from unimage_jax.inference.storyboard import DirectorError, Storyboard
from unimage_jax.script_schema import Script

_TAG = re.compile(r"<(Character|Environment)(\d+)>")
_DIALOGUE = re.compile(rf"(<Character\d+>)\s+says\s+{re.escape(script_schema.CUE_OPEN)}(.*?)"
                       rf"{re.escape(script_schema.CUE_CLOSE)}")


def expand_tags(text: str, script: Script) -> str:
  """Replaces ``<CharacterN>``/``<EnvironmentN>`` by their descriptions."""
  def sub(m):
    table = script.characters if m.group(1) == "Character" else script.environments
    i = int(m.group(2))
    return table[i - 1] if 1 <= i <= len(table) else m.group(0)
  return _TAG.sub(sub, text)


def speaker_name(tag: str, script: Script) -> str:
  """What a dialogue line is credited to: the name of a ``Name, a ...`` cast line, else the whole
  description (a cast line without a name), else the tag itself (an unknown character)."""
  description = expand_tags(tag, script)
  if description == tag:
    return tag
  name, comma, _ = description.partition(",")
  return name.strip() if comma and name.strip() else description


def split_cues(video: str) -> tuple[list[dict[str, str]], list[str]]:
  """(dialogue [{speaker, line}], sound cues) of a video prompt: ``<CharacterN> says <-...->`` is dialogue."""
  dialogue = [{"speaker": m.group(1), "line": m.group(2)} for m in _DIALOGUE.finditer(video)]
  spoken = {d["line"] for d in dialogue}
  sounds = [c for c in script_schema.cues(video) if c not in spoken]
  return dialogue, sounds


def handoff_records(script: Script, keyframe_paths: list[str]) -> list[dict]:
  out = []
  for k, (shot, path) in enumerate(zip(script.shots, keyframe_paths), start=1):
    dialogue, sounds = split_cues(shot.video)
    for d in dialogue:
      d["speaker_name"] = speaker_name(d["speaker"], script)
      d["speaker_description"] = expand_tags(d["speaker"], script)
    out.append({
        "shot": k,
        "frame_prompt": shot.frame,
        "video_prompt": shot.video,
        "frame_prompt_expanded": expand_tags(shot.frame, script),
        "video_prompt_expanded": expand_tags(shot.video, script),
        "dialogue": dialogue,
        "sound": sounds,
        "keyframe": path,
        "characters": {f"<Character{i}>": script.characters[i - 1] for i in script_schema.referenced(shot.frame + shot.video, "Character")},
        "environments": {f"<Environment{i}>": script.environments[i - 1] for i in script_schema.referenced(shot.frame, "Environment")},
    })
  return out


def _card(k: int, shot, path: str, script: Script) -> str:
  dialogue, sounds = split_cues(shot.video)
  esc = html.escape
  lines = "".join(f"<li><b title=\"{esc(expand_tags(d['speaker'], script))}\">{esc(speaker_name(d['speaker'], script))}</b>: "
                  f"{esc(d['line'])}</li>" for d in dialogue)
  sound = "".join(f"<li>{esc(s)}</li>" for s in sounds)
  return f"""
  <article class="card" id="shot-{k}">
    <img class="keyframe" src="{esc(path)}" alt="keyframe of shot {k}" width="256" height="256">
    <h2>Shot {k}</h2>
    <p class="frame"><span class="label">Frame</span> {esc(shot.frame)}</p>
    <p class="video"><span class="label">Video</span> {esc(shot.video)}</p>
    <div class="cues"><span class="label">Dialogue</span><ul>{lines or '<li class="none">none</li>'}</ul>
    <span class="label">Sound</span><ul>{sound or '<li class="none">none</li>'}</ul></div>
  </article>"""


def storyboard_html(script: Script, keyframe_paths: list[str], title: str) -> str:
  esc = html.escape
  cast = "".join(f"<li><b>&lt;Character{i}&gt;</b> {esc(c)}</li>" for i, c in enumerate(script.characters, 1))
  places = "".join(f"<li><b>&lt;Environment{i}&gt;</b> {esc(e)}</li>" for i, e in enumerate(script.environments, 1))
  cards = "".join(_card(k, s, p, script) for k, (s, p) in enumerate(zip(script.shots, keyframe_paths), 1))
  return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; background: #f4f4f4; }}
.cards {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 1em; }}
.card {{ background: white; border-radius: 8px; padding: 1em; box-shadow: 0 1px 3px #0003; }}
.keyframe {{ image-rendering: pixelated; width: 100%; height: auto; border-radius: 4px; }}
.label {{ font-weight: bold; color: #555; margin-right: .4em; }}
.none {{ color: #999; }}
</style></head>
<body>
<h1>{esc(script.prompt)}</h1>
<section class="cast"><h3>Characters</h3><ul>{cast}</ul><h3>Environments</h3><ul>{places}</ul></section>
<section class="cards">{cards}
</section>
</body></html>
"""


def check_output_dir(out_dir: str) -> None:
  """Makes sure the storyboard can be written to ``out_dir`` *before* anything is generated."""
  for name in (out_dir, os.path.join(out_dir, "keyframes")):
    if os.path.exists(name) and not os.path.isdir(name):
      raise DirectorError(f"--output {out_dir}: {name} is a file, not a folder")
  existing = os.path.abspath(out_dir)  # nothing is created here: the nearest existing folder must be writable
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise DirectorError(f"--output {out_dir} cannot be created: {existing} is a file")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise DirectorError(f"--output {out_dir} cannot be written: no write permission on {existing}")


def save_storyboard(sb, out_dir: str) -> dict[str, str]:
  """Writes every output of a Storyboard; returns their paths."""
  os.makedirs(os.path.join(out_dir, "keyframes"), exist_ok=True)
  rel = []
  for k, image in enumerate(sb.keyframes, start=1):
    path = os.path.join("keyframes", f"shot_{k:02d}.png")
    Image.fromarray(np.asarray(image, np.uint8)).save(os.path.join(out_dir, path))
    rel.append(path)
  refs = []
  for i, image in enumerate(getattr(sb, "references", []) or [], start=1):
    os.makedirs(os.path.join(out_dir, "references"), exist_ok=True)
    path = os.path.join("references", f"reference_{i:02d}.png")
    Image.fromarray(np.asarray(image, np.uint8)).save(os.path.join(out_dir, path))
    refs.append(path)
  script = Script(sb.script.prompt, sb.script.characters, sb.script.environments,
                  [script_schema.Shot(s.frame, s.video, p) for s, p in zip(sb.script.shots, rel)])
  paths = {name: os.path.join(out_dir, name) for name in ("storyboard.json", "storyboard.html", "handoff.jsonl")}
  with open(paths["storyboard.json"], "w") as f:
    json.dump({"prompt": sb.prompt, "mode": sb.mode, "seed": sb.seed, "script": script.to_dict(),
               "script_text": script_schema.render(script), "raw_text": sb.raw_text, "repairs": sb.repairs,
               "references": refs}, f, indent=2, ensure_ascii=False)
  with open(paths["storyboard.html"], "w") as f:
    f.write(storyboard_html(script, rel, sb.prompt))
  with open(paths["handoff.jsonl"], "w") as f:
    for record in handoff_records(script, rel):
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
  return paths


def load_storyboard(path: str):
  """A storyboard.json written by :func:`save_storyboard` -> Storyboard (for continuation)."""
  if not os.path.exists(path):
    raise DirectorError(f"--continue_from {path} does not exist")
  try:
    with open(path) as f:
      data = json.load(f)
    script = script_schema.validate(Script.from_dict(data["script"]))
  except (json.JSONDecodeError, KeyError, script_schema.ScriptError) as e:
    raise DirectorError(f"--continue_from {path}: not a storyboard.json ({e})") from e
  base = os.path.dirname(path)
  images = []
  for k, shot in enumerate(script.shots, start=1):
    image_path = os.path.join(base, shot.keyframe or "")
    if not shot.keyframe or not os.path.exists(image_path):
      raise DirectorError(f"--continue_from {path}: keyframe of shot {k} ({shot.keyframe}) is missing")
    images.append(np.asarray(Image.open(image_path).convert("RGB")))
  refs = read_images([os.path.join(base, p) for p in data.get("references", [])], f"--continue_from {path}: reference")
  return Storyboard(data.get("prompt", script.prompt), script, images, data.get("raw_text", ""), [],
                    data.get("mode", "disentangled"), int(data.get("seed", 0)), refs)


def read_images(paths, what: str = "--reference_images") -> list[np.ndarray]:
  """uint8 RGB arrays of image files; a missing or unreadable one is a DirectorError naming it."""
  images = []
  for path in paths:
    if not os.path.isfile(path):
      raise DirectorError(f"{what} {path} does not exist")
    try:
      with Image.open(path) as im:
        images.append(np.asarray(im.convert("RGB")))
    except (OSError, ValueError) as e:
      raise DirectorError(f"{what} {path} is not a readable image ({e})") from None
  return images
