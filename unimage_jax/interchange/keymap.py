"""Declarative map between our parameter tree and BAGEL's PyTorch state-dict keys.

One rule per tensor kind; ``{layer}`` expands over stacked layers, ``{moe}`` over the two experts
(``""`` for und, ``"_moe_gen"`` for gen, placed where BAGEL puts the suffix). Transforms:

* ``linear``: ours ``[*in, *out]`` (e.g. q_proj ``[E, H, D]``) <-> torch ``[prod(out), prod(in)]``
* ``same``:   identical layout (norm weights, embeddings, flattened biases via reshape)

Export walks the rules and yields one tensor at a time (stacked layers are sliced, never copied
whole), so peak host memory stays near the largest tensor. Import reports every missing,
unexpected and wrong-shape key in one error.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from unimage_jax.errors import UserError

EXPERTS = {"und": "", "gen": "_moe_gen"}


@dataclasses.dataclass(frozen=True)
class Rule:
  torch: str  # torch key template: may contain {layer} and {moe}
  ours: tuple[str, ...]  # path in our pure-dict tree: may contain "{expert}"
  transform: str  # "linear" | "same"
  stack: str | None = None  # "decoder" | "vit": our leading axis is the layer index


def _llm_rules() -> list[Rule]:
  pre = "language_model.model.layers.{layer}."
  stack = ("decoder", "layers", "{expert}")
  rules = []
  for proj in ("q_proj", "k_proj", "v_proj"):
    rules.append(Rule(pre + f"self_attn.{proj}{{moe}}.weight", (*stack, "self_attn", proj, "kernel"), "linear", "decoder"))
    rules.append(Rule(pre + f"self_attn.{proj}{{moe}}.bias", (*stack, "self_attn", proj, "bias"), "same", "decoder"))
  rules.append(Rule(pre + "self_attn.o_proj{moe}.weight", (*stack, "self_attn", "o_proj", "kernel"), "linear", "decoder"))
  for norm in ("q_norm", "k_norm"):
    rules.append(Rule(pre + f"self_attn.{norm}{{moe}}.weight", (*stack, "self_attn", norm, "weight"), "same", "decoder"))
  for proj in ("gate_proj", "up_proj", "down_proj"):
    rules.append(Rule(pre + f"mlp{{moe}}.{proj}.weight", (*stack, "mlp", proj, "kernel"), "linear", "decoder"))
  for norm in ("input_layernorm", "post_attention_layernorm"):
    rules.append(Rule(pre + f"{norm}{{moe}}.weight", (*stack, norm, "weight"), "same", "decoder"))
  rules += [
      Rule("language_model.model.embed_tokens.weight", ("embed_tokens",), "same"),
      Rule("language_model.model.norm.weight", ("decoder", "norm", "weight"), "same"),
      Rule("language_model.model.norm_moe_gen.weight", ("decoder", "norm_moe_gen", "weight"), "same"),
      Rule("language_model.lm_head.weight", ("lm_head", "kernel"), "linear"),
  ]
  return rules


def _image_rules() -> list[Rule]:
  rules = []
  for name in ("vae2llm", "llm2vae", "connector.fc1", "connector.fc2", "time_embedder.mlp.0", "time_embedder.mlp.2"):
    path = tuple(name.replace("mlp.", "mlp_").split("."))
    rules.append(Rule(f"{name}.weight", (*path, "kernel"), "linear"))
    rules.append(Rule(f"{name}.bias", (*path, "bias"), "same"))
  return rules


def _vit_rules() -> list[Rule]:
  pre = "vit_model.vision_model."
  lp = pre + "encoder.layers.{layer}."
  stack = ("vit_model", "layers")
  rules = [
      Rule(pre + "embeddings.patch_embedding.weight", ("vit_model", "patch_embedding", "kernel"), "linear"),
      Rule(pre + "embeddings.patch_embedding.bias", ("vit_model", "patch_embedding", "bias"), "same"),
      Rule(pre + "embeddings.position_embedding.weight", ("vit_model", "position_embedding"), "same"),
      Rule(pre + "post_layernorm.weight", ("vit_model", "post_layernorm", "scale"), "same"),
      Rule(pre + "post_layernorm.bias", ("vit_model", "post_layernorm", "bias"), "same"),
  ]
  for ln in ("layer_norm1", "layer_norm2"):
    rules.append(Rule(lp + f"{ln}.weight", (*stack, ln, "scale"), "same", "vit"))
    rules.append(Rule(lp + f"{ln}.bias", (*stack, ln, "bias"), "same", "vit"))
  for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
    rules.append(Rule(lp + f"self_attn.{proj}.weight", (*stack, "self_attn", proj, "kernel"), "linear", "vit"))
    rules.append(Rule(lp + f"self_attn.{proj}.bias", (*stack, "self_attn", proj, "bias"), "same", "vit"))
  for fc in ("fc1", "fc2"):
    rules.append(Rule(lp + f"mlp.{fc}.weight", (*stack, fc, "kernel"), "linear", "vit"))
    rules.append(Rule(lp + f"mlp.{fc}.bias", (*stack, fc, "bias"), "same", "vit"))
  return rules


TABLE_RULES = [
    Rule("latent_pos_embed.pos_embed", ("latent_pos_embed",), "same"),
    Rule("vit_pos_embed.pos_embed", ("vit_pos_embed",), "same"),
]


def param_rules(model_cfg) -> list[Rule]:
  rules = _llm_rules() + _image_rules()
  if not model_cfg.qk_norm:
    rules = [r for r in rules if "q_norm" not in r.torch and "k_norm" not in r.torch]
  if model_cfg.vit.enabled:
    rules += _vit_rules()
  else:
    rules = [r for r in rules if not r.torch.startswith("connector.")]
  return rules


def table_rules(model_cfg) -> list[Rule]:
  return TABLE_RULES if model_cfg.vit.enabled else TABLE_RULES[:1]


def _layer_count(model_cfg, stack: str | None) -> int:
  return {None: 1, "decoder": model_cfg.num_layers, "vit": model_cfg.vit.num_layers}[stack]


def expand(rule: Rule, model_cfg) -> Iterator[tuple[str, tuple[str, ...], int | None]]:
  """(torch key, our path, layer index or None) for every tensor a rule covers."""
  experts = EXPERTS.items() if "{expert}" in rule.ours else [(None, "")]
  for expert, moe in experts:
    path = tuple(expert if p == "{expert}" else p for p in rule.ours)
    for layer in range(_layer_count(model_cfg, rule.stack)):
      key = rule.torch.format(layer=layer, moe=moe)
      yield key, path, (layer if rule.stack else None)


def get_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def linear_in_dims(path: tuple[str, ...]) -> int:
  """How many leading dims of a linear kernel are inputs (o_proj/out_proj take ``[H, D]``)."""
  return 2 if path[-2] in ("o_proj", "out_proj") else 1


def torch_shape(our_shape: tuple[int, ...], transform: str, path: tuple[str, ...]) -> tuple[int, ...]:
  """The torch tensor shape of one of our arrays (per layer for stacked ones)."""
  if transform == "linear":
    n_in = linear_in_dims(path)
    return (math.prod(our_shape[n_in:]), math.prod(our_shape[:n_in]))
  if path[-1] == "bias":
    return (math.prod(our_shape),)
  return tuple(our_shape)


def to_torch_layout(x: np.ndarray, transform: str, path: tuple[str, ...]) -> np.ndarray:
  """Our array -> torch layout (linear kernels as ``[out, in]``, biases flattened)."""
  if transform == "linear":
    return np.ascontiguousarray(x.reshape(math.prod(x.shape[:linear_in_dims(path)]), -1).T)
  return x.reshape(torch_shape(x.shape, transform, path))


def from_torch_layout(t: np.ndarray, transform: str, our_shape: tuple[int, ...], path: tuple[str, ...]) -> np.ndarray:
  """Torch tensor -> our layout of ``our_shape`` (inverse of :func:`to_torch_layout`)."""
  return (t.T if transform == "linear" else t).reshape(our_shape)


def export_tensors(params, tables, model_cfg) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (BAGEL key, numpy tensor in torch layout), one tensor at a time."""
  for rules, tree in ((param_rules(model_cfg), params), (table_rules(model_cfg), tables)):
    for rule in rules:
      for key, path, layer in expand(rule, model_cfg):
        x = get_path(tree, path)
        x = np.asarray(x[layer] if layer is not None else x)
        yield key, to_torch_layout(x, rule.transform, path)


