"""``--mode=calibrate``: the choice a run makes on a held-out split at the end of training, made
for a run that is already trained (without it, or again on another split):

  python -m imgcls_jax.main --mode=calibrate --workdir=runs/a \\
      --config.evaluate.temperature_split='train[90%:]'     # single-label: one temperature
  python -m imgcls_jax.main --mode=calibrate --workdir=runs/tags \\
      --config.evaluate.threshold_split=validation           # multi-label: per-class thresholds

The latest checkpoint (the final weights, what evaluate / predict / serve / export load) is read on
the split; the temperature that minimises its log loss (``held_out_fits.fit_temperature``) or each
class's best-F1 threshold (``held_out_fits.fit_thresholds``) is fitted exactly as training fits it,
and saved into that checkpoint's meta (``checkpoint_files.update_meta``), replacing an earlier
one. The split must share no example with the run's training or eval split
(``held_out.check_fit_splits``). Exports written before keep their old choice: export again.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from imgcls_jax import (checkpoint, checkpoint_files, held_out, held_out_fits, inference, ood,
                        restored_split, run, run_directory, selective)
from imgcls_jax.data import folder_layout
from imgcls_jax.errors import UserError

_KEYS = ('temperature_split', 'threshold_split')


def _chosen_split(e: ml_collections.ConfigDict, multilabel: bool,
                  overrides: dict[str, Any] | None) -> tuple[str, str]:
  """(key, split): a multi-label run's threshold split, else the temperature split."""
  key, other = _KEYS[::-1] if multilabel else _KEYS
  kind = 'multi-label' if multilabel else 'single-label'
  if (overrides or {}).get(f'evaluate.{other}'):
    raise UserError(f'config.evaluate.{other} is for {"single" if multilabel else "multi"}-label '
                    f'runs; this {kind} run gets --config.evaluate.{key}=SPLIT instead.')
  split = str(e.get(key, '') or '')
  if not split:
    raise UserError(f'Name the held-out split to fit on: --config.evaluate.{key}=SPLIT (this is '
                    f"a {kind} run), with examples the run did not train on (e.g. 'train[90%:]' "
                    "for a run trained on 'train[:90%]', or 'validation').")
  return key, split


def _check_validation_exists(saved: dict[str, Any], overrides: dict[str, Any] | None, key: str,
                             split: str) -> None:
  """A 'validation' split of an image-folder run trained without one: the fix is a new run."""
  data = ml_collections.ConfigDict(saved.get('data', {}))
  for k, v in (overrides or {}).items():   # a moved folder
    if k.startswith('data.') and k.count('.') == 1 and k[5:] in data:
      data[k[5:]] = v
  if (split.split('[')[0] != folder_layout.VALIDATION or not folder_layout.is_folder(data)
      or (data.get('validation_fraction', 0.0) or 0.0) > 0):
    return
  try:
    named = folder_layout.named_splits(folder_layout.source_of(data))
  except UserError:
    return   # the folder is missing or moved: reading the split says so
  if folder_layout.VALIDATION not in named:
    raise UserError(f"This run holds no '{folder_layout.VALIDATION}' images out (it was trained "
                    'with data.validation_fraction=0 on a folder without that split); train it '
                    f"again with --config.data.validation_fraction=0.1 and calibrate on "
                    f"--config.evaluate.{key}='{folder_layout.VALIDATION}'.")


def _gate_target(key: str, e: ml_collections.ConfigDict, overrides: dict[str, Any] | None,
                 previous: float | None) -> float:
  """What a gate fitted with the temperature is fitted for (``key``: 'abstain_accuracy', the
  answers' accuracy; 'unknown_keep', the share of the split kept as known): the flag's (0 drops
  a saved one), else the target of the run's last fit (a new temperature moves every
  probability and logit, so its gates are fitted again with it), else the run's config's."""
  check = selective.abstain_target if key == 'abstain_accuracy' else ood.keep_target
  if f'evaluate.{key}' in (overrides or {}) or previous is None:
    return check(e)
  return float(previous)


