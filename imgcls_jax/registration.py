"""Where code registered from outside the package came from: a model family
(``models.register``) or a preprocessing op (``data/pp/registry.register``) is recorded with
``code_origin`` (the file that defines it, and the --config file whose loading registered it,
``loading_config``, set by ``main.parse``), so that a run trained with it names that file to a later
mode given ``--workdir`` alone (``unregistered``). Free of TensorFlow and Flax."""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
from typing import Any, Iterator, Mapping

from imgcls_jax.errors import UserError

_LOADING: list[str] = []   # the --config files being loaded, innermost last


@contextlib.contextmanager
def loading_config(path: str) -> Iterator[None]:
  """While the --config file ``path`` (``file[:arg]``) loads, what it registers (itself or
  through modules it imports) is recorded as registered by it."""
  file, sep, arg = path.partition(':')
  _LOADING.append(os.path.abspath(os.path.expanduser(file)) + sep + arg if file else '')
  try:
    yield
  finally:
    _LOADING.pop()


def code_origin(obj: Any) -> dict[str, str]:
  """Where registered code was defined (``module``, ``file``) and the --config file that
  registers it (``config``: the one being loaded, else ``file`` when that was run as a config
  file rather than imported as a module, else '')."""
  while isinstance(obj, functools.partial):
    obj = obj.func
  module = str(getattr(obj, '__module__', '') or '')
  try:
    file = inspect.getfile(obj)
  except (TypeError, OSError):
    # A config file's module ('_imgcls_config') is not in sys.modules: a class's file is then
    # read from the code of a function it defines.
    funcs = list(vars(obj).values()) if inspect.isclass(obj) else [obj]
    file = next((f.__code__.co_filename for f in funcs if hasattr(f, '__code__')), '')
  file = os.path.abspath(file) if file else ''
  config = _LOADING[-1] if _LOADING and _LOADING[-1] else (
      file if file and module not in sys.modules else '')
  return {'module': module, 'file': file, 'config': config}


def unregistered(subject: str, ours: str, where: Mapping[str, str]) -> UserError:
  """The error for what a trained run uses and this process does not know (``subject``: "Model
  'mine' of this run is a family", ``ours``: what the package's own are), naming the code that
  registers it (``where``: ``code_origin``'s record): the --config file the run was trained with
  (in records from before it was kept: the defining file)."""
  file, module = where.get('file') or '', where.get('module') or ''
  config = where.get('config', file) or ''
  path = config.split(':')[0]
  gone = '' if not path or os.path.isfile(path) else ' (no longer there: restore it first)'
  defined = (file or module) + (
      f', imported by the --config file {path} the run was trained with'
      if config and path != file else '')
  fix = (f'pass --config={config}{gone}, which registers it' if config else
         f'import {module}, which registers it, before loading the run')
  return UserError(f'{subject} registered by your own code ({defined}), not one of {ours}; {fix}.')
