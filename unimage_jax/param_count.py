"""Abstract parameter counts per component (``eval_shape``: nothing is allocated)."""

from __future__ import annotations

import math

import jax
import ml_collections

from unimage_jax.model import functional


def _size(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def breakdown(model_cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """Parameter count per component of the BAGEL layout, plus totals."""
  params, tables = functional.abstract_params(model_cfg)
  layers = params["decoder"]["layers"]
  rows = {
      "embed_tokens": _size(params["embed_tokens"]),
      "lm_head": _size(params["lm_head"]),
      "decoder.und (all layers)": _size(layers["und"]),
      "decoder.gen (all layers)": _size(layers["gen"]),
      "decoder final norms": _size(params["decoder"]["norm"]) + _size(params["decoder"]["norm_moe_gen"]),
      "vae2llm + llm2vae": _size(params["vae2llm"]) + _size(params["llm2vae"]),
      "time_embedder": _size(params["time_embedder"]),
      "connector": _size(params.get("connector", {})),
      "vit_model": _size(params.get("vit_model", {})),
  }
  rows["total trainable"] = _size(params)
  rows["fixed sin-cos tables (not trained)"] = _size(tables)
  rows["total with fixed tables"] = rows["total trainable"] + rows["fixed sin-cos tables (not trained)"]
  rows["LLM active per token (embed + one expert + norm + lm_head)"] = (
      rows["embed_tokens"] + rows["decoder.und (all layers)"] + rows["decoder final norms"] // 2 + rows["lm_head"])
  return rows


def format_table(rows: dict[str, int]) -> str:
  width = max(len(k) for k in rows)
  lines = [f"| {'component'.ljust(width)} | {'parameters':>15} | {'billions':>8} |",
           f"|{'-' * (width + 2)}|{'-' * 17}|{'-' * 10}|"]
  for name, n in rows.items():
    lines.append(f"| {name.ljust(width)} | {n:>15,} | {n / 1e9:>8.3f} |")
  return "\n".join(lines)
