"""Prints a run's full effective config: one sorted ``key = value`` line per leaf.

  python tools/show_config.py --config=configs/tiny.py:stage2 [--config.train.steps=300 ...]

The values are those ``tools/train.py`` runs with the same flags (base_config, the file's updates,
the stage preset, the overrides; the trainer writes the same text to ``<workdir>/config.txt``), so
two runs compare with ``diff``.
"""

from absl import flags
from ml_collections import config_flags

from unimage_jax import config_text

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Overrides config.train.workdir (as tools/train.py does).")


def main(argv):
  del argv
  config = _CONFIG.value
  if _WORKDIR.value:
    config.train.workdir = _WORKDIR.value
  print(config_text.config_text(config), end="")


if __name__ == "__main__":
  from unimage_jax import cli
  cli.run(main)  # the project's own errors as one line, exit code 2
