"""The flow probe's reads (tools/diagnose_flow.py), on a small random model and scripted velocities."""

import numpy as np

import data_fixtures
from data_pipelines.sequence_plan import PlanConfig, Planner
from unimage_jax.director import Director
from unimage_jax.evaluation.flow_probe import FlowProbe, probe_segments
from unimage_jax.evaluation.heldout import validation_records
from unimage_jax.layout import ImageSegment, TextSegment
from unimage_jax.script_schema import frame_line, referenced
from unimage_jax.model import functional
from unimage_jax.tokenizer import Tokenizer


def _random_model_probe():
  """(director, 6 held-out records, probe) of a small random model."""
  c = data_fixtures.tiny_config()
  c.model.update(num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128)
  params, tables = functional.init_params(c.model, 0)
  director = Director(c, params, tables, Tokenizer(c.data.tokenizer_path, c.model.vocab_size))
  records = validation_records(c, 6)
  probe = FlowProbe(director.engine.mdef, params, tables, c, Planner(PlanConfig.from_config(c), director.tok))
  return director, records, probe


def _true_keyframe(row, t, eps, read_t=None, shuffle=None):
  """A ``velocity_of`` whose implied clean image is the true keyframe (an oracle model)."""
  x_t = (1.0 - t) * row.target + t * eps
  return (x_t - row.target) / t, x_t


def _black_frame(row, t, eps, **kwargs):
  """A ``velocity_of`` whose implied clean image is x0 = x_t - v = -1: a black frame."""
  return eps + 1.0, eps


def test_place_by_story_places_reads_the_implied_clean_image():
  director, records, probe = _random_model_probe()
  # the random model's own velocities: it runs, and every probed shot is counted once
  out = probe.place_by_story_places(records, "interleaved", director.codec.decode, shots_per_story=2)
  assert sum(n for _, n in out.values()) == sum(min(2, len(r["script"].shots)) for r in records)
  assert set(out) <= {1, 2, 3} and all(0.0 <= acc <= 1.0 for acc, _ in out.values())

  # a model whose implied x0 at t = 1 is the true keyframe draws every place right ...
  probe.velocity_of = _true_keyframe
  out = probe.place_by_story_places(records, "interleaved", director.codec.decode, shots_per_story=2)
  assert all(acc == 1.0 for acc, _ in out.values()), out

  # ... and one that draws a black frame (no place's colours within the detector's tolerance) none
  probe.velocity_of = _black_frame
  out = probe.place_by_story_places(records, "interleaved", director.codec.decode, shots_per_story=2)
  assert all(acc == 0.0 for acc, _ in out.values()), out


def test_frame_line_reads_move_only_with_what_the_model_reads():
  director, records, probe = _random_model_probe()
  shots = lambda r: r["script"].shots[:8]
  want_place = sum(len(shots(r)) for r in records if len(r["script"].environments) > 1)
  want_subject = sum(1 for r in records if len(r["script"].characters) > 1 for s in shots(r)
                     if len(referenced(s.frame, "Character")) == 1)
  tag = {name: director.tok.encode(name)[-1] for name in ("<Environment2>", "<Character2>")}

  def reading(token_id):
    """A model whose picture is bright where the row holds ``token_id`` often, dark otherwise."""
    def velocity_of(row, t, eps, read_t=None, shuffle=None):
      ids = np.concatenate([s.token_ids for s in row.segments if isinstance(s, TextSegment)])
      x0 = np.full_like(row.target, np.count_nonzero(ids == token_id) / 4.0 - 1.0)
      x_t = (1.0 - t) * x0 + t * eps
      return (x_t - x0) / t, x_t
    return velocity_of

  probe.velocity_of = reading(-1)  # reads nothing: no change moves its picture
  out = probe.frame_line_reads(records, "interleaved", director.codec.decode)
  assert out["place_tag"] == (0.0, want_place) and out["subject_tag"] == (0.0, want_subject), out
  assert out["cast_colours"][0] == 0.0 and out["noise_draw"][0] == 0.0
  probe.velocity_of = reading(tag["<Environment2>"])  # reads the place tags only
  out = probe.frame_line_reads(records, "interleaved", director.codec.decode)
  assert out["place_tag"][0] > 0.0 and out["subject_tag"][0] == 0.0, out
  probe.velocity_of = reading(tag["<Character2>"])  # reads the character tags only
  out = probe.frame_line_reads(records, "interleaved", director.codec.decode)
  assert out["subject_tag"][0] > 0.0 and out["place_tag"][0] == 0.0, out


