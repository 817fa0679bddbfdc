"""Command line: ``python -m imgcls_jax.main --config=configs/default.py --workdir=DIR``.

Override any config key with ``--config.key=value`` (e.g. ``--config.optim.learning_rate=0.05``).
The modes that use a trained run (evaluate, compare, calibrate, predict, export, serve, embed) take
the model from ``--workdir`` alone: ``--config`` is optional for them, and only their own keys
(and where the evaluation data lives) may be given. Mistakes a user can fix end in one line naming
the problem and the fix (exit status 2), and so does a full or read-only disk.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import logging
import os
import re
import sys
import textwrap
from typing import Any

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before anything imports TensorFlow
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')  # quieter, and deterministic TF CPU kernels

from absl import flags
from ml_collections import config_flags

from imgcls_jax import configlib, registration, startup
from imgcls_jax.errors import UserError, first_line

# --mode name -> (module, function). 'train' runs a hyperparameter sweep when config.sweep.grid
# is set, else k-fold cross-validation when config.cross_validation.folds > 0, else one run. The
# modes of a trained run are called as fn(config, workdir, overrides=...) with the keys given on the command line; train as
# fn(config, workdir). Mode options are config keys (config.evaluate.*, ...; configs/default.py).
MODES: dict[str, tuple[str, str]] = {
    'train': ('imgcls_jax.train', 'train_and_evaluate'),
    'cross_validation': ('imgcls_jax.cross_validation', 'cross_validate'),
    'sweep': ('imgcls_jax.sweep', 'sweep'),
    'predict': ('imgcls_jax.predict', 'predict'),
    'export': ('imgcls_jax.export', 'export'),
    'serve': ('imgcls_jax.serve', 'serve'),
    'evaluate': ('imgcls_jax.evaluate', 'evaluate'),
    'compare': ('imgcls_jax.compare', 'compare'),
    'calibrate': ('imgcls_jax.calibrate', 'calibrate'),
    'curves': ('imgcls_jax.evaluate', 'curves'),
    'classical': ('imgcls_jax.classical', 'classical'),
    'embed': ('imgcls_jax.embed', 'embed'),
}
TRAINED_RUN_MODES = ('predict', 'export', 'serve', 'evaluate', 'compare', 'calibrate', 'curves',
                     'embed')

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py), '
                                          'optionally followed by :ARG.', flag_values=FLAGS,
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, summaries.',
                               flag_values=FLAGS)
_MODE = flags.DEFINE_enum('mode', 'train',
                          [m for m in MODES if m not in ('cross_validation', 'sweep')],
                          'What to do.', flag_values=FLAGS)


class _CliError(Exception):
  pass


def _config_file_error(argv: list[str]) -> str | None:
  """One sentence when the file given to --config cannot be loaded (missing, a syntax error, no
  ``get_config()``, or ``get_config()`` raising), else None."""
  path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if not path:
    return None
  try:
    configlib.load_config_file(path)
  except (Exception, SystemExit) as e:  # whatever the user's file raises (not Ctrl-C)
    return (f'Cannot load the config file {path} ({first_line(e, limit=300)}); check the path '
            'and that it runs and defines get_config().')
  return None


def _argv_config(argv: list[str]):
  """The config file named by ``--config=`` loaded as it is (no overrides), or None when there is
  none or it does not load (the caller reports that as a config-file problem)."""
  config_path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if not config_path:
    return None
  try:
    return configlib.load_config_file(config_path)
  except Exception:  # noqa: BLE001
    return None


def _explain_override_error(argv: list[str], err: Exception) -> str:
  """Names the --config.X flag that does not exist in the config, if that is the problem."""
  config = _argv_config(argv)
  if config is not None:
    for arg in argv:
      if not arg.startswith('--config.'):
        continue
      key = arg[len('--config.'):].split('=', 1)[0]
      node, parts = config, key.split('.')
      for i, part in enumerate(parts):
        if node is None or not hasattr(node, 'keys'):
          break
        if part not in node:
          parent = '.'.join(parts[:i]) or '(top level)'
          valid = ', '.join(sorted(node.keys()))
          return (f"Unknown config key '{key}' (from {arg}); valid keys under {parent}: {valid}. "
                  'See configs/default.py for the documented schema.')
        node = node[part]
  return f'Bad command-line flag: {err}'


_KINDS = ((bool, 'True or False'), (int, 'a whole number'), (float, 'a number'),
          (tuple, 'a Python tuple, e.g. (1, 2)'), (str, 'a string'))


def _explain_value_error(argv: list[str], msg: str) -> str:
  """One sentence for a --config.KEY=VALUE whose value does not parse as the key's type."""
  match = re.search(r'flag --config\.([\w.]+)=', msg)
  node = _argv_config(argv) if match else None
  if node is not None:
    key = match.group(1)
    value = next((a.split('=', 1)[1] for a in argv if a.startswith(f'--config.{key}=')), '')
    try:
      for part in key.split('.'):
        node = node[part]
    except (KeyError, AttributeError, TypeError):  # fall back to the parser's own words
      node = None
    kind = next((k for t, k in _KINDS if isinstance(node, t)), None)
    if node is not None and kind:
      return (f"Bad config value --config.{key}={value}: config.{key} must be {kind} (its "
              f"default is {node!r}).")
  return f'Bad config value: {msg}.'


