"""Trains the SentencePiece tokenizer on a built dataset's script text.

ID tags (<Character1>, <Frame3>, ...), cue brackets, image markers and control tokens are
user-defined symbols (one id each). The vocabulary must fit config.model.vocab_size.

  python tools/train_tokenizer.py --data_dir=artifacts/data --output=artifacts/tokenizer/spm.model
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from data_pipelines.pipeline import tokenizer_corpus  # noqa: E402
from unimage_jax.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

_DATA_DIR = flags.DEFINE_string("data_dir", "artifacts/data", "TFDS data directory.")
_DATASET = flags.DEFINE_string("dataset", "storyworld", "Built dataset to read.")
_CONFIG_NAME = flags.DEFINE_string("dataset_config", "", "Built config ('' = the only one).")
_OUTPUT = flags.DEFINE_string("output", "artifacts/tokenizer/spm.model", "Model path (.model).")
_VOCAB = flags.DEFINE_integer("vocab_size", 1024, "Pieces; must be <= config.model.vocab_size.")


def main(argv):
  del argv
  lines = tokenizer_corpus(_DATA_DIR.value, _DATASET.value, _CONFIG_NAME.value)
  prefix = _OUTPUT.value[: -len(".model")] if _OUTPUT.value.endswith(".model") else _OUTPUT.value
  path = train_tokenizer(lines, prefix, _VOCAB.value)
  tok = Tokenizer(path, max_vocab_size=_VOCAB.value)
  print(f"tokenizer: {tok.vocab_size} pieces, {len(tok.special_ids)} special symbols, "
        f"trained on {len(lines)} lines -> {path}")


if __name__ == "__main__":
  from unimage_jax import cli
  cli.run(main)  # the project's own errors as one line, exit code 2
