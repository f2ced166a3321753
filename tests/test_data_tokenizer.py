"""Tokenizer: ID tags and control tokens are single ids; vocab must fit the model."""

import pytest

from data_pipelines.builders.storyworld import story_for
from unimage_jax import script_schema as ss
from unimage_jax.tokenizer import Tokenizer, train_tokenizer, user_symbols


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  texts = [line for i in range(150) for line in ss.render(story_for(0, "train", i).script).splitlines()]
  path = train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "spm"), vocab_size=512)
  return Tokenizer(path, max_vocab_size=512)


def test_user_symbols_are_single_ids(tok):
  for sym in user_symbols():
    assert tok.encode(sym) == [tok.special_ids[sym]], sym
  assert len(set(tok.special_ids.values())) == len(user_symbols())
  assert {tok.im_start, tok.im_end, tok.vision_start, tok.vision_end} <= set(tok.special_ids.values())


def test_round_trip_and_tags_in_context(tok):
  text = ss.render(story_for(0, "validation", 1).script)
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.special_ids["<Frame1>"] in ids and tok.special_ids["<-"] in ids or "<-" not in text
  assert tok.decode(tok.encode("Ünïcode ✓ <Character3> 日本")) == "Ünïcode ✓ <Character3> 日本"  # byte fallback


def test_vocab_limit_is_enforced(tok):
  assert tok.vocab_size <= 512
  with pytest.raises(ValueError, match="config.model.vocab_size"):
    Tokenizer(tok.model_path, max_vocab_size=100)


def test_missing_model_names_the_field(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.data.tokenizer_path"):
    Tokenizer(str(tmp_path / "none.model"))
