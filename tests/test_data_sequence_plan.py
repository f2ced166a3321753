"""Task plans: the segment layouts of docs/ARCHITECTURE.md §4, cuts, dropout and size errors."""

import re

import numpy as np
import pytest

import data_fixtures
from data_pipelines.sequence_plan import PlanConfig, Planner, SampleTooLargeError
from data_pipelines.builders.storyworld import story_for
from data_pipelines.storyworld import render_story
from unimage_jax import layout, pixel_codec
from unimage_jax.layout import TextSegment, VitSegment
from unimage_jax.script_schema import header_lines, referenced
from unimage_jax.tokenizer import Tokenizer


def _planner(**data):
  data.setdefault("keyframe_caption", "none")  # the plain layouts; the caption tests name theirs
  c = data_fixtures.tiny_config(**data)
  return Planner(PlanConfig.from_config(c), Tokenizer(c.data.tokenizer_path, c.model.vocab_size)), c


def _record(i=5, size=32):
  story = story_for(0, "train", i)
  images, _ = render_story(story, size)
  return {"story_id": f"s{i}", "script": story.script, "keyframes": images}


def _kinds(segs):
  return ["T" if isinstance(s, TextSegment) else "V" if isinstance(s, VitSegment) else
          ("N" if s.noised else "C") for s in segs]


def test_header_task_is_the_interleaved_first_text_alone():
  p, _ = _planner()
  rec = _record(5)
  header = p.plan(rec, np.random.default_rng(0), "header").segments
  first = p.plan(rec, np.random.default_rng(0), "interleaved").segments[0]
  assert _kinds(header) == ["T"] and header[0].train
  # the same tokens as the interleaved sample's first text, <|im_end|> (= "draw keyframe 1") included
  assert header[0].token_ids.tolist() == first.token_ids.tolist()
  assert header[0].token_ids[-1] == p.tok.im_end


def test_opening_task_is_the_first_text_and_noised_copies_of_keyframe_1():
  p, _ = _planner(noised_copies=2)
  rec = _record(5)
  opening = p.plan(rec, np.random.default_rng(0), "opening").segments
  first = p.plan(rec, np.random.default_rng(0), "interleaved").segments
  assert _kinds(opening) == ["T", "N", "N"] and opening[0].train
  assert opening[0].token_ids.tolist() == first[0].token_ids.tolist()
  tokens, _, _ = pixel_codec.image_to_tokens(rec["keyframes"][0], 4, 2)
  for seg in opening[1:]:
    np.testing.assert_array_equal(seg.latents, tokens)


def test_subject_task_is_the_header_one_single_character_frame_line_and_its_noised_copies():
  p, _ = _planner(noised_copies=2)
  rec = _record(5)
  script = rec["script"]
  single = {k for k, shot in enumerate(script.shots, start=1) if len(referenced(shot.frame, "Character")) == 1}
  assert single, "story 5 must have a single-character shot for this test"
  seen = set()
  for seed in range(12):
    segs = p.plan(rec, np.random.default_rng(seed), "subject").segments
    assert _kinds(segs) == ["T", "N", "N"] and not segs[0].train  # context only: no text loss
    text = p.tok.decode(segs[0].token_ids.tolist())
    k = int(re.findall(r"<Frame(\d+)>", text)[-1])
    assert k in single and text.count("<Frame") == 1
    assert all(line in text for line in header_lines(script))
    tokens, _, _ = pixel_codec.image_to_tokens(rec["keyframes"][k - 1], 4, 2)
    for seg in segs[1:]:
      np.testing.assert_array_equal(seg.latents, tokens)
    seen.add(k)
  assert len(seen) > 1 or len(single) == 1  # drawn among the single-character shots


