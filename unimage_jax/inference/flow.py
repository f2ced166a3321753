"""Rectified-flow sampling with BAGEL's classifier-free guidance (text and image branches).

Three velocity predictions per step: conditional ``v``, text-unconditional ``v_text_uncond`` and
image-unconditional ``v_img_uncond``. Guidance (inside ``interval`` only)::

    v_text = v_text_uncond + text_scale * (v - v_text_uncond)
    v_out  = v_img_uncond + img_scale * (v_text - v_img_uncond)      (when img_scale > 1)

then renormalised so the guided velocity is never longer than the conditional one:
``global`` (one norm over the image), ``channel`` (per token over channels) or ``text_channel``
(per-token renorm of the text-guided velocity before the image branch). ``scale = clip(|v| /
|v_guided|, renorm_min, 1)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from unimage_jax.choices import RENORM_TYPES
from unimage_jax.losses import shift_timestep


@dataclasses.dataclass(frozen=True)
class GuidanceParams:
  text_scale: float = 4.0
  img_scale: float = 1.5
  interval: tuple[float, float] = (0.4, 1.0)  # guidance applies for interval[0] < t <= interval[1]
  renorm_type: str = "global"
  renorm_min: float = 0.0

  def __post_init__(self):
    if self.renorm_type not in RENORM_TYPES:
      raise ValueError(f"cfg renorm type {self.renorm_type!r} must be one of {RENORM_TYPES}")
    if self.text_scale < 0 or self.img_scale < 0:
      raise ValueError(f"guidance scales must be >= 0, got text {self.text_scale}, image {self.img_scale}")


def _renorm(reference, guided, per_channel: bool, renorm_min: float):
  axis = -1 if per_channel else None
  norm_ref = jnp.linalg.norm(reference, axis=axis, keepdims=per_channel)
  norm_guided = jnp.linalg.norm(guided, axis=axis, keepdims=per_channel)
  scale = jnp.clip(norm_ref / (norm_guided + 1e-8), renorm_min, 1.0)
  return guided * scale


def guided_velocity(v, v_text_uncond, v_img_uncond, t, p: GuidanceParams):
  """Combines the three predictions (each ``[n, Dl]``) at timestep ``t`` (a scalar array)."""
  active = (t > p.interval[0]) & (t <= p.interval[1])
  text_scale = jnp.where(active, p.text_scale, 1.0)
  img_scale = jnp.where(active, p.img_scale, 1.0)
  v_text = v_text_uncond + text_scale * (v - v_text_uncond)
  if p.renorm_type == "text_channel":
    v_text = _renorm(v, v_text, True, p.renorm_min)
    return jnp.where(img_scale > 1.0, v_img_uncond + img_scale * (v_text - v_img_uncond), v_text)
  guided = jnp.where(img_scale > 1.0, v_img_uncond + img_scale * (v_text - v_img_uncond), v_text)
  return _renorm(v, guided, p.renorm_type == "channel", p.renorm_min)


def sampling_timesteps(num_steps: int, shift: float) -> jax.Array:
  """``shift(linspace(1, 0, N))``: the N timesteps of N - 1 Euler steps, from noise to data."""
  return shift_timestep(jnp.linspace(1.0, 0.0, num_steps), shift)


def euler_sample(velocity_fn, x_init, num_steps: int, shift: float):
  """``x <- x - v(x, t_i) * (t_i - t_{i+1})`` over the shifted schedule (a fori_loop, one compile)."""
  ts = sampling_timesteps(num_steps, shift)

  def body(i, x):
    t, t_next = ts[i], ts[i + 1]
    return x - velocity_fn(x, t) * (t - t_next)

  return jax.lax.fori_loop(0, num_steps - 1, body, x_init)