def _literal(text: str, like: Any = None) -> Any:
  """A flag's value as a Python literal (``4``, ``(1, 2)``, ``True``), else the string; for a
  key whose value now is a bool (``like``), also true / false / 1 / 0, as the flag parser takes
  them."""
  if isinstance(like, bool) and text.strip().lower() in ('true', 'false', '1', '0'):
    return text.strip().lower() in ('true', '1')
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _fold_new_model_keys(argv: list[str]) -> list[str]:
  """``argv`` with ``--config.model.KEY=VALUE`` flags folded into a ``--config.model={...}`` flag
  where the config parser would refuse them: it overrides only keys the config file's model group
  holds, so a constructor argument the file leaves at its default (e.g. ``patch_size``) needs the
  group given whole. After a ``--config.model=`` literal, every such flag joins it; without one,
  the flags of new keys join the file's group, given whole before the first model flag (the
  others stay flags, parsed as the file's types). The model table then checks each key against
  the constructor, name and type. The same list when nothing needs folding, when the group
  cannot be read (the parser then says what is wrong) and in the modes of a trained run (whose
  model comes from the run)."""
  if mode_arg(argv) in TRAINED_RUN_MODES:
    return argv
  flagged = [i for i, a in enumerate(argv) if re.match(r'--config\.model\.\w+=', a)]
  whole = [i for i, a in enumerate(argv) if a.startswith('--config.model=')]
  if whole:
    group = _literal(argv[whole[-1]].split('=', 1)[1])
    flagged = [i for i in flagged if i > whole[-1]]
  else:
    config = _argv_config(argv) if flagged else None
    group = config.model.to_dict() if config is not None and 'model' in config else None
  split = {i: argv[i][len('--config.model.'):].split('=', 1) for i in flagged}
  if not isinstance(group, dict) or not split or (
      not whole and all(key in group for key, _ in split.values())):
    return argv
  folded = {i: kv for i, kv in split.items() if whole or kv[0] not in group}
  for key, value in folded.values():
    group[key] = _literal(value, group.get(key))
  at = whole[-1] if whole else flagged[0]
  out = []
  for i, arg in enumerate(argv):
    if i == at:
      out.append(f'--config.model={group!r}')
      if whole:
        continue
    if i not in folded:
      out.append(arg)
  return out


def parse(argv: list[str]):
  """Parses flags (``argv`` only: no value of an earlier call stays); returns (config, workdir,
  mode) or raises _CliError with one clear line.

  A mode of a trained run without ``--config`` parses its ``--config.*`` flags against the schema
  (configs/default.py); the run's own config comes from its checkpoint. Model families and
  preprocessing ops that the config file registers are recorded as registered by it (a run
  trained with them names it to a later mode given --workdir alone).
  """
  at = argv.index('--config') if '--config' in argv[1:-1] else -1   # absl's '--config PATH'
  argv = argv[:at] + [f'--config={argv[at + 1]}'] + argv[at + 2:] if at > 0 else argv
  path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), '')
  saved = sys.argv   # config_flags reads the override flags' names from it: set, then restored
  try:
    with registration.loading_config(path):
      return _parse(argv)
  finally:
    sys.argv = saved


