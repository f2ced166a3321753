"""KV-cache decoding benchmark: per-token decode time vs context length, against full recomputation.

  python tools/bench_decode.py --config=configs/tiny.py --contexts=64,256,1024 --capacity=2048
Cached decoding attends over the static cache (capacity slots), so its per-token time should not
grow with the filled context; uncached decoding re-runs the whole sequence for every token.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from unimage_jax import layout
from unimage_jax.inference.engine import Engine, SamplingParams
from unimage_jax.model import functional
from unimage_jax.model.unimage import latent_token_dim

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Model config.")
_CONTEXTS = flags.DEFINE_list("contexts", ["64", "256", "1024"], "Context lengths (text tokens).")
_CAPACITY = flags.DEFINE_integer("capacity", 2048, "KV-cache capacity.")
_NEW = flags.DEFINE_integer("new_tokens", 32, "Tokens decoded per measurement.")


def main(argv):
  del argv
  cfg = _CONFIG.value.model
  params, tables = functional.init_params(cfg, 0)
  mdef = functional.model_def(cfg)
  engine = Engine(mdef, params, tables, cfg)
  rng = np.random.default_rng(0)
  model = mdef.bind(params, tables)

  @jax.jit
  def full_forward(batch):
    hidden, _ = model(batch, batch["gen_latents"], jnp.zeros(batch["gen_latent_pos"].shape))
    return model.logits(hidden[:, -1])

  rows = []
  for n in map(int, _CONTEXTS.value):
    ids = rng.integers(5, cfg.vocab_size, n).astype(np.int32)
    cache, logits = engine.prefill(engine.new_cache(1, _CAPACITY.value), [[layout.TextSegment(ids)]])
    gen = lambda: engine.generate(cache, logits, jax.random.key(0), max_new=_NEW.value, stop_ids=[-1],
                                  sampling=SamplingParams(temperature=0.0))[1]
    jax.block_until_ready(gen())
    t = time.perf_counter()
    for _ in range(3):
      jax.block_until_ready(gen())
    cached = (time.perf_counter() - t) / (3 * _NEW.value)
    sizes = layout.BufferSizes(n + 1, 1, 1, 2)
    row = layout.pack_row([[layout.TextSegment(np.append(ids, 7))]], sizes, latent_token_dim(cfg),
                          cfg.max_latent_grid, cfg.vit.patch_size**2 * 3)
    batch = {k: jnp.asarray(v[None]) for k, v in row.items()}
    jax.block_until_ready(full_forward(batch))
    t = time.perf_counter()
    for _ in range(3):
      jax.block_until_ready(full_forward(batch))
    uncached = (time.perf_counter() - t) / 3
    rows.append((n, cached, uncached))
  base = rows[0][1]
  print(f"| context | cached ms/token | vs first context | uncached ms/token | uncached / cached |")
  print("|---|---|---|---|---|")
  for n, c, u in rows:
    print(f"| {n} | {c * 1e3:.2f} | {c / base:.2f}x | {u * 1e3:.2f} | {u / c:.1f}x |")
  print(f"(device: {jax.devices()[0].device_kind}, capacity {_CAPACITY.value}, {_NEW.value} tokens per measurement)")


if __name__ == "__main__":
  from unimage_jax import cli
  cli.run(main)  # the project's own errors as one line, exit code 2
