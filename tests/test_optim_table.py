"""Optimizers and schedules are tables: a new one is one entry; a key set on the command line that
the chosen optimizer or schedule does not read is warned about."""
import logging
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from imgcls_jax import optim
from imgcls_jax.errors import UserError
from tests.conftest import REPO, subprocess_env


@pytest.fixture
def tables(monkeypatch):
  """The optimizer and schedule tables, restored after the test."""
  monkeypatch.setattr(optim, 'OPTIMIZERS', dict(optim.OPTIMIZERS))
  monkeypatch.setattr(optim, 'SCHEDULES', dict(optim.SCHEDULES))


def _sign_descent(cfg, lr):
  """A toy optimizer: -lr * sign(g)."""
  del cfg
  return [optax.scale_by_sign(), optax.scale_by_learning_rate(lr)]


def test_a_registered_optimizer_is_built_checked_and_listed(tables):
  optim.register_optimizer('sign_descent', _sign_descent, keys=('beta3',), decay_rates=('beta3',))
  cfg = default.get_config().optim
  cfg.name, cfg.beta3 = 'sign_descent', 0.5
  optim.check(cfg, given=())
  params = {'w': jnp.asarray([1.0, -2.0, 3.0])}
  grads = {'w': jnp.asarray([0.3, -4.0, 0.0])}
  tx = optim.build(cfg, optax.constant_schedule(0.1))
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], [-0.1, 0.1, 0.0])   # -lr * sign(g)
  cfg.beta3 = 1.5   # its decay rate is range-checked as momentum and the Adam betas are
  with pytest.raises(UserError, match=r'config.optim.beta3=1.5 must be in \[0, 1\)'):
    optim.check(cfg, given=())
  cfg.name = 'sign_decent'
  with pytest.raises(UserError, match=r"Unknown config.optim.name 'sign_decent'; use one of sgd, "
                     r'.*schedule_free_adamw, sign_descent\.'):
    optim.check(cfg, given=())
  with pytest.raises(UserError, match=r"Optimizer 'sgd' is already registered; .*replace=True"):
    optim.register_optimizer('sgd', _sign_descent)


