"""Evaluation of a trained run's checkpoint (the run layer under ``--mode=evaluate``,
``--mode=compare`` and k-fold cross-validation): choose the step, restore it on the mesh with the
run's parameter placement, then sum the report's statistics over a split
(``evaluate_checkpoint``) or gather its per-example predictions (``predicted_classes``).
No TensorFlow at import.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from imgcls_jax import checkpoint, inference, metrics, report, run, sharding, steps
from imgcls_jax.data import reader
from imgcls_jax.data.info import check_flips
from imgcls_jax.errors import UserError


def choose_step(ckpt: checkpoint.Checkpointer, spec: str, metrics_path: str) -> tuple[int, str]:
  """(step, how it was chosen) for ``config.evaluate.checkpoint``: 'best', 'latest' or a step.

  'best' is the checkpoint the Checkpointer ranks best (``config.checkpoint.best_metric``); for a
  run saved without evaluation metrics, the kept checkpoint with the highest eval top-1 in
  ``metrics.jsonl`` (ties: the later step); failing both, the latest.
  """
  available = sorted(ckpt.all_steps())
  spec = str(spec).strip().lower()
  if spec == 'latest':
    return available[-1], 'latest'
  if spec == 'best':
    best = ckpt.best_step()
    if best is not None:
      return best, f'best by eval {ckpt.best_metric} ({ckpt.best_mode})'
    records = metrics.read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
    acc = {int(r['step']): float(r['accuracy']) for r in records
           if r.get('split') == 'eval' and r.get('accuracy') is not None}
    scored = [(acc[s], s) for s in available if s in acc]
    if scored:
      best_acc, best = max(scored)
      return best, f'best (eval top-1 {best_acc:.4f} in metrics.jsonl)'
    logging.warning('No kept checkpoint has an eval record in %s; using the latest.', metrics_path)
    return available[-1], 'latest (no evaluated checkpoint to pick the best from)'
  if spec.isdigit():
    step = int(spec)
    if step not in available:
      raise UserError(f"Checkpoint step {step} is not in {ckpt.directory}; kept steps: "
                      f"{', '.join(map(str, available))}.")
    return step, f'step {step}'
  raise UserError(f"config.evaluate.checkpoint='{spec}' must be 'best', 'latest' or a step "
                  'number.')


@dataclasses.dataclass
class Evaluation:
  """Summed statistics of one checkpoint on one split, and what was evaluated."""
  stats: dict[str, np.ndarray]
  trained: inference.Trained
  split: str
  step: int
  chosen: str
  tta: str
  workdir: str
  dataset: str = ''   # what was evaluated ('' = the run's own dataset)

  def report(self, top_confused: int = 10) -> dict[str, Any]:
    """The full report (``report.summarize``) with what was evaluated as its ``context``."""
    info, cfg = self.trained.info, self.trained.run
    rep = report.summarize(self.stats, info.class_names, top_confused=top_confused,
                           thresholds=self.trained.thresholds)
    rep['context'] = {'dataset': self.dataset or info.name, 'split': self.split,
                      'checkpoint_step': self.step, 'checkpoint': self.chosen,
                      'tta': self.tta or 'none',
                      'model': cfg.model.name, 'workdir': self.workdir,
                      'temperature': self.trained.temperature}
    return rep


def _new_image_location(saved: dict[str, Any], overrides: dict[str, Any]) -> bool:
  """True when the command line points an image-folder run at another folder or manifest."""
  def where(v: Any) -> str:
    return os.path.abspath(os.path.expanduser(v)) if v else ''
  return any(where(overrides[f'data.{k}']) != where(saved.get('data', {}).get(k))
             for k in ('folder', 'manifest') if f'data.{k}' in overrides)


@dataclasses.dataclass
class Restored:
  """One checkpoint of a run placed on the mesh, ready to read ``split`` (``restore_for_split``)."""
  trained: inference.Trained
  setup: run.Setup
  variables: Any
  shardings: Any
  data: Any              # reader.eval_data of the split
  split: str
  step: int
  chosen: str            # how the step was chosen


def restore_for_split(workdir: str, config: ml_collections.ConfigDict | None, *, split: str = '',
                      checkpoint_spec: str = 'latest', tta: str = '',
                      overrides: dict[str, Any] | None = None) -> Restored:
  """The checkpoint ``checkpoint_spec`` of ``workdir`` on the mesh with the run's parameter
  placement, and the eval data of ``split`` ('' = the run's eval split)."""
  workdir = os.path.abspath(workdir)
  checkpoint.require_checkpoint(workdir)
  keep = (config if config is not None
          else ml_collections.ConfigDict(checkpoint.read_config(workdir)))
  with checkpoint.Checkpointer.from_config(workdir, keep) as ckpt:
    step, chosen = choose_step(ckpt, checkpoint_spec, os.path.join(workdir, 'metrics.jsonl'))
    latest = ckpt.latest_step()
    fitted = [k for k in ('temperature', 'thresholds') if step != latest and k in
              ckpt.read_meta(latest) and k not in ckpt.read_meta(step)]
  if fitted:  # chosen at the end of training, for the final weights only
    logging.warning('Checkpoint %d (%s) has no %s: the run fitted %s on its final weights '
                    '(step %d) only; --config.evaluate.checkpoint=latest evaluates with %s.',
                    step, chosen, ' or '.join(fitted), 'them' if len(fitted) > 1 else 'it',
                    latest, 'them' if len(fitted) > 1 else 'it')
  trained = inference.load(workdir, config, step=step, overrides=overrides)
  cfg = trained.run
  new_images = _new_image_location(checkpoint.read_config(workdir) or {}, overrides or {})
  split = split or (reader.default_eval_split(cfg.data) if new_images else cfg.data.eval_split)
  check_flips(cfg.data, tta, mirror_safe=trained.info.mirror_safe)
  s = run.setup(cfg, trained.info, training=False, thresholds=trained.thresholds,
                temperature=trained.temperature)
  variables, shardings = run.place_variables(s, trained.variables)
  data = reader.eval_data(cfg.data, split, local_batch_size=s.local_eval_batch_size,
                          process_index=jax.process_index(), process_count=jax.process_count(),
                          split_size=reader.split_size(cfg.data, split, trained.info),
                          info=trained.info)
  return Restored(trained=trained, setup=s, variables=variables, shardings=shardings, data=data,
                  split=split, step=step, chosen=chosen)


def evaluate_checkpoint(workdir: str, config: ml_collections.ConfigDict | None, *, split: str = '',
                        checkpoint_spec: str = 'latest', tta: str = '',
                        num_bins: int = report.DEFAULT_CALIBRATION_BINS,
                        overrides: dict[str, Any] | None = None) -> Evaluation:
  """Evaluates one checkpoint of ``workdir`` on ``split`` ('' = the run's eval split), every
  example exactly once, on the mesh with the run's parameter placement."""
  if num_bins < 1:
    raise UserError(f'config.evaluate.calibration_bins={num_bins} must be at least 1.')
  r = restore_for_split(workdir, config, split=split, checkpoint_spec=checkpoint_spec, tta=tta,
                        overrides=overrides)
  eval_step = run.jit_eval_step(r.setup, r.shardings, tta=tta, num_bins=num_bins)
  sums = run.eval_sums(eval_step, r.variables, r.data.batches(), r.setup.mesh, r.split)
  return Evaluation(stats=report.stats_to_numpy(sums), trained=r.trained, split=r.split,
                    step=r.step, chosen=r.chosen, tta=tta, workdir=os.path.abspath(workdir),
                    dataset=reader.dataset_name(r.trained.run.data))


def predicted_classes(r: Restored, tta: str = '') -> tuple[np.ndarray, np.ndarray]:
  """(labels, top-1 predicted classes) of every example of ``r.split``, in the split's order
  (one process: the rows of every batch come back to the host)."""
  if jax.process_count() > 1:
    raise UserError('Per-example predictions are gathered on one host; run this mode with a '
                    'single process.')
  step = jax.jit(functools.partial(steps.predicted_classes, model_def=r.setup.model_def,
                                   cfg=r.setup.step_cfg, tta=tta),
                 in_shardings=(r.shardings, sharding.batch_sharding(r.setup.mesh)),
                 out_shardings=sharding.replicated(r.setup.mesh))
  labels, preds = [], []
  for batch in r.data.batches():
    mask = np.asarray(batch['mask'], bool)
    pred = np.asarray(jax.device_get(step(r.variables, sharding.put_batch(
        batch, sharding.batch_sharding(r.setup.mesh)))))
    labels.append(np.asarray(batch['label'])[mask])
    preds.append(pred[mask])
  if not labels:
    raise UserError(f"The split '{r.split}' is empty; evaluate a split with examples.")
  return np.concatenate(labels).astype(np.int64), np.concatenate(preds).astype(np.int64)