def calibrate(config: ml_collections.ConfigDict | None, workdir: str,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """The ``calibrate`` mode: fits and saves the temperature or thresholds of ``workdir``'s run.
  Returns ``{'step': ..., 'temperature' | 'thresholds': the record the checkpoint now keeps}``."""
  workdir = os.path.abspath(workdir)
  parent = os.path.dirname(workdir)
  if (os.path.basename(workdir).startswith('fold_')
      and run_directory.kind(parent) == 'cross_validation'):
    raise UserError(f"{workdir} is a fold of the cross-validation {parent}: calibrated alone, its "
                    "scores in the cross-validation's summary would change at the next run, "
                    "unlike the other folds'; calibrate a copy of the fold (cp -r), or fit "
                    'every fold alike in a new cross-validation with --config.evaluate.'
                    'temperature_split (or threshold_split) naming a split outside its folds.')
  moved = sorted(k for k in overrides or {}
                 if k.startswith(('data.holdout', 'data.validation_fraction')))
  if moved:
    raise UserError(f'--config.{moved[0]} would move the held-out images; calibrate fits on the '
                    "run's own: drop that flag.")
  spec = str((overrides or {}).get('evaluate.checkpoint', 'latest')).strip().lower()
  if spec != 'latest':
    raise UserError(f'--mode=calibrate fits the latest checkpoint only (what predict, serve and '
                    f'export load); drop --config.evaluate.checkpoint={spec}.')
  e = inference.mode_settings(workdir, config, overrides, 'evaluate')
  saved = run_directory.read_config(workdir) or (config.to_dict() if config is not None else {})
  key, split = _chosen_split(e, bool(saved.get('data', {}).get('multilabel', False)), overrides)
  _check_validation_exists(saved, overrides, key, split)
  tta = (e.get('tta', '') or '') if key == 'threshold_split' else ''  # as training chooses them
  try:
    r = restored_split.restore_for_split(workdir, config, split=split, checkpoint_spec='latest',
                                         tta=tta, overrides=overrides, warn_redrawn=False)
  except checkpoint.UnreadableCheckpoint as err:   # the latest: calibrate takes no other step
    raise UserError(f'Cannot read checkpoint {err.step} of {err.directory} ({err.cause}); '
                    '--mode=calibrate fits the latest checkpoint: rerun the training command '
                    'first (it moves the damaged one aside and resumes from the step before it), '
                    'then calibrate.') from None
  except UserError as err:
    raise UserError(held_out.for_fit_key(str(err), key, split)) from None
  cfg = r.trained.run
  with cfg.unlocked():  # the split chosen here, whatever the run was trained with
    for k in _KEYS:
      cfg.evaluate[k] = split if k == key else ''
  changed = held_out.folder_changed(cfg, r.trained.info, split)
  if changed:
    raise UserError(f"{changed}, so its drawn held-out splits changed too and '{split}' would "
                    'hold images the model trained on; restore the folder as it was, or train '
                    'again.')
  held_out.check_fit_splits(cfg, r.trained.info, trained=True)
  # Fitted on the model's own outputs: no earlier temperature or thresholds applied.
  s = dataclasses.replace(r.setup, config=cfg, step_cfg=dataclasses.replace(
      r.setup.step_cfg, temperature=1.0, thresholds=None))
  if key == 'temperature_split':
    record = held_out_fits.fit_temperature(
        s, r.variables, r.shardings, r.data, split, require_fit=True,
        abstain_accuracy=_gate_target('abstain_accuracy', e, overrides, r.trained.abstain_target),
        unknown_keep=_gate_target('unknown_keep', e, overrides, r.trained.unknown_keep))
    field, before = 'temperature', r.trained.temperature
  else:
    eval_step = run.jit_eval_step(s, r.shardings, tta=tta)
    record = held_out_fits.fit_thresholds(s, eval_step, r.variables, r.data, split,
                                          previous=r.trained.thresholds)
    field, before = 'thresholds', r.trained.thresholds
  if jax.process_index() == 0:
    checkpoint_files.update_meta(workdir, r.step, {field: record})
    if field == 'temperature':
      what = (f"Temperature {record['value']:.4f} fitted on '{split}' ({record['examples']} "
              f"examples): log loss {record['nll'][0]:.4f} -> {record['nll'][1]:.4f}, expected "
              f"calibration error {record['ece'][0]:.4f} -> {record['ece'][1]:.4f}")
      was = f' (it replaces {before:.4f})' if before != 1.0 else ''
      if record.get('abstain') and not record['abstain']['min_confidence']:
        what += (f"; every answer on '{split}' is right often enough "
                 f"({record['abstain']['accuracy']:.2%}): no abstention")
      elif record.get('abstain'):
        a = record['abstain']
        what += (f"; abstaining below a top-1 probability of {a['min_confidence']:.3f}, "
                 f"{a['coverage']:.2%} of '{split}' is answered, {a['accuracy']:.2%} of it right "
                 f"({a['confidence_level']:.0%} interval {a['accuracy_interval'][0]:.2%}-"
                 f"{a['accuracy_interval'][1]:.2%}; target {a['target_accuracy']:.2%})")
      elif r.trained.abstain:
        what += '; the abstention threshold is removed'
      if record.get('unknown'):
        u = record['unknown']
        what += (f"; images whose logits' log-sum-exp is below {u['below']:.4f} are unknown "
                 f"({u['kept']:.2%} of '{split}' kept; target {u['keep']:.2%})")
      elif r.trained.unknown:
        what += '; the unknown-input gate is removed'
    else:
      names = r.trained.info.class_names
      shown = ', '.join(f'{n} {t:.3f}' for n, t in list(zip(names, record['values']))[:10])
      what = (f"Per-class thresholds fitted on '{split}' (best F1 each): {shown}"
              f"{', ...' if len(names) > 10 else ''}")
      if record.get('kept'):
        what += (f"; {', '.join(record['kept'][:10])}{', ...' if len(record['kept']) > 10 else ''}"
                 f" had no positive example there and kept "
                 f"{'the earlier threshold' if before is not None else '0.5'}")
      was = ' (they replace the earlier ones)' if before is not None else ''
    with checkpoint.Checkpointer.from_config(workdir, cfg, read_only=True) as ckpt:
      best, _ = restored_split.choose_step(ckpt, 'best', os.path.join(workdir, 'metrics.jsonl'))
    if best == r.step:
      readers = 'predict, serve, export and evaluate use it from now on'
    else:
      readers = ('predict, serve and export use it from now on, and so does --mode=evaluate with '
                 f"--config.evaluate.checkpoint=latest (its default, 'best', is checkpoint "
                 f'{best}, which has none)')
    print(f'{what}.\nSaved in checkpoint {r.step} of {workdir}{was}: {readers}; export again to '
          'update an earlier export.', flush=True)
  return {'step': r.step, field: record}
