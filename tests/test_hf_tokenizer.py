"""HF tokenizer.json (Qwen2-style byte-level BPE, built here) behind the SentencePiece interface."""

import pickle

import pytest

tokenizers = pytest.importorskip("tokenizers")

from unimage_jax.interchange.hf_tokenizer import CONTROL_TOKENS, HFTokenizer  # noqa: E402

CORPUS = ["<Character1> kneels in the dust of <Environment1>, brushing the artifact.",
          "A woman with long dark brown hair and a blue-green scarf.", "The camera pans across the dig site."] * 20


def _build(path, specials):
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  tok.save(str(path))
  return str(path)


def test_control_tokens_are_single_ids_and_round_trip(tmp_path):
  path = _build(tmp_path / "tokenizer.json", ["<|endoftext|>", *CONTROL_TOKENS])
  tok = HFTokenizer(str(tmp_path))  # a checkpoint folder works as well as the file
  text = "<|im_start|>The camera pans.<|vision_start|><|vision_end|>café<|im_end|>"
  ids = tok.encode(text)
  assert ids[0] == tok.im_start == tok.id_of("<|im_start|>")
  assert ids[-1] == tok.im_end and tok.vision_start in ids and tok.vision_end in ids
  assert tok.decode(ids) == text
  assert tok.special_ids["<|endoftext|>"] == tok.id_of("<|endoftext|>")
  assert tok.vocab_size == 300
  assert pickle.loads(pickle.dumps(tok)).encode(text) == ids
  with pytest.raises(ValueError, match="not in the vocabulary"):
    tok.id_of("<Character9>")
  assert path


def test_missing_specials_and_id_tags_are_appended_like_bagel(tmp_path):
  _build(tmp_path / "tokenizer.json", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])  # plain Qwen2
  tags = ["<Character1>", "<Environment1>"]
  tok = HFTokenizer(str(tmp_path / "tokenizer.json"), extra_special_tokens=tags)
  assert tok.vocab_size == 300 + 4  # vision_start, vision_end and two ID tags appended
  assert sorted([tok.vision_start, tok.vision_end, tok.id_of(tags[0]), tok.id_of(tags[1])]) == [300, 301, 302, 303]
  ids = tok.encode("<Character1> kneels in <Environment1>")
  assert ids[0] == tok.special_ids["<Character1>"] and tok.special_ids["<Environment1>"] in ids
  assert tok.decode(ids) == "<Character1> kneels in <Environment1>"
  with pytest.raises(ValueError, match="lacks the special tokens"):
    HFTokenizer(str(tmp_path), add_missing=False)
  with pytest.raises(ValueError, match="config.model.vocab_size"):
    HFTokenizer(str(tmp_path), max_vocab_size=256)
  tok.save(str(tmp_path / "saved.json"))
  again = HFTokenizer(str(tmp_path / "saved.json"), extra_special_tokens=tags)
  assert again.encode("<Character1> kneels") == tok.encode("<Character1> kneels") and again.vocab_size == 304


def test_cast_name_span_under_byte_level_bpe(tmp_path):
  """``data.name_loss_weight`` finds a cast line's name in a BPE tokenizer's ids as in SentencePiece's."""
  from unimage_jax.prompt_layout import line_ids, name_token_span
  _build(tmp_path / "tokenizer.json", ["<|endoftext|>", *CONTROL_TOKENS])
  tok = HFTokenizer(str(tmp_path / "tokenizer.json"), extra_special_tokens=["<Character1>", "<Character2>"])
  for line, name in (("<Character2>: Dex, a large pink triangle.", " Dex"),
                     ("<Character1>: Annabel Lee, a woman with long dark brown hair.", " Annabel Lee")):
    ids = line_ids(tok, line)
    a, b = name_token_span(tok, line)
    assert ids[a - 1] == tok.encode(":")[-1] and tok.decode(ids[a:b]) == name
    assert tok.decode(ids[b:b + 1]).startswith(",")
  assert name_token_span(tok, "<Environment1>: A dusty dig site.") is None
  assert name_token_span(tok, "<Frame1>: <Character1>, kneels.") is None
