"""Trains a tokenizer on a built dataset's script text: SentencePiece or an HF ``tokenizer.json``.

ID tags (<Character1>, <Frame3>, ...), cue brackets, image markers and control tokens are single
tokens (SentencePiece user-defined symbols / HF special tokens). The vocabulary must fit
config.model.vocab_size. The kind follows --output: a ``.model`` path is SentencePiece; a ``.json``
path or a folder gets a Qwen2-style byte-level BPE ``tokenizer.json`` (the `tokenizers` library),
the same interface a Qwen2/BAGEL checkpoint's tokenizer has, with no download.

  python tools/train_tokenizer.py --data_dir=artifacts/data --output=artifacts/tokenizer/spm.model
  python tools/train_tokenizer.py --data_dir=artifacts/data --output=artifacts/tokenizer/hf/tokenizer.json
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from data_pipelines.pipeline import tokenizer_corpus  # noqa: E402
from unimage_jax.errors import UserError  # noqa: E402
from unimage_jax.tokenizer import load_tokenizer, train_any_tokenizer  # noqa: E402

_DATA_DIR = flags.DEFINE_string("data_dir", "artifacts/data", "TFDS data directory.")
_DATASET = flags.DEFINE_string("dataset", "storyworld", "Built dataset to read.")
_CONFIG_NAME = flags.DEFINE_string("dataset_config", "", "Built config ('' = the only one).")
_OUTPUT = flags.DEFINE_string("output", "artifacts/tokenizer/spm.model",
                              "A .model path (SentencePiece), or a tokenizer.json path / folder (HF).")
_VOCAB = flags.DEFINE_integer("vocab_size", 1024, "Pieces; must be <= config.model.vocab_size.")


def main(argv):
  del argv
  lines = tokenizer_corpus(_DATA_DIR.value, _DATASET.value, _CONFIG_NAME.value)
  path = train_any_tokenizer(lines, _OUTPUT.value, _VOCAB.value)
  try:
    tok = load_tokenizer(path, max_vocab_size=_VOCAB.value)
  except ValueError as e:
    raise UserError(str(e)) from None
  print(f"tokenizer: {tok.vocab_size} pieces, {len(tok.special_ids)} special symbols, "
        f"trained on {len(lines)} lines -> {path}")


if __name__ == "__main__":
  from unimage_jax import cli
  cli.run(main)  # the project's own errors as one line, exit code 2
