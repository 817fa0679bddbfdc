"""What a trained run fits on a held-out split (``config.evaluate.temperature_split`` /
``threshold_split``, checked by ``held_out.py``), at the end of training and by
``--mode=calibrate`` alike: the temperature (``temperature.py``), with the abstention threshold
(``selective.fit``) and the unknown-input gate (``ood.fit_gate``) fitted on the tempered logits;
and a tagging run's per-class thresholds (best F1, ``multilabel.choose_thresholds``). Each returns
the record the run's checkpoint keeps. No TensorFlow at import.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Sequence

import jax
import numpy as np

from imgcls_jax import (eval_steps, held_out, multilabel, ood, report, run, selective, sharding,
                        temperature)
from imgcls_jax.data import reader
from imgcls_jax.errors import UserError


def held_out_data(s: run.Setup, key: str) -> Any:
  """``reader.eval_data`` of the split ``config.evaluate.<key>`` a choice is fitted on
  (``temperature_split``, ``threshold_split``); an empty split is refused."""
  split = s.config.evaluate[key]
  try:
    size = reader.split_size(s.config.data, split, s.info)
  except UserError as e:
    raise UserError(held_out.for_fit_key(str(e), key, split)) from None
  if size == 0:
    raise UserError(f"config.evaluate.{key}='{split}' holds no examples; give a "
                    'held-out split with some, e.g. train[90%:].')
  return reader.eval_data(s.config.data, split, local_batch_size=s.local_eval_batch_size,
                          process_index=jax.process_index(), process_count=jax.process_count(),
                          split_size=size)


def fit_thresholds(s: run.Setup, eval_step: Any, variables: Any, data: Any, split: str,
                   previous: Sequence[float] | None = None) -> dict[str, Any]:
  """Per-class decision thresholds of a multi-label model, each the best F1 on ``split``
  (``data``: its ``reader.eval_data``; scores as ``eval_step`` gives them): the record the run's
  checkpoint keeps as ``thresholds``. A class with no positive example in the split keeps its
  ``previous`` threshold (0.5 without one), named in the record's ``kept``; a split with no
  positive of any class is a UserError."""
  sums = report.stats_to_numpy(run.eval_sums(eval_step, variables, data.batches(), s.mesh, split))
  values = [float(t) for t in multilabel.choose_thresholds(sums['ml_pos'], sums['ml_neg'])]
  absent = np.flatnonzero(np.asarray(sums['ml_pos']).sum(axis=1) == 0)
  if len(absent) == len(values):
    raise UserError(f"config.evaluate.threshold_split='{split}' has no positive example of any "
                    'class, so no threshold can be chosen; give a held-out split where the tags '
                    'appear.')
  kept = []
  for k in absent:
    values[k] = float(previous[k]) if previous is not None else 0.5
    kept.append(s.info.class_names[k])
  if kept:
    logging.warning("No positive example of %s in split '%s': %s threshold%s kept (%s).",
                    ', '.join(kept[:10]) + (', ...' if len(kept) > 10 else ''), split,
                    'their' if len(kept) > 1 else 'its', 's' if len(kept) > 1 else '',
                    'the earlier one' if previous is not None else '0.5')
  logging.info("Per-class thresholds (best F1 on split '%s'): %s.", split, ', '.join(
      f'{n} {t:.3f}' for n, t in list(zip(s.info.class_names, values))[:20]))
  return {'values': values, 'split': split, **({'kept': kept} if kept else {})}


def fit_temperature(s: run.Setup, variables: Any, variables_shardings: Any,
                    data: Any, split: str, *, require_fit: bool = False,
                    abstain_accuracy: float = 0.0, unknown_keep: float = 0.0) -> dict[str, Any]:
  """Fits the temperature on ``split`` (``data``: its ``reader.eval_data``; ``temperature.py``)
  and measures the split's NLL and expected calibration error before and after (without
  test-time augmentation, as prediction and serving run): the record the run's checkpoint keeps
  as ``temperature``. With ``abstain_accuracy``, the record's ``abstain`` is the lowest threshold
  on the tempered top-1 probability whose answers on ``split`` reach that accuracy at the low end
  of their exact interval (``selective.fit``). With ``unknown_keep``, its ``unknown`` is the gate
  on the tempered logits' log-sum-exp that keeps that share of ``split`` (``ood.fit_gate``). With
  ``require_fit``, a split nothing can be fitted on (or no threshold
  reaching the accuracy) is a UserError (training instead saves without one, with a warning)."""
  fit_step = jax.jit(functools.partial(eval_steps.temperature_sums, model_def=s.model_def,
                                       cfg=s.step_cfg),
                     in_shardings=(variables_shardings, sharding.batch_sharding(s.mesh)),
                     out_shardings=sharding.replicated(s.mesh))
  sums = report.stats_to_numpy(run.eval_sums(fit_step, variables, data.batches(), s.mesh, split))
  fit = temperature.choose(sums['nll_G'], sums['count'])
  if require_fit and not fit.fitted:
    raise UserError(f"No temperature can be fitted on config.evaluate.temperature_split='{split}' "
                    f"({int(sums['count'])} example{'s' if int(sums['count']) != 1 else ''}: "
                    'its log loss is not finite or still falls '
                    'at the smallest temperature, every example right with a margin); give a '
                    'larger held-out split. Nothing was saved.')
  ece = []
  for t in (1.0, fit.temperature):
    at_t = dataclasses.replace(s, step_cfg=dataclasses.replace(s.step_cfg, temperature=t))
    step = run.jit_eval_step(at_t, variables_shardings)
    stats = report.stats_to_numpy(run.eval_sums(step, variables, data.batches(), s.mesh, split))
    ece.append(report.calibration(stats)[0])
  abstain = None
  if abstain_accuracy:   # on the tempered probabilities: the last statistics
    level = float(s.config.evaluate.get('confidence_level', 0.95))
    abstain = selective.fit(stats['sel_right'], stats['sel_wrong'], abstain_accuracy, split, level)
    if abstain is None:
      why = (f'No confidence threshold makes the answers on '
             f"config.evaluate.temperature_split='{split}' {abstain_accuracy:.2%} right with "
             f'{level:.0%} confidence: '
             f"{selective.best_possible(stats['sel_right'], stats['sel_wrong'], level)}")
      if require_fit:
        raise UserError(f'{why}; lower config.evaluate.abstain_accuracy. Nothing was saved.')
      logging.warning('%s. The run is saved without an abstention threshold; lower '
                      'config.evaluate.abstain_accuracy and run --mode=calibrate.', why)
    else:
      logging.info("Abstaining below a top-1 probability of %.3f: %.2f%% of split '%s' answered, "
                   '%.2f%% of the answers right (interval %.2f-%.2f%%; target %.2f%%).',
                   abstain['min_confidence'], 100 * abstain['coverage'], split,
                   100 * abstain['accuracy'], 100 * abstain['accuracy_interval'][0],
                   100 * abstain['accuracy_interval'][1], 100 * abstain_accuracy)
  unknown = None
  if unknown_keep:
    tempered = dataclasses.replace(s, step_cfg=dataclasses.replace(s.step_cfg,
                                                                   temperature=fit.temperature))
    try:
      unknown = ood.fit_gate(energies(tempered, variables, variables_shardings, data),
                             unknown_keep, split)
    except Exception as e:  # noqa: BLE001  (training keeps the temperature without the gate)
      if require_fit:
        raise
      logging.exception('No unknown-input gate fitted (%s); the run is saved with its '
                        'temperature but without one: run --mode=calibrate to fit it.', e)
    else:
      logging.info("Images whose logits' log-sum-exp is below %.4f are unknown: %.2f%% of "
                   "split '%s' kept (target %.2f%%).", unknown['below'], 100 * unknown['kept'],
                   split, 100 * unknown_keep)
  logging.info("Temperature %.4f fitted on split '%s' (%d examples): NLL %.4f -> %.4f, expected "
               'calibration error %.4f -> %.4f.%s', fit.temperature, split, int(sums['count']),
               fit.nll_before, fit.nll_after, ece[0], ece[1],
               ' The minimum is at the end of the searched range '
               f'[{temperature.T_MIN}, {temperature.T_MAX}]: the model is far from calibrated.'
               if fit.at_edge else '')
  return {'value': fit.temperature, 'split': split, 'examples': int(sums['count']),
          'nll': [fit.nll_before, fit.nll_after], 'ece': [ece[0], ece[1]],
          'abstain_accuracy': float(abstain_accuracy),   # the target asked for (0: none)
          **({'abstain': abstain} if abstain is not None else {}),
          'unknown_keep': float(unknown_keep),           # the share asked for (0: none)
          **({'unknown': unknown} if unknown is not None else {})}


def energies(s: run.Setup, variables: Any, variables_shardings: Any, data: Any) -> np.ndarray:
  """``ood.energy`` of every example of ``data`` (its ``reader.eval_data``), in read order, of
  the logits prediction returns (``s.step_cfg``'s temperature, no test-time augmentation);
  every process gets all of them."""
  def logits_and_mask(v, batch):
    out = eval_steps.probabilities(v, batch['image'], model_def=s.model_def, cfg=s.step_cfg)
    return out['logits'], batch['mask']

  fn = jax.jit(logits_and_mask, in_shardings=(variables_shardings, sharding.batch_sharding(s.mesh)),
               out_shardings=sharding.replicated(s.mesh))
  scores = []
  for batch in sharding.device_prefetch(data.batches(), sharding.batch_sharding(s.mesh)):
    logits, mask = jax.device_get(fn(variables, batch))
    scores.append(ood.energy(np.asarray(logits)[np.asarray(mask, bool)]))
  return np.concatenate(scores) if scores else np.zeros((0,), np.float32)
