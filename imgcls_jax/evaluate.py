"""``--mode=evaluate``: restore a checkpoint, evaluate a split exactly once, write the report.

  python -m imgcls_jax.main --mode=evaluate --workdir=DIR \\
      [--config.evaluate.checkpoint=best|latest|STEP] [--config.evaluate.split=test] \\
      [--config.evaluate.tta=flip]

The model and dataset come from the run in ``--workdir``. Writes to ``config.evaluate.output_dir``
(default: the workdir) ``report.json``, ``report.md``, ``confusion_matrix.csv``,
``confusion_matrix.png``, ``reliability.png`` and, from the run's ``metrics.jsonl``,
``training_curves.png``; prints a short table. ``--mode=curves`` draws only the training curves
(fine while the run is still going).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from imgcls_jax import evaluation, inference, intervals, metrics, plots, report_files
from imgcls_jax.errors import UserError


def evaluate(config: ml_collections.ConfigDict | None, workdir: str,
             overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """The ``evaluate`` mode: ``config.evaluate`` picks checkpoint, split, TTA and output dir."""
  workdir = os.path.abspath(workdir)
  e = inference.mode_settings(workdir, config, overrides, 'evaluate')  # the run's, plus flags
  level, resamples = intervals.settings(e)
  ev = evaluation.evaluate_checkpoint(workdir, config, split=e.split,
                                      checkpoint_spec=e.checkpoint, tta=e.tta or '',
                                      num_bins=int(e.calibration_bins), overrides=overrides)
  cfg, info = ev.trained.run, ev.trained.info
  rep = ev.report(int(e.top_confused))
  if not info.multilabel:
    rep['intervals'] = intervals.report_intervals(
        np.asarray(rep['confusion_matrix']), level=level, resamples=resamples, seed=cfg.seed)
  out_dir = os.path.abspath(e.output_dir or workdir)
  if jax.process_index() == 0:
    title = f"Evaluation of {cfg.model.name} on {ev.dataset or info.name} '{ev.split}'"
    report_files.write(rep, out_dir, title, os.path.join(workdir, 'metrics.jsonl'))
    print('\n'.join(report_files.table_lines(rep, title, out_dir)), flush=True)
  return rep


def curves(config: ml_collections.ConfigDict | None, workdir: str,
           overrides: dict[str, Any] | None = None) -> str:
  """The ``curves`` mode: ``training_curves.png`` from the run's metrics.jsonl (running or not)."""
  del overrides
  workdir = os.path.abspath(workdir)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  records = metrics.read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
  if not records:
    raise UserError(f'No metrics in {metrics_path}; point --workdir at a run that has logged '
                    'training metrics.')
  out_dir = os.path.abspath((config.evaluate.output_dir if config is not None else '') or workdir)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, report_files.CURVES_FILE)
  plots.training_curves(records, path, title=f'Training curves: {os.path.basename(workdir)}')
  print(f'Training curves ({len(records)} records): {path}', flush=True)
  return path
