"""The defaults of its model's constructor that a run was trained with.

``config.model`` names a family and the arguments the config sets; every other argument of the
constructor takes its default of the day. So that a run directory stays the whole model when a
family's default changes later (another stem, another pooling), every checkpoint's meta records
those defaults (``record``, under ``META_KEY``, next to the config):

- loading the run (``inference.load``: evaluate, predict, export, serve, embed, a teacher) builds
  it with the recorded values (``apply``), and says which defaults have changed since;
- resuming its training where a default has changed is refused, naming the key to set
  (``check_resume``): the run would otherwise go on with another network, silently where no
  shape changes; ``completed`` gives the config comparison of a resume the recorded values.

A run written before this record rebuilds with today's defaults, as before. An argument added to
a family after a run was trained is not recorded there: arguments are added with the default that
keeps the earlier behaviour (as config keys are, ``configlib.config_differences``).
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Mapping

import ml_collections

from imgcls_jax import models
from imgcls_jax.errors import UserError

META_KEY = 'model_defaults'
_GONE = object()   # the family no longer takes the argument


def record(model: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a checkpoint's meta records: ``config.model``'s family's constructor defaults (JSON
  values) for the arguments ``model`` does not set."""
  return {k: v for k, v in models.defaults(model.name).items() if k not in model}


def _as_built(value: Any) -> Any:
  """A recorded JSON value as a config gives it (lists back to tuples)."""
  return tuple(_as_built(v) for v in value) if isinstance(value, list) else value


def _literal(value: Any) -> str:
  """``value`` as a --config.model.KEY=... value that needs no shell quoting where it can."""
  if isinstance(value, (list, tuple)):
    return '(' + ','.join(_literal(v) for v in value) + (',)' if len(value) == 1 else ')')
  return value if isinstance(value, str) else repr(value)


def changed(model: ml_collections.ConfigDict,
            recorded: Mapping[str, Any] | None) -> list[tuple[str, Any, Any]]:
  """``(key, the value trained with, its default now or _GONE)`` for each recorded default that
  ``model`` does not set and that is not the family's default any more (registered family)."""
  if not recorded:
    return []
  params, bound, any_keyword = models.arguments(model.name)
  takes = {p.name for p in params} | set(bound)
  now = models.defaults(model.name)
  out = []
  for key, then in sorted(recorded.items()):
    if key in model:
      continue
    if key not in takes and not any_keyword:
      out.append((key, then, _GONE))
    elif key in now and now[key] != then:
      out.append((key, then, now[key]))
  return out


def apply(run: ml_collections.ConfigDict, meta: Mapping[str, Any]) -> None:
  """Sets in ``run.model`` (a trained run's config) each default it was trained with that has
  changed since, so that the model builds as it was trained; says so in the log."""
  for key, then, now in changed(run.model, meta.get(META_KEY)):
    if now is _GONE:
      logging.warning("Model '%s' no longer takes '%s', which this run was trained with at its "
                      'default then, %s; it is built without it (its weights may not fit).',
                      run.model.name, key, _literal(then))
      continue
    with run.model.unlocked():
      run.model[key] = _as_built(then)
    logging.info("Model '%s': built with %s=%s, its default when this run was trained (the "
                 'default is now %s).', run.model.name, key, _literal(then), _literal(now))


def completed(saved: Mapping[str, Any] | None, meta: Mapping[str, Any]) -> Any:
  """The checkpoint's config ``saved`` with its recorded model defaults set, for comparing a
  resume's config with (a key set now to the value trained with is then no change)."""
  recorded = meta.get(META_KEY)
  if not saved or not recorded or not isinstance(saved.get('model'), dict):
    return saved
  full = copy.deepcopy(dict(saved))
  full['model'] = {**recorded, **full['model']}
  return full


def check_resume(meta: Mapping[str, Any], config: ml_collections.ConfigDict, where: str) -> None:
  """UserError when resuming checkpoint ``where`` with ``config`` would build its model with a
  default that has changed since it was trained, naming the key that resumes it as trained."""
  saved_model = ((meta.get('config') or {}).get('model') or {})
  if saved_model.get('name') != config.model.name:
    return   # another model altogether: configlib.check_config names it
  changes = [(k, then, now) for k, then, now in changed(config.model, meta.get(META_KEY))
             if now is not _GONE]
  if not changes:
    return
  what = '; '.join(f'{k}={_literal(then)} (now {_literal(now)})' for k, then, now in changes)
  flags = ' '.join(f'--config.model.{k}={_literal(then)}' for k, then, _ in changes)
  raise UserError(f"Cannot resume {where}: model '{config.model.name}' was trained with "
                  f'constructor defaults that have changed since: {what}; add {flags} to resume '
                  'it as trained, or train in a new --workdir.')