def _parse(argv: list[str]):
  if mode_arg(argv) in TRAINED_RUN_MODES and not any(a.startswith('--config=') for a in argv):
    argv = [argv[0], f'--config={configlib.default_config_path()}', *argv[1:]]
  argv = _fold_new_model_keys(argv)
  given = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
  if given and not any(a == '--config' or a.startswith('--config=') for a in argv):
    raise _CliError(f'{given[0]} sets a key of a config file, and none was given: add '
                    f'--config=configs/default.py (or another file in configs/) before it.')
  # Nothing of an earlier call in this process stays: its --mode or --workdir, the flags it
  # defined for its --config.* overrides (a second definition is refused).
  for name in list(FLAGS):
    if name.startswith('config.'):
      delattr(FLAGS, name)
    else:
      FLAGS[name].unparse()
  sys.argv = argv
  try:
    FLAGS(argv)
  except Exception as e:  # a config file that does not load fails here when overrides are given
    problem = _config_file_error(argv)
    if problem:
      raise _CliError(problem) from None
    if isinstance(e, (AttributeError, KeyError)):
      raise _CliError(_explain_override_error(argv, e)) from None
    if not isinstance(e, flags.Error):
      raise
    msg = str(e).splitlines()[0]
    if 'could not convert' in msg or 'Could not parse' in msg or 'flag --config.' in msg:
      raise _CliError(_explain_value_error(argv, msg)) from None
    raise _CliError(f'{msg} (see --help).') from None
  if FLAGS['config'].value is None or not FLAGS['config'].present:
    raise _CliError('Missing --config: pass a config file, e.g. --config=configs/default.py.')
  config = FLAGS['config'].value
  try:
    config.keys()
  except Exception as e:  # config_flags defers errors loading the file until first use
    raise _CliError(_config_file_error(argv) or (
        f'Cannot load the config file given to --config ({first_line(e, limit=300)}); check the '
        'path and that it defines get_config().')) from None
  if not _WORKDIR.value:
    raise _CliError('Missing --workdir: pass a directory for checkpoints and logs, e.g. '
                    '--workdir=/tmp/run1.')
  try:
    config = configlib.complete(config, config_flags.get_config_filename(FLAGS['config']))
  except UserError as e:
    raise _CliError(str(e)) from None
  return config, _WORKDIR.value, _MODE.value


