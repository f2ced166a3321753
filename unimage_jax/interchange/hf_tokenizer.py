"""The HF tokenizer of a Qwen2/BAGEL checkpoint (``tokenizer.json``) behind the SentencePiece wrapper's interface.

Why: a model imported from Qwen2/BAGEL must keep its own vocabulary; retraining SentencePiece would
scramble the embedding rows. Special-token handling follows BAGEL: the control tokens
``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|vision_end|>`` are single special
tokens, appended to the vocabulary when the tokenizer lacks them (as BAGEL's ``add_special_tokens``
does); script ID tags (``<Character1>`` ...) can be added the same way so they are never split.
``encode`` adds no BOS/EOS (Qwen2 has none) and ``decode`` keeps special tokens as text, like the
SentencePiece wrapper does with its user-defined symbols.
"""

from __future__ import annotations

import os
from typing import Sequence

import tokenizers

from unimage_jax.script_schema import CONTROL_TOKENS
from unimage_jax.tokenizer import set_control_ids


def _tokenizer_file(path: str) -> str:
  if os.path.isdir(path) or not path.endswith(".json"):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"HF tokenizer not found: {path} (a tokenizer.json or a folder holding one)")
  return path


class HFTokenizer:
  """``tokenizers``-backed tokenizer with ``encode``/``decode``/``vocab_size``/``special_ids``/``id_of``."""

  def __init__(self, path: str, extra_special_tokens: Sequence[str] = (), max_vocab_size: int | None = None,
               add_missing: bool = True):
    self.path = path
    self._init_args = (tuple(extra_special_tokens), max_vocab_size, add_missing)
    self._tok = tokenizers.Tokenizer.from_file(_tokenizer_file(path))
    wanted = list(CONTROL_TOKENS) + [t for t in extra_special_tokens if t not in CONTROL_TOKENS]
    missing = [t for t in wanted if self._tok.token_to_id(t) is None]
    if missing and not add_missing:
      raise ValueError(f"tokenizer {path} lacks the special tokens {missing}")
    if missing:
      self._tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in missing])
    if max_vocab_size is not None and self.vocab_size > max_vocab_size:
      raise ValueError(f"tokenizer {path} has {self.vocab_size} tokens but config.model.vocab_size is "
                       f"{max_vocab_size}; the embedding table must cover every id")
    self.special_ids: dict[str, int] = {t: self._tok.token_to_id(t) for t in wanted}
    for tok in self._tok.get_added_tokens_decoder().values():  # the checkpoint's own specials too
      if tok.special:
        self.special_ids.setdefault(tok.content, self._tok.token_to_id(tok.content))
    set_control_ids(self)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def id_of(self, token: str) -> int:
    """The id of one token (special or ordinary); ValueError when the vocabulary lacks it."""
    i = self._tok.token_to_id(token)
    if i is None:
      raise ValueError(f"token {token!r} is not in the vocabulary of {self.path}")
    return i

  def save(self, path: str) -> None:
    """Writes ``tokenizer.json`` including any added special tokens."""
    self._tok.save(_tokenizer_file(path) if os.path.isdir(path) else path)

  def __getstate__(self):  # picklable for multiprocess prefetch
    return {"path": self.path, "args": self._init_args}

  def __setstate__(self, state):
    self.__init__(state["path"], *state["args"])


def train_hf_tokenizer(texts: Sequence[str], path: str, vocab_size: int = 1024,
                       special_tokens: Sequence[str] = ()) -> str:
  """Trains a Qwen2-style byte-level BPE ``tokenizer.json`` on ``texts``; returns its path.

  Why: the HF path (what a BAGEL/Qwen2 checkpoint brings) must run in tests and tiny configs with
  no download. Digits are split one by one and bytes are the base alphabet, as in Qwen2, so every
  string encodes; ``special_tokens`` (the control tokens, cue brackets and ID tags) get ids
  right after ``<|endoftext|>``, before the merges. ``path`` is a ``.json`` file or a folder.
  """
  target = os.path.join(path, "tokenizer.json") if not path.endswith(".json") else path
  os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
      tokenizers.pre_tokenizers.Digits(individual_digits=True),
      tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tok.decoder = tokenizers.decoders.ByteLevel()
  specials = ["<|endoftext|>"] + [t for t in special_tokens if t != "<|endoftext|>"]
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(texts), trainer)
  tmp = target + ".tmp"
  tok.save(tmp)
  os.replace(tmp, target)  # never a half-written tokenizer.json
  return target
