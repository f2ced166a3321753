"""Prints the abstract parameter breakdown of a config (no parameters are allocated).

  python tools/param_count.py --config=configs/bagel_7b.py
"""

from ml_collections import config_flags

from unimage_jax import param_count

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config file.")


def main(argv):
  del argv
  print(param_count.format_table(param_count.breakdown(_CONFIG.value.model)))


if __name__ == "__main__":
  from unimage_jax import cli
  cli.run(main)  # the project's own errors as one line, exit code 2