def test_a_registered_schedule_follows_the_warmup(tables):
  # A step decay: the peak for the first half of the decay steps, then end_lr_factor x it.
  optim.register_schedule('step', lambda cfg, peak, steps: optax.piecewise_constant_schedule(
      peak, {steps // 2: cfg.end_lr_factor}), keys=('end_lr_factor',))
  cfg = default.get_config().optim
  cfg.schedule, cfg.learning_rate, cfg.end_lr_factor = 'step', 0.4, 0.25
  lr = optim.schedule(cfg, batch_size=128, total_steps=24, warmup_steps=4)   # 20 decay steps
  np.testing.assert_allclose([float(lr(s)) for s in (0, 2, 4, 13, 14, 23)],
                             [0.0, 0.2, 0.4, 0.4, 0.1, 0.1], rtol=1e-6)
  cfg.schedule = 'steps'
  with pytest.raises(UserError, match=r"Unknown config.optim.schedule 'steps'; use one of cosine, "
                     r'constant, linear, step\.'):
    optim.schedule(cfg, batch_size=128, total_steps=24, warmup_steps=4)


def test_the_built_in_tables_give_each_optimizer_its_keys():
  """The config keys each optimizer reads are what configs/default.py says of them."""
  reads = {name: set(entry.keys) for name, entry in optim.OPTIMIZERS.items()}
  assert {n for n, keys in reads.items() if 'momentum' in keys} == {'sgd', 'lars'}
  assert {n for n, keys in reads.items() if 'b1' in keys} == {'adamw', 'lamb', 'muon',
                                                              'schedule_free_adamw'}
  assert {n for n, keys in reads.items() if 'weight_decay' in keys} == set(optim.OPTIMIZERS)
  assert [n for n, e in optim.OPTIMIZERS.items() if not e.linear_in_lr] == ['schedule_free_adamw']


def test_a_key_the_chosen_optimizer_does_not_read_is_warned_about(caplog):
  cfg = default.get_config().optim
  cfg.name = 'adamw'
  with caplog.at_level(logging.WARNING):
    optim.check(cfg, given=['name', 'momentum', 'nesterov', 'learning_rate', 'b1'])
  messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert messages == [
      f"--config.optim.{key} has no effect: the optimizer config.optim.name='adamw' does not read "
      'it (only sgd, lars do); drop it, or choose one of those.'
      for key in ('momentum', 'nesterov')]
  caplog.clear()
  cfg.name = 'sgd'   # sgd reads both; nobody reads 'name' or the learning rate as its own
  with caplog.at_level(logging.WARNING):
    optim.check(cfg, given=['name', 'momentum', 'nesterov', 'learning_rate'])
  assert not caplog.records


def test_a_key_the_chosen_schedule_does_not_read_is_warned_about(caplog):
  cfg = default.get_config().optim
  cfg.schedule = 'constant'
  with caplog.at_level(logging.WARNING):
    optim.check(cfg, given=['schedule', 'end_lr_factor', 'warmup_epochs'])
  assert [r.getMessage() for r in caplog.records] == [
      "--config.optim.end_lr_factor has no effect: the schedule config.optim.schedule='constant' "
      'does not read it (only cosine, linear do); drop it, or choose one of those.']


def test_command_line_keys_are_read_as_the_config_flags_read_them():
  from imgcls_jax import main
  argv = ['imgcls_jax.main', '--config=configs/default.py', '--config.optim.name=adamw',
          '--config.optim.momentum=0.5', '--noconfig.optim.nesterov',
          '--config.optim.lookahead.alpha=1', '--config.model.width=8', '--workdir=w']
  main.parse(argv)
  assert main.given_keys('optim') == ['name', 'momentum', 'nesterov']
  main.parse(argv[:2] + ["--config.optim={'b1': 0.8, 'name': 'adamw'}", '--workdir=w'])
  assert main.given_keys('optim') == ['b1', 'name']   # (a literal's keys; nothing of before)


@pytest.mark.parametrize('config_file, flags, warned', [
    # The probe's mistake: SGD's settings given for AdamW.
    ('configs/default.py', ['--config.optim.name=adamw', '--config.optim.momentum=0.5',
                            '--config.optim.nesterov=False'], ['momentum', 'nesterov']),
    # A config file's SGD momentum, the optimizer switched on the command line: no noise.
    ('configs/fashion_mnist_quick.py', ['--config.optim.name=adamw'], []),
])
def test_the_command_line_is_what_is_warned_about(tmp_path, config_file, flags, warned):
  """The command line itself: what ``python -m imgcls_jax.main`` logs before training (a
  --workdir that is a file then ends it, before any training)."""
  (tmp_path / 'a_file').touch()
  proc = subprocess.run([sys.executable, '-m', 'imgcls_jax.main', f'--config={config_file}',
                         f'--workdir={tmp_path / "a_file"}', *flags], cwd=REPO,
                        env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and 'it is a file' in proc.stderr, proc.stderr[-2000:]
  got = [line.split('--config.optim.')[1].split(' ')[0] for line in proc.stderr.splitlines()
         if 'has no effect' in line]
  assert got == warned, proc.stderr[-2000:]


def test_the_readmes_example_registers_an_optimizer_and_a_schedule(tables, caplog):
  with open(os.path.join(REPO, 'README.md')) as f:
    blocks = re.findall(r'```python\n(.*?)```', f.read(), re.S)
  exec(next(b for b in blocks if 'optim.register_optimizer(' in b), {})
  cfg = default.get_config().optim
  cfg.name, cfg.schedule, cfg.learning_rate, cfg.end_lr_factor = 'sign_descent', 'step', 0.4, 0.5
  lr = optim.schedule(cfg, batch_size=128, total_steps=10, warmup_steps=0)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 4, 5, 9)], [0.4, 0.4, 0.2, 0.2])
  tx = optim.build(cfg, lr)
  params = {'w': jnp.asarray([1.0, 2.0])}
  updates, _ = tx.update({'w': jnp.asarray([-3.0, 0.5])}, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], [0.4, -0.4])
  with caplog.at_level(logging.WARNING):   # it reads no weight decay: every built-in one does
    optim.check(cfg, given=['weight_decay'])
  assert "only sgd, adamw, lamb, lars, muon, schedule_free_adamw do" in caplog.text


def test_a_run_is_evaluated_without_its_optimizer_registered():
  """A run trained with an optimizer its config file registered reads back in a process that
  lacks it (--mode=evaluate with --workdir alone: the setup builds no optimizer), and training
  with that name there is still refused in one sentence."""
  from imgcls_jax import run
  c = default.get_config()
  c.optim.name = 'sign_descent'   # registered by the training run's config file, not here
  assert run.setup(c, training=False).tx is None
  with pytest.raises(UserError, match="^Unknown config.optim.name 'sign_descent'; use one of"):
    run.setup(c)