class KeyMismatchError(UserError, KeyError):
  """Missing, unexpected or wrong-shape tensors, all listed."""

  def __str__(self):
    return self.args[0]


def import_tensors(
    get: Callable[[str], np.ndarray],
    available: set[str],
    abstract_params,
    abstract_tables,
    model_cfg,
    *,
    allow_unexpected: bool = False,
):
  """Builds (params, tables) numpy trees from torch-layout tensors fetched lazily by key.

  ``abstract_*`` give our shapes/dtypes (ShapeDtypeStruct trees). Every problem is collected and
  raised together as KeyMismatchError.
  """
  import jax

  missing, wrong, used = [], [], set()
  out = []
  for rules, abstract in ((param_rules(model_cfg), abstract_params), (table_rules(model_cfg), abstract_tables)):
    tree = jax.tree.map(lambda s: None, abstract)
    pending: dict[tuple[str, ...], list] = {}
    for rule in rules:
      for key, path, layer in expand(rule, model_cfg):
        target = get_path(abstract, path)
        shape = tuple(target.shape[1:]) if layer is not None else tuple(target.shape)
        if key not in available:
          missing.append(key)
          continue
        used.add(key)
        t = np.asarray(get(key))
        expected = torch_shape(shape, rule.transform, path)
        if tuple(t.shape) != expected:
          wrong.append(f"{key}: checkpoint has {tuple(t.shape)}, model expects {expected}")
          continue
        value = from_torch_layout(t, rule.transform, shape, path).astype(target.dtype)
        if layer is None:
          _set_path(tree, path, value)
        else:
          pending.setdefault(path, [None] * target.shape[0])[layer] = value
    for path, slices in pending.items():
      if all(s is not None for s in slices):
        _set_path(tree, path, np.stack(slices))
    out.append(tree)
  unexpected = sorted(available - used)
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing: " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
  if unexpected and not allow_unexpected:
    problems.append(f"{len(unexpected)} unexpected: " + ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else ""))
  if wrong:
    problems.append(f"{len(wrong)} with wrong shape: " + "; ".join(wrong[:20]))
  if problems:
    raise KeyMismatchError("checkpoint does not match the model:\n  " + "\n  ".join(problems))
  return out[0], out[1]


