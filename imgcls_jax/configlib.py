"""Config checks, the one helper that turns ``*_steps`` / ``*_epochs`` keys into steps, and the
comparison of a config with the one a checkpoint was written by."""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import os
from typing import Any, Mapping

import ml_collections

from imgcls_jax.errors import UserError

# Config keys that define the state or the data it was trained on: resuming with other values is an
# error. Keys ending in '.' are prefixes.
MUST_MATCH = ('model.', 'data.name', 'data.mirror_safe',
              # sigmoids per tag or one softmax: the same head shape, another model
              'data.multilabel',
              # an image folder's held-out draws: others would put trained-on images in them
              'data.holdout_fraction', 'data.holdout_seed', 'data.validation_fraction')
# Config keys that change the training trajectory but not the state's shapes: resuming with other
# values works, with a warning that the run no longer matches an uninterrupted one.
TRAJECTORY = ('seed', 'batch_size', 'dtype', 'label_smoothing', 'num_train_steps', 'num_epochs',
              'optim.', 'data.train_split', 'data.train_preprocess', 'data.shuffle_buffer',
              'data.mean', 'data.std', 'ema.', 'grad_accumulation_steps', 'loss.', 'distill.',
              # augmentation on the device, mixing, class-balanced sampling, a frozen first layer
              'data.device_preprocess', 'mixup.', 'data.balanced_sampling',
              'init.freeze_whitening',
              # how the training data is read: its shards (each a part of the order) and order
              'data.read_shards')
# Keys that change what the evaluations during training score: metrics.jsonl then holds two
# kinds of figures, and 'best' (config.checkpoint.best_metric) ranks across them.
EVALUATED = ('data.eval_split', 'data.eval_preprocess')


def config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON types (what checkpoints and ``config.json`` hold)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out: dict[str, Any] = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def flat(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """The config's leaves as ``{'optim.learning_rate': 0.1, ...}`` (JSON types)."""
  return _flatten(config_dict(config) if isinstance(config, ml_collections.ConfigDict) else config)


def default_config_path() -> str:
  """configs/default.py (the schema), wherever the project is installed."""
  spec = importlib.util.find_spec('configs.default')
  if spec is not None and spec.origin:
    return spec.origin
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                      'default.py')


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file (``path[:arg]``: the argument part is ignored)."""
  spec = importlib.util.spec_from_file_location('_imgcls_config', path.split(':')[0])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@functools.lru_cache(maxsize=1)
def _schema_defaults() -> dict[str, Any]:
  """configs/default.py's values, flattened to dotted keys as JSON types ({} if it cannot load)."""
  try:
    return _flatten(config_dict(load_config_file(default_config_path())))
  except Exception:  # no schema: every key missing from a checkpoint counts as changed
    return {}


def complete(config: ml_collections.ConfigDict, source: str) -> ml_collections.ConfigDict:
  """``config`` (from the file ``source``) checked against configs/default.py's schema: a key the
  schema lacks (a typo such as ``optim.learning_rat``) is a UserError naming the nearest real key;
  keys the file lacks get their defaults. ``model.*`` keys are the model's own arguments
  (checked when it is built)."""
  import difflib
  schema = _schema_defaults()
  if not schema:
    return config
  keys = _flatten(config_dict(config))
  for key in sorted(keys):
    if key.startswith('model.') or key in schema or any(k.startswith(key + '.') for k in schema):
      continue
    near = difflib.get_close_matches(key, list(schema), n=1)
    raise UserError(f"The config file {source} sets '{key}', which is not a config key"
                    + (f" (did you mean '{near[0]}'?)" if near else '')
                    + '; see configs/default.py for the documented schema.')
  if all(k in keys for k in schema if not k.startswith('model.')):
    return config
  full = load_config_file(default_config_path())

  def merge(dst: ml_collections.ConfigDict, src: ml_collections.ConfigDict, path: str) -> None:
    for k in src.keys():
      value = src[k]
      if (isinstance(value, ml_collections.ConfigDict) and path + k != 'model'
          and isinstance(dst.get(k), ml_collections.ConfigDict)):
        merge(dst[k], value, f'{path}{k}.')
      else:
        with dst.ignore_type():
          dst[k] = value

  merge(full, config, '')
  return full


def _model_defaults(name: Any) -> dict[str, Any]:
  """``model.<arg>`` -> the default of model ``name``'s constructor now (``models.defaults``)."""
  from imgcls_jax import models  # here: the model table imports flax
  try:
    return {f'model.{k}': v for k, v in models.defaults(str(name)).items()}
  except (UserError, TypeError, ValueError):
    return {}


# The id lists a cross-validation fold's splits name, in its folder (cross_validation.py and
# classical.py write them; relocate_id_lists reads a moved fold's)
FOLD_ID_FILES = ('train_ids.txt', 'eval_ids.txt')


