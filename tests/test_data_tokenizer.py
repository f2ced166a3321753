"""Tokenizers (SentencePiece .model and HF tokenizer.json, one interface): ID tags, cue brackets and
control tokens are single ids; the vocab must fit the model; the pipeline checks both."""

import pytest

import data_fixtures
from data_pipelines import pipeline
from data_pipelines.builders.storyworld import story_for
from unimage_jax import script_schema as ss
from unimage_jax.config_validation import ConfigError
from unimage_jax.tokenizer import Tokenizer, load_tokenizer, train_any_tokenizer, user_symbols

KINDS = ("spm.model", "hf/tokenizer.json")


@pytest.fixture(scope="module", params=KINDS)
def tok(request, tmp_path_factory):
  texts = [line for i in range(150) for line in ss.render(story_for(0, "train", i).script).splitlines()]
  path = train_any_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / request.param), vocab_size=512)
  return load_tokenizer(path, max_vocab_size=512), path


def test_user_symbols_are_single_ids(tok):
  tok, _ = tok
  for sym in user_symbols():
    assert tok.encode(sym) == [tok.special_ids[sym]], sym
    assert tok.encode(f"x{sym}y").count(tok.special_ids[sym]) == 1, sym  # inside running text too
  assert len({tok.special_ids[s] for s in user_symbols()}) == len(user_symbols())
  assert {tok.im_start, tok.im_end, tok.vision_start, tok.vision_end} <= set(tok.special_ids.values())


def test_round_trip_and_tags_in_context(tok):
  tok, _ = tok
  text = ss.render(story_for(0, "validation", 1).script)
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.special_ids["<Frame1>"] in ids and tok.special_ids["<-"] in ids or "<-" not in text
  assert tok.decode(tok.encode("Ünïcode ✓ <Character3> 日本")) == "Ünïcode ✓ <Character3> 日本"  # bytes


def test_vocab_limit_is_enforced(tok):
  tok, path = tok
  assert tok.vocab_size <= 512
  with pytest.raises(ValueError, match="config.model.vocab_size"):
    load_tokenizer(path, max_vocab_size=100)


def test_a_split_symbol_is_refused(tmp_path):
  import sentencepiece as spm

  texts = [line for i in range(40) for line in ss.render(story_for(0, "train", i).script).splitlines()]
  spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / "plain"), vocab_size=400,
                                 model_type="bpe", hard_vocab_limit=False, byte_fallback=True, minloglevel=2, add_dummy_prefix=False,
                                 user_defined_symbols=list(ss.CONTROL_TOKENS))  # no ID tags
  with pytest.raises(ValueError, match="splits '<-'"):
    load_tokenizer(str(tmp_path / "plain.model"))


def test_missing_model_names_the_field(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.data.tokenizer_path"):
    Tokenizer(str(tmp_path / "none.model"))
  with pytest.raises(FileNotFoundError, match="config.data.tokenizer_path"):
    load_tokenizer(str(tmp_path / "qwen2"))  # a folder path without tokenizer.json


def test_pipeline_runs_on_an_hf_tokenizer_built_on_first_use():
  """config.data.tokenizer_path=<default hf>/tokenizer.json: built on first use like spm.model, and
  the packed batch's text is that tokenizer's ids (tags as single ids)."""
  c = data_fixtures.tiny_config()
  c.data.tokenizer_path = pipeline.default_hf_tokenizer_path(c)
  pipeline.ensure_dataset(c, verbose=False)
  tok = pipeline.check_tokenizer(c)
  assert type(tok).__name__ == "HFTokenizer"
  batch = next(pipeline.make_train_iterator(c, process_index=0, process_count=1))
  ids = batch["und_token_ids"][0]
  text = tok.decode(ids[batch["und_segment_kinds"][0] == 1])
  assert "<Character1>" in text and "<|im_start|>" in text
  c.model.vocab_size = 64  # the same file no longer fits: a config error naming the field
  with pytest.raises(ConfigError, match="config.model.vocab_size"):
    pipeline.check_tokenizer(c)


def test_a_missing_hf_tokenizer_names_the_command_that_writes_it(tmp_path):
  folder = tmp_path / "qwen2"
  with pytest.raises(FileNotFoundError, match=r"tools/train_tokenizer.py --output=.*qwen2/tokenizer.json\b"):
    load_tokenizer(str(folder))
