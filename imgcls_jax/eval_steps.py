"""The pure inference steps: the one forward pass (running BatchNorm statistics, no dropout, the
run's temperature) and what evaluation, prediction, export and serving compute from it: evaluation
sums, per-example outcomes, out-of-distribution scores, probabilities. No I/O, no globals, no
device logic; ``run.py``, ``outcomes.py``, ``held_out_fits.py`` and ``inference.py`` jit them with
explicit shardings.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from imgcls_jax import device_augment, multilabel, report, steps, temperature
from imgcls_jax.state import ModelDef


def forward(params: Any, batch_stats: Any, images_BxHxWxC: jax.Array, *, model_def: ModelDef,
            cfg: steps.StepConfig) -> jax.Array:
  """The one inference forward pass: uint8 images -> ``logits_BxK`` (running BN statistics, no
  dropout), divided by ``cfg.temperature`` when the run fitted one (then in float32).
  Evaluation, prediction, export and serving all run it."""
  model = model_def.merge(params, batch_stats)
  logits = model(steps.normalize(images_BxHxWxC, cfg), train=False)
  if cfg.temperature != 1.0:
    logits = logits.astype(jnp.float32) / jnp.float32(cfg.temperature)
  return logits


def temperature_sums(variables: Any, batch: dict[str, jax.Array], *, model_def: ModelDef,
                     cfg: steps.StepConfig) -> dict[str, jax.Array]:
  """``temperature.nll_sums`` of the model's own logits (no temperature, no test-time
  augmentation: the forward pass prediction, serving and export run) over a padded batch."""
  cfg = dataclasses.replace(cfg, temperature=1.0)
  logits = forward(variables.params, variables.batch_stats, batch['image'], model_def=model_def,
                   cfg=cfg)
  return temperature.nll_sums(logits, batch['label'], batch['mask'])


def log_probs_fn(variables: Any, images: jax.Array, *, model_def: ModelDef, cfg: steps.StepConfig,
                 tta: str = '') -> jax.Array:
  """Inference log-probabilities ``BxK`` of ``variables`` (anything with ``params`` and
  ``batch_stats``: a TrainState or an InferenceState); with ``tta='flip'`` the mean of the
  probabilities of the images and of their horizontal mirror images, with ``'flip_translate'``
  their weighted mean over the mirror and one-pixel shifts (``device_augment.tta_views``)."""
  def log_softmax(x):
    logits = forward(variables.params, variables.batch_stats, x, model_def=model_def, cfg=cfg)
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

  if tta == 'flip_translate':
    return device_augment.mean_log_probs(log_softmax, images, tta)
  log_probs = log_softmax(images)
  if tta == 'flip':
    log_probs = jnp.logaddexp(log_probs, log_softmax(images[:, :, ::-1, :])) - jnp.log(2.0)
  return log_probs


def eval_step(variables: Any, batch: dict[str, jax.Array], *, model_def: ModelDef,
              cfg: steps.StepConfig, tta: str = '',
              num_bins: int = report.DEFAULT_CALIBRATION_BINS) -> dict[str, jax.Array]:
  """Masked sums over a padded batch: loss, top-1 and top-5 correct, example count, and the
  confusion-matrix and calibration sums of the evaluation report (``report.eval_sums``), of the
  predictions ``log_probs_fn`` makes with test-time augmentation ``tta``."""
  if cfg.multilabel:
    return multilabel_eval_sums(variables, batch, model_def=model_def, cfg=cfg, tta=tta,
                                num_bins=num_bins)
  log_probs = log_probs_fn(variables, batch['image'], model_def=model_def, cfg=cfg, tta=tta)
  return report.eval_sums(log_probs, batch['label'], batch['mask'], num_bins)


def logit_scores(variables: Any, images: jax.Array, *, model_def: ModelDef, cfg: steps.StepConfig,
                 tta: str = '') -> dict[str, jax.Array]:
  """Out-of-distribution scores per row (float32 B, higher = more like the training classes),
  each the weighted mean over ``device_augment.tta_views`` of one view's: ``logsumexp``, the
  log-sum-exp of the logits (minus the energy score, Liu et al., 2020), and ``max_logit``
  (Hendrycks et al., 2022); of ``forward``'s logits, so after the run's temperature."""
  lse, top = 0.0, 0.0
  for w, x in device_augment.tta_views(images, tta):
    logits = forward(variables.params, variables.batch_stats, x, model_def=model_def,
                     cfg=cfg).astype(jnp.float32)
    lse = lse + w * jax.nn.logsumexp(logits, axis=-1)
    top = top + w * jnp.max(logits, axis=-1)
  return {'logsumexp': lse, 'max_logit': top}


def example_outcomes(variables: Any, batch: dict[str, jax.Array], *, model_def: ModelDef,
                     cfg: steps.StepConfig, tta: str = '', num_bins: int | None = None,
                     with_probs: bool = False, with_scores: bool = False) -> Any:
  """Per row (padded rows too), exactly as ``eval_step`` scores it: the top-1 class
  (``predicted``, int32 B), its probability (``p_predicted``) and the labelled class's
  (``p_label``), float32 B; with ``with_probs``, every class's (``probs``, float32 B x K); with
  ``with_scores``, ``logit_scores``' too, and the logits prediction returns (``logits``: one view,
  no test-time augmentation). With ``num_bins``: ``(that, eval_step's sums)`` of the same
  forward pass."""
  log_probs = log_probs_fn(variables, batch['image'], model_def=model_def, cfg=cfg, tta=tta)
  normalized = jax.nn.log_softmax(log_probs.astype(jnp.float32), axis=-1)
  predicted = jnp.argmax(normalized, axis=-1)
  label = batch['label'].astype(jnp.int32)
  out = {'predicted': predicted.astype(jnp.int32),
         'p_predicted': jnp.exp(jnp.take_along_axis(normalized, predicted[:, None], -1)[:, 0]),
         'p_label': jnp.exp(jnp.take_along_axis(normalized, label[:, None], -1)[:, 0])}
  if with_probs:
    out['probs'] = jnp.exp(normalized)
  if with_scores:
    out.update(logit_scores(variables, batch['image'], model_def=model_def, cfg=cfg, tta=tta))
    out['logits'] = forward(variables.params, variables.batch_stats, batch['image'],
                            model_def=model_def, cfg=cfg).astype(jnp.float32)
  if num_bins is None:
    return out
  return out, report.eval_sums(log_probs, batch['label'], batch['mask'], num_bins)


def _multilabel_scores(variables: Any, batch: dict[str, jax.Array], *, model_def: ModelDef,
                       cfg: steps.StepConfig, tta: str = '') -> tuple[jax.Array, jax.Array]:
  """(sigmoid probabilities BxK, binary cross-entropy B) of a multi-label batch (with
  ``tta='flip'``: the probabilities' mean over the image and its mirror image)."""
  def logits_of(x):
    return forward(variables.params, variables.batch_stats, x, model_def=model_def,
                   cfg=cfg).astype(jnp.float32)

  logits = logits_of(batch['image'])
  y = batch['label'].astype(jnp.float32)
  if tta == 'flip':
    probs = 0.5 * (tanh_sigmoid(logits) + tanh_sigmoid(logits_of(batch['image'][:, :, ::-1])))
    p = jnp.clip(probs, 1e-7, 1 - 1e-7)
    return probs, -(y * jnp.log(p) + (1 - y) * jnp.log1p(-p)).mean(-1)
  return tanh_sigmoid(logits), steps.sigmoid_cross_entropy(logits, y)


def _multilabel_sums(probs_BxK: jax.Array, loss_B: jax.Array, batch: dict[str, jax.Array],
                     cfg: steps.StepConfig, num_bins: int) -> dict[str, jax.Array]:
  mask = batch['mask']
  thresholds = jnp.asarray(cfg.thresholds if cfg.thresholds is not None
                           else (0.5,) * cfg.num_classes, jnp.float32)
  return {'loss': jnp.sum(loss_B * mask.astype(jnp.float32)),
          'count': jnp.sum(mask.astype(jnp.int32)),
          **multilabel.sums(probs_BxK, batch['label'].astype(jnp.float32), mask, thresholds,
                            calibration_bins=num_bins)}


def multilabel_eval_sums(variables: Any, batch: dict[str, jax.Array], *, model_def: ModelDef,
                         cfg: steps.StepConfig, tta: str = '',
                         num_bins: int = report.DEFAULT_CALIBRATION_BINS) -> dict[str, jax.Array]:
  """Multi-label masked sums: binary cross-entropy, count, and ``multilabel.sums`` (per-class
  score histograms, exact matches at 0.5 and at ``cfg.thresholds``, ``num_bins`` calibration
  bins) of the sigmoid probabilities (with ``tta='flip'``: their mean over the image and its
  mirror image)."""
  probs, loss_B = _multilabel_scores(variables, batch, model_def=model_def, cfg=cfg, tta=tta)
  return _multilabel_sums(probs, loss_B, batch, cfg, num_bins)


def multilabel_outcomes(variables: Any, batch: dict[str, jax.Array], *, model_def: ModelDef,
                        cfg: steps.StepConfig, tta: str = '', num_bins: int | None = None) -> Any:
  """Per row (padded rows too), exactly as ``multilabel_eval_sums`` scores it: every class's
  probability (``probs``, float32 BxK). With ``num_bins``: ``(that, multilabel_eval_sums's
  sums)`` of the same forward pass."""
  probs, loss_B = _multilabel_scores(variables, batch, model_def=model_def, cfg=cfg, tta=tta)
  out = {'probs': probs}
  if num_bins is None:
    return out
  return out, _multilabel_sums(probs, loss_B, batch, cfg, num_bins)


def probabilities(variables: Any, images_BxHxWxC: jax.Array, *, model_def: ModelDef,
                  cfg: steps.StepConfig) -> dict[str, jax.Array]:
  """``{'probabilities', 'logits'}`` (BxK float32) of uint8 images: what prediction returns
  (softmax over the classes; multi-label: each class's sigmoid, as ``tanh_sigmoid``). With a
  fitted temperature the logits are already divided by it: probabilities = softmax(logits)."""
  logits = forward(variables.params, variables.batch_stats, images_BxHxWxC, model_def=model_def,
                   cfg=cfg).astype(jnp.float32)
  probs = tanh_sigmoid(logits) if cfg.multilabel else jax.nn.softmax(logits, -1)
  return {'probabilities': probs, 'logits': logits}


def tanh_sigmoid(x: jax.Array) -> jax.Array:
  """The logistic function as ``0.5 * tanh(x / 2) + 0.5`` (within 2e-7 of ``jax.nn.sigmoid``;
  0 below x ~ -17, where the sigmoid is < 4e-8), for the exported forward pass: the TFLite
  converter turns ``jax.nn.sigmoid`` into ``1 / (1 + exp(-x))``, and int8 quantisation of that
  divisor, whose range reaches exp(-min x), rounds values near 1 to its zero point (LiteRT aborts
  in its DIV kernel); TANH has an int8 kernel. Evaluation uses it too, so that its tag decisions
  are those of prediction and the exported models."""
  return 0.5 * jnp.tanh(0.5 * x) + 0.5
