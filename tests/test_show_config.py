"""``tools/show_config.py``: a run's effective config, one sorted ``key = value`` line per leaf."""

from tool_runs import run_tool

from unimage_jax.config_loading import load_config
from unimage_jax.config_text import config_text


def _lines(*args: str) -> tuple[list[str], str]:
  proc = run_tool("show_config.py", *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout.splitlines(), proc.stderr


def test_tiny_config_one_sorted_line_per_leaf():
  lines, _ = _lines("--config=configs/tiny.py")
  assert "data.gen_len = 576" in lines and "data.und_len = 1024" in lines
  assert "train.workdir = 'runs/tiny'" in lines
  assert "optim.loss_groups = {}" in lines  # an empty group still shows
  assert "data.tasks.interleaved = 1.0" in lines  # nested groups flatten to dotted keys
  assert lines == sorted(lines) and all(" = " in line for line in lines)
  assert "\n".join(lines) + "\n" == config_text(load_config("configs/tiny.py"))


def test_stage2_shows_the_presets_values_and_logs_its_changes():
  """apply_stage halves gen_len and renames the workdir: the text has the final values, stderr says so."""
  lines, stderr = _lines("--config=configs/tiny.py:stage2", "--config.train.steps=300")
  assert "data.gen_len = 288" in lines and "data.und_len = 1312" in lines  # the row length stays 1600
  assert "train.workdir = 'runs/tiny_stage2'" in lines and "train.steps = 300" in lines
  assert "optim.loss_groups.ce = ['und_expert', 'embeddings', 'lm_head']" in lines
  assert "the stage2 preset changed data.gen_len: 576 -> 288;" in stderr
  assert "train.workdir: 'runs/tiny' -> 'runs/tiny_stage2'" in stderr