def _configure_logging() -> None:
  from imgcls_jax import write_problems   # (standard library only)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s',
                      datefmt='%H:%M:%S', force=True)
  for noisy in ('absl', 'jax._src', 'orbax', 'tensorflow', 'tensorflow_datasets', 'etils'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  for handler in logging.getLogger().handlers:
    handler.addFilter(write_problems.not_a_library_write_failure)


HELP_FLAGS = ('-h', '-?', '--help', '--helpfull', '--helpshort')


def usage() -> str:
  """What ``--help`` prints: the command, its flags, the modes and where the config keys are."""
  modes = ', '.join(m for m in MODES if m not in ('cross_validation', 'sweep'))
  return '\n'.join([
      __doc__.strip(), '',
      textwrap.fill(f'Modes (--mode): {modes}. --mode=train runs a sweep when config.sweep.grid '
                    'is set, and k-fold cross-validation when config.cross_validation.folds > 0.',
                    width=98), '',
      'Flags:', FLAGS.get_help(), '',
      'Config keys (--config.KEY=VALUE): the documented schema is configs/default.py; an unknown',
      "key is refused with the valid keys at its level. README.md has each mode's options.", '',
      *_names()])


def _names() -> list[str]:
  """The names the built-in tables offer, one paragraph each."""
  from imgcls_jax import device_augment, models, optim   # (the model table imports flax)
  tables = {'Models (config.model.name)': models.names(),
            'Optimizers (config.optim.name)': optim.OPTIMIZERS,
            'Schedules (config.optim.schedule)': optim.SCHEDULES,
            'Device ops (config.data.device_preprocess)': device_augment.OPS}
  return [textwrap.fill(f'{k}: {", ".join(v)}.', width=98, subsequent_indent='  ')
          for k, v in tables.items()]


def given_keys(section: str) -> list[str]:
  """The keys of ``config.<section>`` the last ``parse`` set on the command line (as
  ``--config.<section>.KEY=...``, a boolean's ``--noconfig.<section>.KEY``, or in a
  ``--config.<section>={...}`` literal), in the order given; not those of nested groups."""
  overrides = config_flags.get_override_values(FLAGS['config'])
  keys = [k[len(section) + 1:] for k in overrides if k.startswith(section + '.')]
  keys += [str(k) for k in (overrides.get(section) or {})]
  return [k for k in dict.fromkeys(keys) if '.' not in k]


def run(argv: list[str] | None = None) -> int:
  """Entry point; returns the process exit status."""
  argv_given, argv = argv, list(sys.argv if argv is None else argv)
  if any(a in HELP_FLAGS for a in argv[1:]):
    print(usage(), flush=True)
    return 0
  _configure_logging()
  from imgcls_jax import write_problems
  from imgcls_jax.errors import UserError
  config = workdir = None
  mode = mode_arg(argv)
  try:
    config, workdir, mode = parse(argv)
    from imgcls_jax import distributed, sharding
    sharding.request_cpu_devices(int(config.mesh.get('cpu_devices', 0)))  # before any JAX op
    startup.enable_compilation_cache(config.get('compilation_cache_dir', ''))  # before compiling
    if distributed.requested(config):  # before anything touches a device
      distributed.initialize(config.distributed)
    if mode == 'train' and config.get('sweep') and config.sweep.grid:
      mode = 'sweep'   # each trial trains (or cross-validates) as below
    elif mode == 'train' and config.get('cross_validation') and config.cross_validation.folds > 0:
      mode = 'cross_validation'
    if mode in ('train', 'cross_validation', 'classical'):   # a sweep checks its own folder
      from imgcls_jax import run_directory
      writes = ('classical_cv' if mode == 'classical' and config.get('cross_validation')
                and config.cross_validation.folds > 0 else mode)
      run_directory.check_writable_by(writes, workdir)
      if mode == 'classical' and config.get('sweep') and config.sweep.grid:
        raise UserError('--mode=classical fits one model and does not sweep: config.sweep.grid is '
                        'for trained runs; drop it, or run one --mode=classical per value (each '
                        'with its own --workdir).')
    if mode in ('train', 'cross_validation', 'sweep'):   # settings the optimizer does not read
      from imgcls_jax import optim
      optim.check(config.optim, given=given_keys('optim'))
    if mode not in TRAINED_RUN_MODES:   # the run's config.json must name them from anywhere
      _absolute_data_paths(config)
    module_name, fn_name = MODES[mode]
    fn = getattr(importlib.import_module(module_name), fn_name)
    if mode in TRAINED_RUN_MODES:
      fn(config, workdir, overrides=dict(config_flags.get_override_values(FLAGS['config'])))
    else:
      fn(config, workdir)
  except (_CliError, UserError) as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 2
  except Exception as e:  # noqa: BLE001  a path, a full or read-only disk: else a bug, in full
    problem = write_problems.write_problem(e, config, workdir, mode)
    if problem is None:
      raise
    print(f'error: {problem}', file=sys.stderr, flush=True)
    if argv_given is None:   # the command line, which exits next
      write_problems.no_oserror_tracebacks_at_exit()
    return 2
  except KeyboardInterrupt:   # Ctrl-C outside training, or a second one during it
    resume = (f'; the same command resumes from what {workdir} holds (its newest checkpoints, '
              'finished trials or folds)'
              if workdir and mode_arg(argv) == 'train' else '')
    print(f'Interrupted: stopped at once, saving nothing more{resume}.', file=sys.stderr,
          flush=True)
    return 130
  return 0


def mode_arg(argv: list[str]) -> str:
  """The --mode given on the command line ('train' when none is)."""
  return next((a.split('=', 1)[1] for a in argv if a.startswith('--mode=')), 'train')


def _absolute_data_paths(config) -> None:
  """``config.data.folder`` / ``.manifest`` / ``.data_dir`` / ``.index_cache`` as absolute
  paths: a run saved with ``photos`` evaluated from another directory read that directory's
  ``photos`` (or failed). (An ``arrays:`` path is part of ``data.name``, which a resume must
  match as saved: it stays as given.)"""
  data = config.get('data')
  for key in ('folder', 'manifest', 'data_dir', 'index_cache'):
    value = data.get(key) if data is not None else None
    if isinstance(value, str) and value and '://' not in value and value != 'off':
      data[key] = os.path.abspath(os.path.expanduser(value))


if __name__ == '__main__':
  sys.exit(run())
