"""The data CLIs run end to end on a small build (tokenizer training, benchmark)."""

import os
import subprocess
import sys

import data_fixtures
from unimage_jax.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=240)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout


def test_train_tokenizer_cli(tmp_path):
  root = data_fixtures.built_dir()
  out = _run("tools/train_tokenizer.py", f"--data_dir={root}/data", f"--output={tmp_path}/tok/spm.model",
             "--vocab_size=600")
  assert "trained on" in out and "pieces" in out
  tok = Tokenizer(f"{tmp_path}/tok/spm.model", max_vocab_size=600)
  assert tok.encode("<Character2>") == [tok.special_ids["<Character2>"]]


def test_bench_cli_prints_rates():
  root = data_fixtures.built_dir()
  out = _run("tools/bench_data.py", f"--config.data.data_dir={root}/data",
             f"--config.data.tokenizer_path={root}/tokenizer/spm.model", "--config.data.num_stories=120",
             "--num_batches=2", "--workers=0", "--tasks=default", "--unpacked=false")
  row = next(line for line in out.splitlines() if line.startswith("| default | first-fit | 0 |"))
  rows_per_s, efficiency = float(row.split("|")[4]), float(row.split("|")[7])
  assert rows_per_s > 0 and 0.5 < efficiency <= 1.0
  assert "of planned und+gen tokens reach a row" in out