def test_subject_task_alone_keeps_only_the_subjects_cast_line():
  p, _ = _planner(noised_copies=1, subject_alone=1.0)
  rec = _record(5)
  for seed in range(6):
    segs = p.plan(rec, np.random.default_rng(seed), "subject").segments
    text = p.tok.decode(segs[0].token_ids.tolist())
    frame = text[text.index("<Frame"):]
    (subject,) = set(re.findall(r"<Character\d+>", frame))
    cast_lines = re.findall(r"<Character\d+>:", text)
    assert cast_lines == [subject + ":"]  # the subject's own line, no other character's
    assert all(f"<Environment{i}>:" in text for i in range(1, len(rec["script"].environments) + 1))


def test_subject_alone_outside_0_1_is_a_config_error():
  from unimage_jax.config_validation import ConfigError
  c = data_fixtures.tiny_config(subject_alone=1.5)
  with pytest.raises(ConfigError, match="config.data.subject_alone"):
    PlanConfig.from_config(c)


def test_interleaved_layout():
  p, _ = _planner()
  rec = _record(5)
  sample = p.plan(rec, np.random.default_rng(0), "interleaved")
  segs = sample.segments
  k = (len(segs) - 1) // 3
  assert _kinds(segs) == ["T"] + ["N", "C", "T"] * k
  assert all(s.train for s in segs if isinstance(s, TextSegment))
  for s in segs:
    if isinstance(s, TextSegment):
      assert s.token_ids[0] == p.tok.im_start and s.token_ids[-1] == p.tok.im_end
  # the image tokens are exactly the pixel codec of the keyframe
  tokens, h, w = pixel_codec.image_to_tokens(rec["keyframes"][0], 4, 2)
  assert (h, w) == (segs[1].height, segs[1].width) == (4, 4)
  np.testing.assert_array_equal(segs[1].latents, tokens)
  assert segs[1].latents.shape == (16, 192)
  # later variants are shorter cuts of the same story
  lens = [layout.sample_lengths(v)[0] + layout.sample_lengths(v)[1] for v in sample.variants]
  assert lens == sorted(lens, reverse=True) and len(set(lens)) == len(lens)


def test_script_precontext_split():
  p, _ = _planner(precontext_split_prob=1.0)
  segs = p.plan(_record(7), np.random.default_rng(1), "script").segments
  assert _kinds(segs) == ["T", "T"] and (segs[0].train, segs[1].train) == (False, True)
  ctx = p.tok.decode(segs[0].token_ids[1:-1])
  assert "<Character1>:" in ctx and "<Frame1>:" in ctx  # the context holds whole shots
  cont = p.tok.decode(segs[1].token_ids[1:])
  assert cont.startswith("<Frame") and "<Prompt>" not in cont
  p0, _ = _planner(precontext_split_prob=0.0)
  segs = p0.plan(_record(7), np.random.default_rng(1), "script").segments
  assert p0.tok.decode(segs[0].token_ids[1:-1]).startswith("<Prompt>:")
  assert p0.tok.decode(segs[1].token_ids[1:]).startswith("<Character1>:")


