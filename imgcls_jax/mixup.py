"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on the device, inside the jitted train step.

Each example ``i`` is mixed with its partner ``B - 1 - i`` of the global batch (the batch reversed,
as timm does): mixup blends the two images, cutmix pastes a box of the partner. The targets are
mixed by the same weight ``lam`` (for cutmix: the fraction of pixels kept after clipping the box).
``mode='batch'`` draws one ``lam`` (and one box) for the whole batch, ``mode='example'`` one per
example. With both alphas set, each batch (or example) uses cutmix with probability
``switch_prob``, else mixup; with probability ``1 - prob`` it is left unmixed.

Pure JAX, no I/O: ``apply(key, x, y, cfg)`` is called by ``steps.train_step``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from imgcls_jax.errors import UserError

MODES = ('batch', 'example')


@dataclasses.dataclass(frozen=True)
class MixConfig:
  """Mixing hyper-parameters (hashable: part of the jitted step's static configuration)."""
  mixup_alpha: float = 0.0      # Beta(alpha, alpha) for mixup's lam; 0 disables mixup
  cutmix_alpha: float = 0.0     # Beta(alpha, alpha) for cutmix's box area; 0 disables cutmix
  prob: float = 1.0             # probability that a batch (or example) is mixed at all
  switch_prob: float = 0.5      # with both alphas > 0: probability of cutmix instead of mixup
  mode: str = 'batch'           # 'batch': one lam per batch; 'example': one lam per example

  @property
  def enabled(self) -> bool:
    return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0


def from_config(mix: ml_collections.ConfigDict | None) -> MixConfig | None:
  """``config.mixup`` -> MixConfig, or None when mixing is off (or the key is absent)."""
  if mix is None:
    return None
  cfg = MixConfig(mixup_alpha=float(mix.get('mixup_alpha', 0.0)),
                  cutmix_alpha=float(mix.get('cutmix_alpha', 0.0)),
                  prob=float(mix.get('prob', 1.0)), switch_prob=float(mix.get('switch_prob', 0.5)),
                  mode=str(mix.get('mode', 'batch')))
  if cfg.mode not in MODES:
    raise UserError(f"config.mixup.mode must be one of {', '.join(MODES)}, got '{cfg.mode}'.")
  if cfg.mixup_alpha < 0 or cfg.cutmix_alpha < 0:
    raise UserError('config.mixup.mixup_alpha and config.mixup.cutmix_alpha must be >= 0.')
  if not (0.0 <= cfg.prob <= 1.0 and 0.0 <= cfg.switch_prob <= 1.0):
    raise UserError('config.mixup.prob and config.mixup.switch_prob must be in [0, 1].')
  return cfg if cfg.enabled else None


def _beta(key: jax.Array, alpha: float, shape: tuple[int, ...]) -> jax.Array:
  if alpha <= 0:
    return jnp.ones(shape, jnp.float32)
  return jax.random.beta(key, alpha, alpha, shape, jnp.float32)


def _boxes(key: jax.Array, lam_N: jax.Array, height: int, width: int) -> jax.Array:
  """CutMix boxes covering ``1 - lam`` of the image, centred uniformly, clipped to it.

  Returns the pasted-region masks ``mask_NxHxW`` (True inside the box).
  """
  cut = jnp.sqrt(1.0 - lam_N)
  ky, kx = jax.random.split(key)
  cy = jax.random.uniform(ky, lam_N.shape) * height
  cx = jax.random.uniform(kx, lam_N.shape) * width
  half_h, half_w = cut * height / 2.0, cut * width / 2.0
  y0 = jnp.clip(jnp.round(cy - half_h), 0, height)[:, None, None]
  y1 = jnp.clip(jnp.round(cy + half_h), 0, height)[:, None, None]
  x0 = jnp.clip(jnp.round(cx - half_w), 0, width)[:, None, None]
  x1 = jnp.clip(jnp.round(cx + half_w), 0, width)[:, None, None]
  rows = jnp.arange(height, dtype=jnp.float32)[None, :, None]
  cols = jnp.arange(width, dtype=jnp.float32)[None, None, :]
  return (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)


def apply(key: jax.Array, x_BxHxWxC: jax.Array, y_BxK: jax.Array, cfg: MixConfig,
          valid_B: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Mixed images (same dtype) and mixed soft targets ``y_BxK`` (f32). ``valid_B``: the rows that
  hold an image (an image folder's undecodable file leaves a blank row, masked out of the loss):
  a row whose partner is not one stays as it is."""
  batch, height, width = x_BxHxWxC.shape[:3]
  n = batch if cfg.mode == 'example' else 1
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(key, 5)
  mixed = jax.random.uniform(k_apply, (n,)) < cfg.prob
  if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
    use_cut = jax.random.uniform(k_switch, (n,)) < cfg.switch_prob
  else:
    use_cut = jnp.full((n,), cfg.cutmix_alpha > 0)
  lam_mix = _beta(k_mix, cfg.mixup_alpha, (n,))
  lam_box = _beta(k_cut, cfg.cutmix_alpha, (n,))
  box_N = _boxes(k_box, lam_box, height, width) & (use_cut & mixed)[:, None, None]
  # CutMix's lam is the fraction of pixels really kept (the box may be clipped).
  lam_cut = 1.0 - jnp.mean(box_N.astype(jnp.float32), axis=(1, 2))
  lam = jnp.where(mixed, jnp.where(use_cut, lam_cut, lam_mix), 1.0)
  lam_blend = jnp.where(mixed & ~use_cut, lam_mix, 1.0)

  if cfg.mode == 'batch':  # broadcast the single draw over the batch
    lam, lam_blend = jnp.broadcast_to(lam, (batch,)), jnp.broadcast_to(lam_blend, (batch,))
    box_N = jnp.broadcast_to(box_N, (batch, height, width))
  if valid_B is not None:   # a blank partner's pixels and label would be mixed in
    partner_valid = jnp.flip(valid_B.astype(bool), 0)
    lam, lam_blend = jnp.where(partner_valid, lam, 1.0), jnp.where(partner_valid, lam_blend, 1.0)
    box_N = box_N & partner_valid[:, None, None]
  partner_x, partner_y = jnp.flip(x_BxHxWxC, 0), jnp.flip(y_BxK, 0)
  x = x_BxHxWxC.astype(jnp.float32)
  px = partner_x.astype(jnp.float32)
  blend = lam_blend[:, None, None, None]
  x = blend * x + (1.0 - blend) * px
  x = jnp.where(box_N[..., None], px, x)
  y = lam[:, None] * y_BxK + (1.0 - lam[:, None]) * partner_y
  return x.astype(x_BxHxWxC.dtype), y
