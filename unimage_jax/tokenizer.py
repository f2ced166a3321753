"""The project's one tokenizer interface: a SentencePiece ``.model`` or an HF ``tokenizer.json``.

:func:`load_tokenizer` picks by ``config.data.tokenizer_path``: a ``.model`` file is a
SentencePiece model (:class:`Tokenizer`, trained here with the script symbols as user-defined
symbols); a ``tokenizer.json`` file, or a folder holding one (a Qwen2/BAGEL checkpoint folder), is
an HF tokenizer (``interchange.hf_tokenizer.HFTokenizer``; the symbols it lacks are appended as
special tokens, as BAGEL's ``add_special_tokens`` does). Both expose ``encode``/``decode``/
``vocab_size``/``special_ids`` and the control ids ``im_start``/``im_end``/``vision_start``/
``vision_end``.

Why single symbols: ID prompting (docs/ARCHITECTURE.md §2) only works if ``<Character2>`` is one
token everywhere, never split by the subword model; the same holds for ``<|im_start|>``, the cue
brackets and the image markers that the packer writes around every image. :func:`check_symbols`
verifies it for whichever tokenizer was loaded.
"""

from __future__ import annotations

import os
from typing import Sequence

import sentencepiece as spm

from unimage_jax.script_schema import CONTROL_TOKENS, CUE_CLOSE, CUE_OPEN, id_tags

# How many ID tags of each kind the trained vocabulary holds as single symbols.
MAX_CHARACTER_TAGS = 8
MAX_ENVIRONMENT_TAGS = 8
MAX_SHOT_TAGS = 16


def user_symbols(max_characters: int = MAX_CHARACTER_TAGS, max_environments: int = MAX_ENVIRONMENT_TAGS,
                 max_shots: int = MAX_SHOT_TAGS) -> list[str]:
  """Control tokens, cue brackets and ID tags, in a fixed order (their ids follow it)."""
  return list(CONTROL_TOKENS) + [CUE_OPEN, CUE_CLOSE] + id_tags(max_characters, max_environments, max_shots)


def set_control_ids(tok) -> None:
  """``im_start``/``im_end``/``vision_start``/``vision_end`` attributes from ``tok.special_ids``
  (shared by the SentencePiece and the HF-tokenizers wrappers)."""
  for token in CONTROL_TOKENS:  # "<|im_start|>" -> tok.im_start
    setattr(tok, token[2:-2], tok.special_ids[token])


class Tokenizer:
  """Thin wrapper over a SentencePiece model: encode/decode plus the ids the packer needs."""

  def __init__(self, model_path: str, max_vocab_size: int | None = None):
    if not os.path.exists(model_path):
      raise FileNotFoundError(f"tokenizer model not found: {model_path} (config.data.tokenizer_path); "
                              "train one with tools/train_tokenizer.py")
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    if max_vocab_size is not None and self.vocab_size > max_vocab_size:
      raise ValueError(f"tokenizer {model_path} has {self.vocab_size} pieces but config.model.vocab_size "
                       f"is {max_vocab_size}; retrain with --vocab_size <= {max_vocab_size}")
    self.special_ids: dict[str, int] = {}
    for sym in user_symbols():
      i = self._sp.piece_to_id(sym)
      if i != self._sp.unk_id():
        self.special_ids[sym] = i
    for sym in CONTROL_TOKENS:
      if sym not in self.special_ids:
        raise ValueError(f"tokenizer {model_path} lacks the control symbol {sym}")
    set_control_ids(self)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def __getstate__(self):  # picklable for multiprocess prefetch
    return {"model_path": self.model_path}

  def __setstate__(self, state):
    self.__init__(state["model_path"])


def is_hf_tokenizer(path: str) -> bool:
  """A ``.model`` file is SentencePiece; anything else (a ``tokenizer.json``, or a folder holding
  one, such as a Qwen2 checkpoint) is an HF tokenizer."""
  return not path.endswith(".model")


def tokenizer_file(path: str) -> str:
  """The one file that holds the tokenizer (``<folder>/tokenizer.json`` for a folder)."""
  return path if not is_hf_tokenizer(path) or path.endswith(".json") else os.path.join(path, "tokenizer.json")


def workdir_copy_name(path: str) -> str:
  """Name of the run's own copy of its tokenizer (``tokenizer.model`` or ``tokenizer.json``)."""
  return "tokenizer.json" if is_hf_tokenizer(path) else "tokenizer.model"


def check_symbols(tok, path: str) -> None:
  """Every control token, cue bracket and ID tag encodes to exactly its own one id."""
  for sym in user_symbols():
    ids = tok.encode(sym)
    if sym not in tok.special_ids or ids != [tok.special_ids[sym]]:
      raise ValueError(f"tokenizer {path} splits {sym!r} into {ids}; script symbols must be single tokens "
                       "(retrain it with tools/train_tokenizer.py)")


def load_tokenizer(path: str, max_vocab_size: int | None = None):
  """SentencePiece :class:`Tokenizer` or ``HFTokenizer`` for ``path`` (see the module docstring).

  Raises FileNotFoundError (naming ``config.data.tokenizer_path``) when nothing is there, and
  ValueError when the vocabulary exceeds ``max_vocab_size`` or a script symbol is not one token.
  """
  if is_hf_tokenizer(path):
    if not os.path.exists(tokenizer_file(path)):
      raise FileNotFoundError(f"tokenizer not found: {tokenizer_file(path)} (config.data.tokenizer_path); "
                              f"train one with tools/train_tokenizer.py --output={tokenizer_file(path)}")
    from unimage_jax.interchange.hf_tokenizer import HFTokenizer
    syms = [s for s in user_symbols() if s not in CONTROL_TOKENS]
    tok = HFTokenizer(path, extra_special_tokens=syms, max_vocab_size=max_vocab_size)
  else:
    tok = Tokenizer(path, max_vocab_size)
  check_symbols(tok, path)
  return tok


def train_any_tokenizer(texts: Sequence[str], path: str, vocab_size: int) -> str:
  """Trains the kind of tokenizer ``path`` names (``.model``: SentencePiece; ``.json`` or a folder:
  HF byte-level BPE) with every script symbol as one token; returns the written file."""
  if is_hf_tokenizer(path):
    from unimage_jax.interchange.hf_tokenizer import train_hf_tokenizer
    return train_hf_tokenizer(texts, path, vocab_size, special_tokens=user_symbols())
  written = train_tokenizer(texts, path[: -len(".model")], vocab_size)
  if written != path:
    os.replace(written, path)
  return path


def train_tokenizer(texts: Sequence[str], model_prefix: str, vocab_size: int = 1024) -> str:
  """Trains a BPE SentencePiece model on texts; returns the .model path.

  byte_fallback keeps every UTF-8 string encodable; ``hard_vocab_limit=False`` lets a small corpus
  (StoryWorld's vocabulary is tiny) produce fewer pieces than asked instead of failing.
  """
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(list(texts)),
      model_prefix=model_prefix,
      vocab_size=vocab_size,
      model_type="bpe",
      character_coverage=1.0,
      byte_fallback=True,
      hard_vocab_limit=False,
      user_defined_symbols=user_symbols(),
      split_digits=True,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      max_sentence_length=1 << 15,
      num_threads=2,
      minloglevel=2,
  )
  return model_prefix + ".model"