def _set_path(tree, path, value) -> None:
  for p in path[:-1]:
    tree = tree[p]
  tree[path[-1]] = value


def llm_to_bagel_state(llm_state: Mapping[str, np.ndarray], model_cfg) -> dict[str, np.ndarray]:
  """A Qwen2/Qwen3 HF LLM state dict -> BAGEL language-model keys, und expert copied into gen.

  Derived from the rules themselves: the und key of each ``{moe}`` rule (suffix ``""``) also
  feeds its ``_moe_gen`` twin, exactly how BAGEL initialises the generation expert.
  """
  out = {}
  for rule in _llm_rules():
    if not model_cfg.qk_norm and ("q_norm" in rule.torch or "k_norm" in rule.torch):
      continue
    for layer in range(_layer_count(model_cfg, rule.stack)):
      und_key = rule.torch.format(layer=layer, moe="")
      hf_key = und_key.removeprefix("language_model.")
      if hf_key not in llm_state:
        continue
      out[und_key] = llm_state[hf_key]
      if "{moe}" in rule.torch:
        out[rule.torch.format(layer=layer, moe="_moe_gen")] = llm_state[hf_key]
  if "model.norm.weight" in llm_state:
    out["language_model.model.norm_moe_gen.weight"] = llm_state["model.norm.weight"]
  return out


@dataclasses.dataclass(frozen=True)
class PlanEntry:
  """One exported tensor: where it comes from in our trees and its torch-layout shape."""

  key: str
  tree: str  # "params" | "tables"
  path: tuple[str, ...]
  layer: int | None
  transform: str
  shape: tuple[int, ...]  # torch layout, per layer for stacked arrays
  dtype: Any  # our dtype


def export_plan(abstract_params, abstract_tables, model_cfg) -> list[PlanEntry]:
  """Every tensor :func:`export_tensors` yields, in the same order, from shapes alone.

  Why: a streaming safetensors writer must know every shard's header (keys, shapes, dtypes) before
  it writes the first byte of data; this gives it without touching any array.
  """
  plan = []
  for name, rules, tree in (("params", param_rules(model_cfg), abstract_params),
                            ("tables", table_rules(model_cfg), abstract_tables)):
    for rule in rules:
      for key, path, layer in expand(rule, model_cfg):
        target = get_path(tree, path)
        shape = tuple(target.shape[1:]) if layer is not None else tuple(target.shape)
        plan.append(PlanEntry(key, name, path, layer, rule.transform,
                              torch_shape(shape, rule.transform, path), target.dtype))
  return plan


def export_one(entry: PlanEntry, params, tables, *, contiguous: bool = True) -> np.ndarray:
  """The torch-layout tensor of one plan entry (slices a stacked array, never copies it whole).

  ``contiguous=False`` returns linear kernels as a transposed *view*: a streaming writer can then
  copy it out in small row blocks, so no second full-size tensor is ever allocated.
  """
  x = get_path(params if entry.tree == "params" else tables, entry.path)
  x = np.asarray(x[entry.layer] if entry.layer is not None else x)
  if entry.transform == "linear" and not contiguous:
    return x.reshape(math.prod(x.shape[:linear_in_dims(entry.path)]), -1).T  # [out, in] view
  return to_torch_layout(x, entry.transform, entry.path)