def test_frame_line_reads_in_the_subject_layout_and_the_noise_draw():
  director, records, probe = _random_model_probe()
  record = records[0]
  segs = probe_segments(probe.planner, record, record, 3, "subject", "full").segments
  # the header and shot 3's frame line as context (no loss), its caption (the tiny config's place
  # line), then the noised target: no other image
  assert [type(s).__name__ for s in segs] == ["TextSegment", "TextSegment", "ImageSegment"]
  text = director.tok.decode(list(segs[0].token_ids))
  assert frame_line(record["script"], 3) in text and "<Frame2>" not in text and not segs[0].train
  place = referenced(record["script"].shots[2].frame, "Environment")[0]
  assert director.tok.decode(list(segs[1].token_ids[1:-1])).strip().startswith(f"<Environment{place}>:")

  seen, character2 = [], director.tok.encode("<Character2>")[-1]
  def leaky(row, t, eps, read_t=None, shuffle=None):
    """Reads the character tags only and lets a tenth of the noise through its clean image."""
    seen.append(sum(isinstance(s, ImageSegment) for s in row.segments))
    ids = np.concatenate([s.token_ids for s in row.segments if isinstance(s, TextSegment)])
    x0 = np.full_like(row.target, np.count_nonzero(ids == character2) / 4.0 - 1.0)
    x0 = x0 + 0.1 * eps
    x_t = (1.0 - t) * x0 + t * eps
    return (x_t - x0) / t, x_t
  probe.velocity_of = leaky
  out = probe.frame_line_reads(records, "subject", director.codec.decode)
  assert set(seen) == {1}  # only the noised target: the subject layout holds no earlier keyframe
  assert out["subject_tag"][0] > 0.0 and out["place_tag"][0] == 0.0, out
  assert out["noise_draw"][0] > 0.0 and out["noise_draw"][1] == out["cast_colours"][1], out


def test_subject_drawing_scores_the_picture_like_a_storyboard():
  director, records, probe = _random_model_probe()

  probe.velocity_of = _true_keyframe
  for spelled in (False, True):
    out = probe.subject_drawing(records, director.codec.decode, spelled_out=spelled)
    assert out["shots"] > 0 and out["place_accuracy"] == 1.0 and out["characters_drawn"] >= 0.9, out
  probe.velocity_of = _black_frame
  out = probe.subject_drawing(records, director.codec.decode)
  assert out["place_accuracy"] == 0.0 and out["characters_drawn"] == 0.0, out


def test_training_sample_drawing_samples_the_planners_own_layout_and_scores_it():
  """``FlowProbe.training_sample_drawing``: the noised keyframe of the planner's subject samples,
  drawn by the Euler sampler through ``velocity_at`` and scored like a storyboard."""
  director, records, probe = _random_model_probe()
  seen = []

  def oracle(row, x_t, t, shuffle=None):  # the velocity towards the true keyframe from any x_t
    seen.append((len(row.segments), t))
    return (x_t - row.target) / t
  probe.velocity_at = oracle
  out = probe.training_sample_drawing(records, "subject", director.codec.decode, sampler_steps=4, samples_per_story=2)
  assert out["shots"] == 2 * len(records) and len(seen) == 3 * out["shots"]  # 4 timesteps: 3 Euler steps
  assert seen[0][1] == 1.0 and 0.0 < seen[2][1] < seen[1][1] < 1.0
  assert out["place_accuracy"] == 1.0 and out["characters_drawn"] >= 0.9 and out["agreement"] >= 0.9, out
  probe.velocity_at = lambda row, x_t, t, shuffle=None: x_t + 1.0  # lands on a black frame
  out = probe.training_sample_drawing(records, "subject", director.codec.decode, samples_per_story=1)
  assert out["place_accuracy"] == 0.0 and out["characters_drawn"] == 0.0, out


def test_velocity_of_is_velocity_at_the_noised_truth():
  director, records, probe = _random_model_probe()
  row = probe_segments(probe.planner, records[0], records[1], 2, "interleaved", "full")
  eps = np.random.default_rng(0).standard_normal(row.target.shape).astype(np.float32)
  v, x_t = probe.velocity_of(row, 0.7, eps)
  np.testing.assert_allclose(x_t, 0.3 * row.target + 0.7 * eps, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(v, probe.velocity_at(row, x_t, 0.7))
  assert not np.allclose(v, probe.velocity_at(row, x_t, 0.2))  # the model reads the timestep


def test_diagnose_flow_refuses_a_bad_sampler_step_count_before_loading_anything():
  from tool_runs import assert_user_error, run_tool
  proc = run_tool("diagnose_flow.py", "--checkpoint=runs/no_such_run", "--sampler_steps=2,one")
  assert_user_error(proc, "diagnose_flow.py", "--sampler_steps must be whole numbers >= 2")


def test_drawing_by_shot_size_scores_every_shot_once_by_its_size():
  director, records, probe = _random_model_probe()

  probe.velocity_of = _true_keyframe
  out = probe.drawing_by_shot_size(records, "interleaved", director.codec.decode)
  assert out["all"]["shots"] == sum(len(r["script"].shots) for r in records)
  assert sum(v["shots"] for k, v in out.items() if k != "all") == out["all"]["shots"]
  assert set(out) - {"all"} <= {"Wide shot", "Medium shot", "Close-up"}
  assert out["all"]["place_accuracy"] == 1.0 and out["all"]["characters_drawn"] >= 0.9, out
  probe.velocity_of = _black_frame
  out = probe.drawing_by_shot_size(records, "interleaved", director.codec.decode)
  assert out["all"]["place_accuracy"] == 0.0 and out["all"]["characters_drawn"] == 0.0, out