def relocate_id_lists(saved: dict[str, Any] | None, workdir: str) -> dict[str, Any] | None:
  """A run's saved config (``saved``) whose splits name a cross-validation fold's id lists by
  absolute path (``NAME@/runs/cv/fold_0/eval_ids.txt``), reading them from the fold's own folder
  (``workdir``) once the cross-validation was moved or copied (they were read from the old place:
  gone, or another run's). The saved values only: a split given on the command line stays."""
  data = (saved or {}).get('data')
  if not isinstance(data, dict):
    return saved
  moved = {}
  for key in ('train_split', 'eval_split'):
    base, sep, path = str(data.get(key) or '').partition('@')
    here = os.path.join(workdir, os.path.basename(path))
    if (sep and os.path.basename(path) in FOLD_ID_FILES
        and os.path.dirname(path) != workdir and os.path.isfile(here)):
      moved[key] = f'{base}@{here}'
  return {**saved, 'data': {**data, **moved}} if moved else saved


def _same_fold_list(a: Any, b: Any) -> bool:
  """Two id-listed splits of one cross-validation fold, before and after its folder was moved or
  copied: 'NAME@/old/cv/fold_0/train_ids.txt' and 'NAME@/new/cv/fold_0/train_ids.txt'."""
  if not (isinstance(a, str) and isinstance(b, str) and '@' in a and '@' in b):
    return False
  (base_a, path_a), (base_b, path_b) = a.split('@', 1), b.split('@', 1)
  tail = lambda p: p.replace('\\', '/').rstrip('/').split('/')[-2:]   # noqa: E731
  return (base_a == base_b and tail(path_a) == tail(path_b)
          and tail(path_a)[0].startswith('fold_') and tail(path_a)[-1] in FOLD_ID_FILES)


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       keys: tuple[str, ...]) -> list[str]:
  """``'key: <saved> in the checkpoint, <current> now'`` for every differing key under ``keys``.

  A key the checkpoint's config lacks (one added to the project after the checkpoint was written)
  is unchanged when its value now is its default: configs/default.py's, or for ``model.*`` keys
  the model constructor's. Keys are added with the default that keeps the earlier behaviour, so
  such a run continues as it would have. Likewise a ``model.*`` key only the checkpoint's config
  sets is unchanged when it is the constructor's default now.
  """
  a, b = _flatten(saved), _flatten(current)
  def selected(k: str) -> bool:
    return any(k.startswith(p) if p.endswith('.') else k == p for p in keys)
  missing = object()
  defaults: dict[str, Any] | None = None
  diffs = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k, missing), b.get(k, missing)
    # One side lacks the key: a model argument left to its constructor's default now (a
    # checkpoint's recorded defaults: ``model_defaults.completed``), else a key added since.
    one = vb if va is missing else va if vb is missing and k.startswith('model.') else missing
    if selected(k) and one is not missing:
      if defaults is None:
        model = _model_defaults(b['model.name']) if 'model.name' in b else {}
        defaults = {**{d: v for d, v in _schema_defaults().items() if not d.startswith('model.')},
                    **model}
      if k in defaults and defaults[k] == one:
        continue
    if selected(k) and va != vb and not _same_fold_list(va, vb):
      show = lambda v: 'unset' if v is missing else json.dumps(v)
      diffs.append(f'{k}: {show(va)} in the checkpoint, {show(vb)} now')
  return diffs


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """``config_differences`` over every key of either config."""
  keys = {k.split('.')[0] + ('.' if '.' in k else '') for k in {**_flatten(saved),
                                                                 **_flatten(current)}}
  return config_differences(saved, current, tuple(sorted(keys)))


def check_config(saved: Mapping[str, Any] | None, config: ml_collections.ConfigDict,
                 where: str, warn: bool = True) -> None:
  """Raises UserError if ``config`` differs from the checkpoint's in a state-defining key.

  Warns (with ``warn``; else ``warn_trajectory`` later, once the state is known to fit) when it
  differs in a key that changes the training trajectory. ``where`` names the checkpoint, e.g.
  'checkpoint 30 in /runs/a/checkpoints'.
  """
  if not saved:
    return
  bad = config_differences(saved, config_dict(config), MUST_MATCH)
  if bad:
    raise UserError(f'Cannot resume {where}: it was written by a different model or dataset '
                    f'({"; ".join(bad)}); resume it with the config that wrote it (config.json in '
                    'the workdir) or start the new run in a new --workdir.')
  if warn:
    warn_trajectory(saved, config, where)


def warn_trajectory(saved: Mapping[str, Any] | None, config: ml_collections.ConfigDict,
                    where: str) -> None:
  """Warns when ``config`` differs from the checkpoint's in a key that changes the training
  trajectory (``TRAJECTORY``)."""
  if not saved:
    return
  changed = config_differences(saved, config_dict(config), TRAJECTORY)
  if changed:
    logging.warning('Resuming %s with a changed config (%s): the run will not match an '
                    'uninterrupted one.', where, '; '.join(changed))
  evaluated = config_differences(saved, config_dict(config), EVALUATED)
  if evaluated:
    logging.warning("Resuming %s with other evaluations (%s): metrics.jsonl's earlier ones scored "
                    "something else, and the 'best' checkpoint (config.checkpoint.best_metric) is "
                    'ranked across both; compare figures of one kind, and evaluate with '
                    '--config.evaluate.checkpoint=latest (or STEP).', where, '; '.join(evaluated))