def test_keyframe_layout_and_dropout():
  p, _ = _planner(text_cond_dropout=0.0, vae_cond_dropout=0.0, vit_cond_dropout=0.0, use_vit_context=True)
  rng = np.random.default_rng(3)
  seen = False
  for _ in range(10):
    segs = p.plan(_record(5), rng, "keyframe").segments
    kinds = _kinds(segs)
    assert kinds[0] == "T" and kinds[-2:] == ["T", "N"] and not any(s.train for s in segs if isinstance(s, TextSegment))
    middle = kinds[1:-2]
    assert middle == ["V", "C"] * (len(middle) // 2)
    seen |= len(middle) > 0
  assert seen
  vit = next(s for s in segs if isinstance(s, VitSegment)) if "V" in kinds else None
  if vit is not None:
    assert vit.patches.shape == (16, 192) and vit.patches.min() >= -1 and vit.patches.max() <= 1
  p1, _ = _planner(text_cond_dropout=1.0, vae_cond_dropout=1.0, vit_cond_dropout=1.0, use_vit_context=True)
  segs = p1.plan(_record(5), rng, "keyframe").segments
  assert _kinds(segs) == ["N"]  # fully unconditional sample for classifier-free guidance


def test_sample_too_large_is_clear():
  p, _ = _planner(und_len=40)
  with pytest.raises(SampleTooLargeError, match="does not fit the row"):
    p.plan(_record(5), np.random.default_rng(0), "interleaved")


def test_every_variant_fits_alone():
  p, c = _planner(tasks={"interleaved": 1.0, "script": 1.0, "keyframe": 1.0})
  sizes = PlanConfig.from_config(c).sizes
  rng = np.random.default_rng(0)
  for i in range(30):
    for v in p.plan(_record(i), rng).variants:
      u, g, n, s = layout.sample_lengths(v)
      assert u <= sizes.und_len and g <= sizes.gen_len and n <= sizes.vit_len and s <= sizes.max_segments


def test_vae_configs_plan_from_cached_latents_only():
  """A flux_vae config takes keyframe tokens from the latent cache; a record without them is a
  clear error (the pixel codec is never silently used for a VAE model)."""
  from configs import mot_1b
  from data_pipelines.sequence_plan import CachedFrame, frames_of
  from unimage_jax.config_validation import ConfigError
  cfg = PlanConfig.from_config(mot_1b.get_config())
  assert cfg.autoencoder == "flux_vae"
  record = _record(0)
  with pytest.raises(ConfigError, match="cached latents"):
    frames_of(record, "flux_vae")
  k = len(record["keyframes"])
  record["latents"] = {"tokens": np.ones((k, 4, 64), np.float32), "h": 2, "w": 2}
  frames = frames_of(record, "flux_vae")
  assert len(frames) == k and isinstance(frames[0], CachedFrame) and frames[0].tokens.shape == (4, 64)


def test_extra_noised_copies_see_what_the_first_sees_and_nothing_sees_them():
  """``data.noised_copies=2``: each keyframe is two noised copies, then the clean one; in the
  encoded row both copies share the RoPE position, see the same context, and no other token sees
  either, so the row trains what a one-copy row does with twice the flow samples."""
  from data_pipelines.pipeline import row_encoder
  from unimage_jax.attention.reference import visibility
  p, c = _planner(noised_copies=2, gen_len=320)
  sample = p.plan(_record(5), np.random.default_rng(0), "interleaved")
  k = (len(sample.segments) - 1) // 4
  assert k >= 2 and _kinds(sample.segments) == ["T"] + ["N", "N", "C", "T"] * k
  row = layout.stack_rows([row_encoder(c)([sample.segments])])
  cat = lambda f: np.concatenate([row[f"und_{f}"], row[f"gen_{f}"]], axis=1)
  meta = layout.TokenMeta(*(cat(f) for f in ("sample_ids", "segment_ids", "segment_kinds", "orders")))
  vis = np.asarray(visibility(meta, meta))[0]  # [L, L]
  kinds, segs, pos = meta.segment_kinds[0], meta.segment_ids[0], cat("positions")[0]
  noise_segs = sorted({int(s) for s in segs[kinds == layout.KIND_NOISE]})
  assert len(noise_segs) == 2 * k
  for a, b in zip(noise_segs[::2], noise_segs[1::2]):  # the two copies of one keyframe
    qa, qb = np.flatnonzero(segs == a), np.flatnonzero(segs == b)
    outside = (segs != a) & (segs != b)
    np.testing.assert_array_equal(vis[qa[0]] & outside, vis[qb[0]] & outside)
    assert set(pos[qa]) == set(pos[qb]) and len(set(pos[qa])) == 1
  noise = kinds == layout.KIND_NOISE
  assert not (vis[:, noise] & (segs[:, None] != segs[None, :])[:, noise]).any()


def test_place_change_copies_multiply_the_keyframes_whose_place_changes():
  """``data.place_change_copies=3``: a keyframe whose frame line names another place than the
  previous shot's gets 3 noised copies, every other keyframe ``noised_copies``; a negative count
  is a configuration error."""
  for i in range(5, 40):  # a story that changes place within the shots that fit
    rec = _record(i)
    places = [referenced(s.frame, "Environment") for s in rec["script"].shots]
    if any(places[k] != places[k - 1] for k in range(1, 4)):
      break
  p, _ = _planner(noised_copies=1, place_change_copies=3, gen_len=1024, max_segments=96)
  segs = p.plan(rec, np.random.default_rng(0), "interleaved").segments
  copies, run = [], 0
  for kind in _kinds(segs):
    if kind == "N":
      run += 1
    elif kind == "C":
      copies.append(run)
      run = 0
  assert len(copies) >= 4
  want = [3 if k and places[k] != places[k - 1] else 1 for k in range(len(copies))]
  assert copies == want and 3 in want and 1 in want[1:] + [want[0]]
  with pytest.raises(ValueError, match="config.data.place_change_copies=-1"):
    _planner(place_change_copies=-1)


def test_name_loss_weight_stresses_the_cast_names_and_nothing_else():
  rec = _record(5)
  names = [line.split(",")[0] for line in rec["script"].characters]
  plain, _ = _planner(name_loss_weight=1.0)
  stressed, c = _planner(name_loss_weight=12.0)
  for task in ("header", "interleaved"):
    base = plain.plan(rec, np.random.default_rng(0), task).segments[0]
    seg = stressed.plan(rec, np.random.default_rng(0), task).segments[0]
    assert base.label_weights is None
    np.testing.assert_array_equal(seg.token_ids, base.token_ids)
    ids = seg.token_ids.tolist()
    heavy = [i for i, w in enumerate(seg.label_weights) if w != 1.0]
    assert set(seg.label_weights[heavy]) == {12.0}
    # the weighted labels (token i + 1) spell exactly the cast's names, each after its "<CharacterK>:"
    assert [stressed.tok.decode([ids[i + 1]]).strip() for i in heavy] == names
    assert all(stressed.tok.decode(ids[i - 1:i + 1]).startswith("<Character") for i in heavy)
    row = layout.pack_row([[seg]], layout.BufferSizes(c.data.und_len, c.data.gen_len, c.data.vit_len,
                                                       c.data.max_segments), 48, 8, 192)
    assert sorted(np.flatnonzero(row["und_loss_weights"] == 12.0).tolist()) == heavy
    assert np.sum(row["und_loss_weights"] == 1.0) == len(ids) - 1 - len(heavy)


def test_name_loss_weight_must_be_positive():
  from unimage_jax.config_validation import ConfigError
  with pytest.raises(ConfigError, match="config.data.name_loss_weight"):
    PlanConfig.from_config(data_fixtures.tiny_config(name_loss_weight=0.0))


def test_subject_spelled_out_puts_the_cast_line_in_place_of_the_tag():
  p, _ = _planner(noised_copies=1, subject_spelled_out=1.0)
  rec = _record(5)
  script = rec["script"]
  for seed in range(6):
    segs = p.plan(rec, np.random.default_rng(seed), "subject").segments
    text = p.tok.decode(segs[0].token_ids.tolist())
    frame = text[text.index("<Frame"):]
    k = int(re.findall(r"<Frame(\d+)>", frame)[0])
    (subject,) = referenced(script.shots[k - 1].frame, "Character")
    assert "<Character" not in frame and script.characters[subject - 1].rstrip(".") + "," in frame
    assert all(line in text for line in header_lines(script))  # the header is untouched
  with pytest.raises(Exception, match="config.data.subject_spelled_out"):
    PlanConfig.from_config(data_fixtures.tiny_config(subject_spelled_out=-0.1))


def _caption_text(p, seg) -> str:
  assert isinstance(seg, TextSegment) and not seg.train
  assert seg.token_ids[0] == p.tok.im_start and seg.token_ids[-1] == p.tok.im_end
  return p.tok.decode(seg.token_ids[1:-1]).strip()


def test_place_caption_puts_the_shots_environment_line_before_its_noised_keyframe():
  """``data.keyframe_caption="place"``: every noised keyframe of every task follows a no-loss text holding
  the environment line its frame line names; off, the layouts are unchanged."""
  rec = _record(5)
  script = rec["script"]
  env_line = lambda k: next(line for line in header_lines(script)
                            if line.startswith(f"<Environment{referenced(script.shots[k - 1].frame, 'Environment')[0]}>:"))
  p, _ = _planner(keyframe_caption="place", noised_copies=2, tasks={"interleaved": 1.0, "opening": 1.0, "subject": 1.0,
                                                              "keyframe": 1.0, "script": 1.0})
  off, _ = _planner(noised_copies=2, keyframe_caption="none")
  segs = p.plan(rec, np.random.default_rng(0), "interleaved").segments
  plain = off.plan(rec, np.random.default_rng(0), "interleaved").segments
  k = (len(plain) - 1) // 4
  assert _kinds(plain) == ["T"] + ["N", "N", "C", "T"] * k
  assert _kinds(segs) == ["T"] + ["T", "N", "N", "C", "T"] * k
  for shot in range(1, k + 1):
    assert _caption_text(p, segs[1 + 5 * (shot - 1)]) == env_line(shot)
  # the other segments are the plain layout's, token for token
  rest = [s for i, s in enumerate(segs) if i == 0 or (i - 1) % 5]
  content = lambda s: (s.token_ids if isinstance(s, TextSegment) else s.latents).tolist()
  assert [content(s) for s in rest] == [content(s) for s in plain]
  opening = p.plan(rec, np.random.default_rng(0), "opening").segments
  assert _kinds(opening) == ["T", "T", "N", "N"] and _caption_text(p, opening[1]) == env_line(1)
  subject = p.plan(rec, np.random.default_rng(0), "subject").segments
  assert _kinds(subject) == ["T", "T", "N", "N"]
  shot = int(re.search(r"<Frame(\d+)>", p.tok.decode(subject[0].token_ids)).group(1))
  assert _caption_text(p, subject[1]) == env_line(shot)
  keyframe = _planner(keyframe_caption="place", text_cond_dropout=0.0, vae_cond_dropout=0.0)[0].plan(
      rec, np.random.default_rng(3), "keyframe").segments
  assert _kinds(keyframe)[-3:] == ["T", "T", "N"]
  shot = int(re.search(r"<Frame(\d+)>", p.tok.decode(keyframe[-3].token_ids)).group(1))
  assert _caption_text(p, keyframe[-2]) == env_line(shot)
  dropped = _planner(keyframe_caption="place", text_cond_dropout=1.0, vae_cond_dropout=1.0)[0].plan(
      rec, np.random.default_rng(3), "keyframe").segments
  assert _kinds(dropped) == ["N"]  # text dropout drops the caption with the other texts


def test_caption_lines_take_what_the_frame_line_names_from_any_text():
  from unimage_jax.prompt_layout import caption_lines, named_definition_lines
  text = ["<Prompt>: Ona walks.", "<Character1>: Ona, a small red circle.", "<Character2>: Bo, a big blue square.",
          "<Environment1>: A dim cave.", "<Environment2>: A green garden.",
          "<Frame1>: Wide shot: in <Environment1>, <Character1> stands."]
  close = "<Frame2>: Close-up: <Character2> jumps in <Environment2>."
  wide = "<Frame3>: Wide shot: <Character2> and <Character1> arrive in <Environment1>."
  assert caption_lines(text, close, "none") == caption_lines(text, wide, "none") == []
  assert caption_lines(text, close, "place") == ["<Environment2>: A green garden."]
  assert caption_lines(text, close, "subject_place") == ["<Character2>: Bo, a big blue square.",
                                                         "<Environment2>: A green garden."]
  assert caption_lines(text, wide, "subject_place") == ["<Environment1>: A dim cave."]  # two characters: no subject
  assert caption_lines(text, wide, "cast_place") == ["<Character1>: Ona, a small red circle.",
                                                     "<Character2>: Bo, a big blue square.", "<Environment1>: A dim cave."]
  with pytest.raises(ValueError, match="keyframe caption 'places'"):
    caption_lines(text, close, "places")
  with pytest.raises(ValueError, match="config.data.keyframe_caption='places'"):
    from unimage_jax.config_validation import validate_config
    validate_config(data_fixtures.tiny_config(keyframe_caption="places"))
  assert named_definition_lines(text, "<Frame2>: Wide shot: <Character1> arrives in <Environment2>.", "Environment") == \
      ["<Environment2>: A green garden."]
  assert named_definition_lines(text, "<Frame2>: from <Environment2> to <Environment1>.", "Environment") == \
      ["<Environment1>: A dim cave.", "<Environment2>: A green garden."]
  assert named_definition_lines(text, "<Frame2>: <Character1> arrives in <Environment3>.", "Environment") == []  # not defined
  assert named_definition_lines(text, "<Frame2>: Close-up: <Character1> jumps.", "Environment") == []
  assert named_definition_lines(text, wide, "Character") == ["<Character1>: Ona, a small red circle.",
                                                             "<Character2>: Bo, a big blue square."]


def test_character_loss_weight_weighs_each_noised_token_by_its_character_pixels():
  """``data.character_loss_weight=W``: a noised keyframe's token weighs ``1 + (W - 1) x`` the share of
  its 8 x 8 pixels painted in a character colour, in the plan and in the encoded row; clean
  keyframes, padding and W = 1 carry no weights (every noised token then weighs 1)."""
  from data_pipelines.pipeline import row_encoder
  from data_pipelines.storyworld.cast import ACCESSORY_COLOURS, COLOURS
  rec = _record(5)
  p, c = _planner(character_loss_weight=10.0, noised_copies=1, gen_len=320)
  segs = p.plan(rec, np.random.default_rng(0), "interleaved").segments
  images = [s for s in segs if isinstance(s, layout.ImageSegment)]
  noised, clean = images[0::2], images[1::2]
  assert all(s.noised for s in noised) and not any(s.noised for s in clean)
  assert all(s.loss_weights is None for s in clean)
  paint = list(COLOURS.values()) + list(ACCESSORY_COLOURS.values())
  for k, seg in enumerate(noised):
    np.testing.assert_array_equal(seg.latents, clean[k].latents)  # keyframe k's noised copy
    img = rec["keyframes"][k]
    want = [1.0 + 9.0 * np.mean([tuple(img[y, x]) in paint for y in range(8 * r, 8 * r + 8)
                                 for x in range(8 * q, 8 * q + 8)])
            for r in range(4) for q in range(4)]
    np.testing.assert_allclose(seg.loss_weights, want, rtol=1e-6)
  assert max(w for s in noised for w in s.loss_weights) > 3.0 and min(w for s in noised for w in s.loss_weights) == 1.0
  row = row_encoder(c)([segs])
  noise = row["gen_segment_kinds"] == layout.KIND_NOISE
  np.testing.assert_allclose(row["gen_loss_weights"][noise], np.concatenate([s.loss_weights for s in noised]))
  assert not row["gen_loss_weights"][~noise].any()
  plain, c1 = _planner(noised_copies=1, gen_len=320)
  row = row_encoder(c1)([plain.plan(rec, np.random.default_rng(0), "interleaved").segments])
  np.testing.assert_array_equal(row["gen_loss_weights"], (row["gen_segment_kinds"] == layout.KIND_NOISE).astype(np.float32))


def test_character_loss_weight_needs_storyworld_and_a_positive_weight():
  from unimage_jax.config_validation import ConfigError
  with pytest.raises(ConfigError, match="config.data.character_loss_weight=0.0 must be > 0"):
    PlanConfig.from_config(data_fixtures.tiny_config(character_loss_weight=0.0))
  with pytest.raises(ConfigError, match="config.data.character_loss_weight=4.0 needs StoryWorld"):
    PlanConfig.from_config(data_fixtures.tiny_config(character_loss_weight=4.0, dataset="storyboards"))
