"""Knowledge distillation (Hinton, Vinyals and Dean, 2015), the pure half: the teacher's forward
pass inside the train step and the loss term that pulls the student towards it.

A trained run (the teacher, ``config.distill.teacher``) sees the very images the student trains
on in each step, after the device augmentation and mixup, in inference mode (running BatchNorm
statistics, no dropout, no gradient). The student's per-example loss becomes

  (1 - w) * loss(student, labels) + w * T^2 * KL(teacher_T || student_T)

with ``_T`` the softmax of logits / T (multi-label: each tag's sigmoid of logits / T, the
binary KL averaged over tags, as the tags' cross-entropy is). T^2 keeps the term's gradient on
the scale of the label loss's for any T. Several teachers (an ensemble) give the mean of their
probabilities at T. Loading and checking the teachers: ``teacher.py``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class View:
  """How one teacher sees the student's batch (hashable: part of the jitted step's config)."""
  # The teacher's own normalisation of the student's pixels: teacher input = x * scale + shift,
  # per channel (both () when the two runs normalise alike).
  scale: tuple[float, ...] = ()
  shift: tuple[float, ...] = ()
  compute_dtype: str = 'float32'    # the teacher's dtype
  # The teacher's input height and width: a batch of another size (the student's training
  # images, whatever its train_preprocess makes) is resized to them (bilinear, antialiased)
  # before the teacher sees it. () = any size (unknown).
  input_hw: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """The static numbers of the distillation term (hashable: part of the jitted step's config)."""
  weight: float                     # w: the share of the teacher term in the loss, in (0, 1]
  temperature: float               # T > 0
  views: tuple[View, ...] = (View(),)   # one per teacher; several: their mean probabilities


def renormalization(student_mean: tuple[float, ...], student_std: tuple[float, ...],
                    teacher_mean: tuple[float, ...], teacher_std: tuple[float, ...]
                    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(scale, shift) taking ``(u - m_s) / s_s`` to ``(u - m_t) / s_t`` for pixels u in [0, 1]:
  scale = s_s / s_t, shift = (m_s - m_t) / s_t, per channel (one value each when all are one);
  ((), ()) when the two normalisations are equal."""
  n = max(len(student_mean), len(student_std), len(teacher_mean), len(teacher_std))
  def per_channel(v):
    return tuple(float(v[0]) for _ in range(n)) if len(v) == 1 else tuple(float(x) for x in v)
  ms, ss, mt, st = (per_channel(v) for v in (student_mean, student_std, teacher_mean,
                                             teacher_std))
  if ms == mt and ss == st:
    return (), ()
  return (tuple(a / b for a, b in zip(ss, st)),
          tuple((a - c) / b for a, c, b in zip(ms, mt, st)))


def _logits(teacher_def: Any, teacher: Any, x_BxHxWxC: jax.Array, view: View) -> jax.Array:
  """One teacher's float32 logits ``BxK`` of the student's normalised images (inference mode)."""
  x = x_BxHxWxC
  if view.scale:
    x = (x.astype(jnp.float32) * jnp.asarray(view.scale, jnp.float32)
         + jnp.asarray(view.shift, jnp.float32))
  b, h, w, c = x.shape   # static: a resize is part of the compiled step only where needed
  if view.input_hw and (h, w) != tuple(view.input_hw):   # after the affine map: they commute
    x = jax.image.resize(x.astype(jnp.float32), (b, *view.input_hw, c), 'bilinear')
  model = teacher_def.merge(teacher.params, teacher.batch_stats)
  return model(x.astype(view.compute_dtype), train=False).astype(jnp.float32)


def soften(logits_BxK: jax.Array, temperature: float, multilabel: bool = False) -> jax.Array:
  """Probabilities at temperature T: ``softmax(logits / T)``, or each tag's ``sigmoid(logits /
  T)``."""
  z = logits_BxK.astype(jnp.float32) / jnp.float32(temperature)
  return jax.nn.sigmoid(z) if multilabel else jax.nn.softmax(z, axis=-1)


def teacher_probabilities(teacher_defs: tuple[Any, ...], teachers: tuple[Any, ...],
                          x_BxHxWxC: jax.Array, cfg: DistillConfig,
                          multilabel: bool = False) -> jax.Array:
  """The teachers' mean probabilities ``BxK`` at temperature T (``soften``) of the student's
  normalised images ``x``, each teacher in inference mode on its own view of them (``View``);
  gradient stopped."""
  probs = [soften(_logits(d, t, x_BxHxWxC, v), cfg.temperature, multilabel)
           for d, t, v in zip(teacher_defs, teachers, cfg.views)]
  return jax.lax.stop_gradient(sum(probs[1:], probs[0]) / len(probs))


def divergence(student_logits_BxK: jax.Array, teacher_probs_BxK: jax.Array,
               temperature: float, multilabel: bool = False) -> jax.Array:
  """Per-example ``T^2 * KL(p || student_T)`` (``loss_B``, float32) for the teachers'
  probabilities ``p`` at temperature T: over the classes' softmax, or for multi-label the mean
  over tags of the binary KL of the sigmoids."""
  t = jnp.float32(temperature)
  s = student_logits_BxK.astype(jnp.float32) / t
  p = teacher_probs_BxK.astype(jnp.float32)
  xlogy = jax.scipy.special.xlogy
  if multilabel:
    kl = (xlogy(p, p) + xlogy(1.0 - p, 1.0 - p)
          - p * jax.nn.log_sigmoid(s) - (1.0 - p) * jax.nn.log_sigmoid(-s))
    return t * t * kl.mean(axis=-1)
  return t * t * jnp.sum(xlogy(p, p) - p * jax.nn.log_softmax(s, axis=-1), axis=-1)


def blend(loss_B: jax.Array, student_logits_BxK: jax.Array, teacher_probs_BxK: jax.Array,
          cfg: DistillConfig, multilabel: bool) -> jax.Array:
  """``(1 - w) * loss_B + w * divergence``: the student's per-example loss with the teachers'
  term."""
  kd = divergence(student_logits_BxK, teacher_probs_BxK, cfg.temperature, multilabel)
  return (1.0 - cfg.weight) * loss_B + cfg.weight * kd