DTYPES = ('float32', 'bfloat16', 'float16')


def steps_from(config: ml_collections.ConfigDict, prefix: str, steps_per_epoch: int) -> int:
  """``<prefix>_steps`` when > 0, else ``ceil(<prefix>_epochs * steps_per_epoch)``.

  ``prefix`` may be dotted (``'optim.warmup'``). Returns 0 when neither is set (> 0).
  """
  *parents, leaf = prefix.split('.')
  node = config
  for p in parents:
    node = node[p]
  steps = node.get(f'{leaf}_steps', -1)
  if steps is not None and steps > 0:
    return int(steps)
  epochs = node.get(f'{leaf}_epochs', -1)
  if epochs is not None and epochs > 0:
    return max(1, math.ceil(epochs * steps_per_epoch))
  return 0


def train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """Total optimizer steps: ``num_train_steps`` when > 0, else ``num_epochs`` epochs."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  if config.num_epochs <= 0:
    raise UserError('Set config.num_epochs or config.num_train_steps to a positive number.')
  return max(1, math.ceil(config.num_epochs * steps_per_epoch))


def calibration_bins(value: Any) -> int:
  """``config.evaluate.calibration_bins`` as an int; a UserError unless it is at least 1."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value \
      or value < 1:
    raise UserError(f'config.evaluate.calibration_bins={value!r} must be an integer >= 1 (the '
                    'equal-width confidence bins of the calibration report; e.g. 15).')
  return int(value)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises UserError naming the first bad value and its fix."""
  def need(ok: bool, message: str) -> None:
    if not ok:
      raise UserError(message)

  need(config.batch_size > 0, f'config.batch_size must be positive, got {config.batch_size}.')
  need(config.eval_batch_size > 0,
       f'config.eval_batch_size must be positive, got {config.eval_batch_size}.')
  need(config.dtype in DTYPES, f"config.dtype must be one of {', '.join(DTYPES)}, got "
       f"'{config.dtype}'.")
  need(config.optim.learning_rate >= 0,
       f'config.optim.learning_rate must be >= 0, got {config.optim.learning_rate}.')
  need(config.optim.weight_decay >= 0,
       f'config.optim.weight_decay must be >= 0, got {config.optim.weight_decay}.')
  need(0.0 <= config.label_smoothing < 1.0,
       f'config.label_smoothing must be in [0, 1), got {config.label_smoothing}.')
  need(config.num_train_steps > 0 or config.num_epochs > 0,
       'Set config.num_epochs or config.num_train_steps to a positive number.')
  need(math.isfinite(config.num_epochs),
       f'config.num_epochs must be a finite number of epochs, got {config.num_epochs}.')
  need(len(config.data.mean) == len(config.data.std),
       f'config.data.mean has {len(config.data.mean)} value(s) and config.data.std '
       f'{len(config.data.std)}: give each one value per image channel (1 for grey images, 3 for '
       'colour), or one value for every channel.')
  need(all(s > 0 for s in config.data.std), 'config.data.std values must be positive.')
  need(config.optim.get('schedule_free_bn_batches', 0) >= 0,
       f"config.optim.schedule_free_bn_batches={config.optim.get('schedule_free_bn_batches')} "
       'must be >= 0 (0 = keep the statistics collected at y; e.g. 16).')
  need(config.log_every_steps > 0,
       f'config.log_every_steps must be positive, got {config.log_every_steps}.')
  need(config.keep_checkpoints > 0,
       f'config.keep_checkpoints must be positive, got {config.keep_checkpoints}.')
  accumulation = config.get('grad_accumulation_steps', 1)
  need(isinstance(accumulation, int) and accumulation >= 1,
       f'config.grad_accumulation_steps must be an integer >= 1 (1 = off), got {accumulation!r}.')
  folds = config.get('cross_validation', {}).get('folds', 0)
  need(folds == 0 or folds >= 2,
       f'config.cross_validation.folds={folds}: use 0 (off) or at least 2 folds.')
  if config.get('evaluate', {}).get('calibration_bins') is not None:   # (the report's default)
    calibration_bins(config.evaluate.calibration_bins)
  top = config.get('evaluate', {}).get('top_confused', 10)
  need(top >= 0, f'config.evaluate.top_confused must be >= 0 (how many confused class pairs the '
       f'report lists), got {top}.')
  dropout = config.get('model', {}).get('dropout', 0.0)
  need(isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0,
       f'config.model.dropout must be in [0, 1) (the fraction of units dropped), got {dropout!r}.')
