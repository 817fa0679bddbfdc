"""launch/local.sh (and the option handling the launch scripts share): each dry run prints the
exact commands, with the config passed through intact (the cluster scripts:
tests/test_launch_clusters.py).

``launch/local.sh`` also really runs: here with a stand-in interpreter (how it stops its processes
and waits for them) and with two short training processes (a peer killed, a SIGTERM to the
script); in tests/test_multihost.py for a whole 2-process run.
"""
from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO, subprocess_env

# Arguments for imgcls_jax.main with spaces, parentheses and quotes: they must arrive unchanged.
MAIN_ARGS = ['--config=configs/default.py', '--workdir=/shared/runs/exp 1',
             '--config.model.widths=(16, 32)', "--config.data.data_dir=/data/it's here",
             '--config.optim.learning_rate=0.05']


def _run(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  full_env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  full_env.update(env or {})
  return subprocess.run(['bash', os.path.join(REPO, 'launch', script), *args], cwd=REPO,
                        env=full_env, capture_output=True, text=True, timeout=60)


def _commands(stdout: str) -> list[list[str]]:
  """The printed commands as argv lists (comment lines skipped, a trailing '&' dropped)."""
  out = []
  for line in stdout.splitlines():
    if line.strip() and not line.startswith('#'):
      words = shlex.split(line)
      out.append(words[:-1] if words[-1] == '&' else words)
  return out


def _after_main(argv: list[str]) -> list[str]:
  return argv[argv.index('imgcls_jax.main') + 1:]


def test_local_dry_run_prints_one_command_per_process(tmp_path):
  r = _run('local.sh', '-n', '3', '--cpu-devices', '2', '--port', '12345', '--timeout', '600',
           '--python', sys.executable, '--dry-run', '--', *MAIN_ARGS)
  assert r.returncode == 0, r.stderr
  print(r.stdout)
  cmds = _commands(r.stdout)
  assert cmds[-1] == ['wait'] and len(cmds) == 4
  for i, argv in enumerate(cmds[:3]):
    assert argv[:3] == ['env', 'JAX_PLATFORMS=cpu', argv[2]]
    assert argv[2].startswith('XLA_FLAGS=') and argv[2].endswith(
        '--xla_force_host_platform_device_count=2')
    assert argv[3:7] == ['timeout', '--signal=KILL', '600', sys.executable]
    assert _after_main(argv) == MAIN_ARGS + [
        '--config.mesh.cpu_devices=2',  # over a config file's value (main.py applies this one)
        '--config.distributed.enabled=True',
        '--config.distributed.coordinator_address=127.0.0.1:12345',
        '--config.distributed.num_processes=3', f'--config.distributed.process_id={i}']


def test_local_cpu_devices_refuses_a_different_config_mesh_cpu_devices():
  base = ['-n', '2', '--cpu-devices', '2', '--port', '1', '--python', sys.executable, '--dry-run',
          '--', '--config=configs/default.py', '--workdir=/tmp/w']
  for extra in (['--config.mesh.cpu_devices=1'], ['--config.mesh.cpu_devices', '3']):
    r = _run('local.sh', *base, *extra)
    assert r.returncode == 2 and r.stdout == '', r.stdout
    assert r.stderr.strip() == (f'local.sh: --cpu-devices 2 contradicts {" ".join(extra)}; give '
                                'one of them.')
  r = _run('local.sh', *base, '--config.mesh.cpu_devices=2')  # the same number: fine
  assert r.returncode == 0, r.stderr
  assert _after_main(_commands(r.stdout)[0])[2:4] == ['--config.mesh.cpu_devices=2'] * 2


def test_local_dry_run_gives_each_process_its_gpus_and_a_free_port():
  r = _run('local.sh', '-n', '2', '--gpus-per-process', '4', '--python', sys.executable,
           '--dry-run', '--', *MAIN_ARGS)
  assert r.returncode == 0, r.stderr
  cmds = _commands(r.stdout)
  assert cmds[0][-1] == '--config.distributed.local_device_ids=0,1,2,3'
  assert cmds[1][-1] == '--config.distributed.local_device_ids=4,5,6,7'
  port = [a for a in cmds[0] if 'coordinator_address' in a][0].rsplit(':', 1)[1]
  assert port.isdigit() and 0 < int(port) < 65536  # picked by binding port 0
  assert cmds[0][0] == sys.executable and _after_main(cmds[0])[:len(MAIN_ARGS)] == MAIN_ARGS


@pytest.mark.parametrize('args, message', [
    (['-n', '0', '--', '--config=x'], "-n must be a positive integer"),
    (['--cpu-devices', '2', '--gpus-per-process', '1', '--', '--config=x'], 'not both'),
    (['--dry-run'], 'no arguments for imgcls_jax.main'),
])
def test_local_refuses_bad_arguments(args, message):
  r = _run('local.sh', *args)
  assert r.returncode == 2 and message in r.stderr


@pytest.mark.parametrize('script, args, option, example', [
    ('local.sh', ['-n'], '-n', '2'),
    ('local.sh', ['--num-processes'], '--num-processes', '2'),
    ('local.sh', ['--cpu-devices'], '--cpu-devices', '2'),
    ('local.sh', ['--gpus-per-process'], '--gpus-per-process', '4'),
    ('local.sh', ['--port', '--dry-run', '--', '--config=x'], '--port', '12345'),  # an option
    ('local.sh', ['--timeout', '', '--', '--config=x'], '--timeout', '3600'),       # empty
    ('local.sh', ['--grace'], '--grace', '90'),
    ('local.sh', ['--python', '--', '--config=x'], '--python', 'python3'),
    ('tpu_vm.sh', ['create', '--name'], '--name', 'exp1'),
    ('tpu_vm.sh', ['--zone'], '--zone', 'us-central2-b'),
    ('tpu_vm.sh', ['--zone=', 'create'], '--zone', 'us-central2-b'),
    ('tpu_vm.sh', ['--zone=z', '--project', '--dry-run', 'create'], '--project', 'my-project'),
    ('tpu_vm.sh', ['--zone=z', '--accelerator-type'], '--accelerator-type', 'v4-8'),
    ('tpu_vm.sh', ['--zone=z', '--version'], '--version', 'tpu-ubuntu2204-base'),
    ('tpu_vm.sh', ['--zone=z', '--worker'], '--worker', '0'),
], ids=lambda v: ' '.join(v) if isinstance(v, list) else None)
def test_an_option_without_its_value_is_named(script, args, option, example):
  """Not bash's own `line 46: 2: parameter null or not set` (status 1): the option, an example."""
  r = _run(script, *args)
  assert r.returncode == 2 and r.stdout == '', r.stdout
  assert r.stderr.strip() == f'{script}: {option} needs a value, e.g. {option} {example}.'


def test_local_refuses_an_unknown_option_before_main_args():
  """A typo of its own option (--cpu-device) reached main.py as an unknown flag; main.py's own
  flags may still come without the --."""
  base = ['--dry-run', '--port', '1', '--python', sys.executable]
  for unknown in ('--cpu-device', '-N', 'fast'):
    r = _run('local.sh', *base, unknown, '1', '--', '--config=configs/default.py')
    assert r.returncode == 2 and r.stdout == '', r.stdout
    kind = 'option' if unknown.startswith('-') else 'argument'
    assert r.stderr.strip() == (
        f"local.sh: unknown {kind} '{unknown}'; local.sh's options are -n, --cpu-devices, "
        '--gpus-per-process, --port, --timeout, --grace, --python and --dry-run, and arguments '
        'for imgcls_jax.main go after --.')
  for main_args in (MAIN_ARGS, ['--workdir', '/tmp/w', '--config=configs/default.py'],
                    ['--config.optim.learning_rate=0.1', '--config=configs/default.py'],
                    ['--mode=predict', '--workdir=/tmp/w'], ['-config', 'configs/default.py']):
    r = _run('local.sh', *base, *main_args)
    assert r.returncode == 0, r.stderr
    assert _after_main(_commands(r.stdout)[0])[:len(main_args)] == main_args



@pytest.mark.parametrize('script', ['local.sh', 'tpu_vm.sh'])
def test_help_prints_usage(script):
  r = _run(script, '--help')
  assert r.returncode == 0 and 'Usage:' in r.stdout and '--dry-run' in r.stdout



# ---- local.sh really running: how it stops its processes and waits for them ----

# A stand-in for python: `-c CODE` runs python (local.sh picks its free port so); `-m
# imgcls_jax.main ...` prints, fails after a second when FAKE_FAIL is its process id, and on
# SIGTERM sleeps FAKE_SAVE seconds ("saving a checkpoint") before its last line and exit 0.
FAKE_PYTHON = f"""#!/usr/bin/env bash
if [[ $1 == -c ]]; then exec {shlex.quote(sys.executable)} "$@"; fi
for a; do case $a in --config.distributed.process_id=*) id=${{a#*=}};; esac; done
trap 'sleep ${{FAKE_SAVE:-1}}; echo "p$id saved; To resume, rerun"; exit 0' TERM
echo "p$id running"
if [[ ${{FAKE_FAIL:-}} == "$id" ]]; then sleep 1; echo "p$id failing"; exit 3; fi
while :; do sleep 0.1; done
"""


def _survivors(mark: str) -> list[int]:
  """Processes whose command line contains ``mark`` (a test's own temporary path)."""
  out = subprocess.run(['pgrep', '-f', mark], capture_output=True, text=True).stdout
  return [int(pid) for pid in out.split() if int(pid) != os.getpid()]


def _kill(pids: list[int]) -> None:
  for pid in pids:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


class _Launch:
  """``local.sh ARGS`` in the background; ``lines`` receives its output (stdout and stderr)."""

  def __init__(self, args: list[str], mark: str, env: dict[str, str] | None = None):
    self.mark, self.lines, self.seen = mark, queue.Queue(), []
    # SIGINT as at a terminal: a suite started in the background of a non-interactive shell
    # (e.g. `nohup ... &`) runs with it ignored, which bash then cannot trap (coreutils' env
    # resets it; a preexec_fn would fork a process JAX's threads share).
    self.proc = subprocess.Popen(['env', '--default-signal=INT', 'bash',
                                  os.path.join(REPO, 'launch', 'local.sh'), *args],
                                 cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self) -> None:
    for line in self.proc.stdout:
      self.lines.put(line)
    self.lines.put(None)

  def wait_for(self, text: str, timeout: float) -> str:
    """The first line (seen so far or next) that contains ``text``."""
    for line in self.seen:
      if text in line:
        return line
    deadline = time.monotonic() + timeout
    while True:
      try:
        line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
      except queue.Empty:
        raise AssertionError(f'no {text!r} after {timeout}s:\n' + ''.join(self.seen)) from None
      if line is None:
        raise AssertionError(f'output ended before {text!r}:\n' + ''.join(self.seen))
      self.seen.append(line)
      if text in line:
        return line

  def finish(self, timeout: float) -> tuple[int, str, list[int]]:
    """Its status, its whole output, and what of its processes outlived it (then killed)."""
    try:
      rc = self.proc.wait(timeout=timeout)
    finally:
      left = _survivors(self.mark)  # at once: the script must have waited for them
      _kill(left + ([self.proc.pid] if self.proc.poll() is None else []))
    while (line := self.lines.get(timeout=10)) is not None:
      self.seen.append(line)
    return rc, ''.join(self.seen), left


@pytest.fixture
def fake_python(tmp_path):
  path = tmp_path / 'fake python'  # the space: local.sh quotes it
  path.write_text(FAKE_PYTHON)
  path.chmod(0o755)
  yield str(path)
  _kill(_survivors(str(tmp_path)))


def test_local_a_failing_process_stops_the_others_and_waits_for_them(fake_python):
  env = {**os.environ, 'FAKE_FAIL': '1', 'FAKE_SAVE': '2'}
  run = _Launch(['-n', '3', '--python', fake_python, '--', '--workdir=/tmp/w'], fake_python, env)
  rc, out, left = run.finish(timeout=30)
  assert left == [], out   # the old script returned at once, the others still saving
  assert rc == 3, out      # the failure's status
  assert 'local.sh: process 1 exited with status 3; stopping the others.' in out
  assert 'local.sh: sent SIGTERM to process(es) 0 2; SIGKILL in 90s if still running.' in out
  for i in (0, 2):         # their output is not cut off: each one's last line arrives
    assert f'[p{i}] p{i} saved; To resume, rerun' in out
    assert f'local.sh: process {i} exited with status 0.' in out
  assert out.rstrip().endswith('local.sh: all processes have exited; status 3.')


def test_local_sigterm_stops_the_processes_and_returns_after_them(fake_python):
  run = _Launch(['-n', '2', '--python', fake_python, '--', '--workdir=/tmp/w'], fake_python,
                {**os.environ, 'FAKE_SAVE': '2'})
  run.wait_for('[p0] p0 running', 30)
  run.wait_for('[p1] p1 running', 30)
  started = time.monotonic()
  run.proc.send_signal(signal.SIGTERM)
  rc, out, left = run.finish(timeout=30)
  assert left == [] and rc == 143, out  # the old script: 130 at once, the processes left behind
  assert time.monotonic() - started >= 1.5, out  # it waited for their 2 s "checkpoint"
  assert 'local.sh: got SIGTERM; stopping the processes.' in out
  assert '[p0] p0 saved; To resume, rerun' in out and '[p1] p1 saved; To resume, rerun' in out


def test_local_sigkills_after_the_grace_period_and_at_a_second_signal(fake_python):
  env = {**os.environ, 'FAKE_SAVE': '60'}  # they would "save" for a minute
  args = ['-n', '2', '--python', fake_python, '--', '--workdir=/tmp/w']
  run = _Launch(['--grace', '1', *args], fake_python, env)
  run.wait_for('[p1] p1 running', 30)
  run.wait_for('[p0] p0 running', 30)
  run.proc.send_signal(signal.SIGINT)
  rc, out, left = run.finish(timeout=20)
  assert left == [] and rc == 130, out
  assert 'local.sh: still running 1s after SIGTERM; sent SIGKILL to process(es) 0 1.' in out
  assert 'local.sh: process 0 exited with status 137.' in out and 'saved' not in out
  assert 'Killed' not in out  # bash's own notices of the killed jobs stay out of the output

  run = _Launch(args, fake_python, env)  # the default grace, 90 s: a second Ctrl-C kills now
  run.wait_for('[p1] p1 running', 30)
  run.wait_for('[p0] p0 running', 30)
  run.proc.send_signal(signal.SIGINT)
  run.wait_for('sent SIGTERM', 10)
  time.sleep(0.5)  # bash drops a SIGINT that comes while its SIGINT trap still runs
  run.proc.send_signal(signal.SIGINT)
  rc, out, left = run.finish(timeout=20)
  assert left == [] and rc == 130, out
  assert 'local.sh: got SIGINT while stopping; sent SIGKILL to process(es) 0 1.' in out


def test_local_killed_outright_stops_its_processes(fake_python):
  """kill -9 of the launcher runs no trap: its processes trained on as orphans (and held the run
  directory's lock against the rerun). The kernel now sends each SIGTERM: they save and stop."""
  import shutil
  if not shutil.which('setpriv'):
    pytest.skip('no setpriv (util-linux) here')
  run = _Launch(['-n', '2', '--python', fake_python, '--', '--workdir=/tmp/w'], fake_python,
                {**os.environ, 'FAKE_SAVE': '0'})
  run.wait_for('[p0] p0 running', 30)
  run.wait_for('[p1] p1 running', 30)
  run.proc.send_signal(signal.SIGKILL)
  deadline = time.monotonic() + 20
  while _survivors(fake_python) and time.monotonic() < deadline:
    time.sleep(0.1)
  left = _survivors(fake_python)
  _kill(left)
  assert left == []


# ---- with two real training processes (2 x 1 CPU device, the default config on the digits) ----

def _train(tmp_path, tfds_dir: str, *local_args: str) -> _Launch:
  workdir = str(tmp_path / 'run')
  # A config file asking for 2 CPU devices: local.sh's --cpu-devices 1 must win.
  (tmp_path / 'two_devices.py').write_text(
      'from configs import default\n\n\ndef get_config():\n  c = default.get_config()\n'
      '  c.mesh.cpu_devices = 2\n  return c\n')
  args = ['-n', '2', '--cpu-devices', '1', *local_args, '--python', sys.executable, '--',
          f'--config={tmp_path / "two_devices.py"}', f'--workdir={workdir}',
          f'--config.data.data_dir={tfds_dir}', '--config.num_train_steps=100000',
          '--config.log_every_steps=1000', '--config.eval_every_steps=-1',
          '--config.eval_every_epochs=-1', '--config.checkpoint_every_epochs=-1',
          '--config.checkpoint_every_steps=-1', '--config.tensorboard=False']
  return _Launch(args, workdir, subprocess_env())


@pytest.mark.slow
def test_local_a_killed_process_leaves_no_other_behind(tmp_path, tfds_dir):
  run = _train(tmp_path, tfds_dir, '--grace', '5')
  run.wait_for('First training step done', 90)
  (victim,) = _survivors(f'{run.mark} .*process_id=1$')  # process 1's python
  os.kill(victim, signal.SIGKILL)
  rc, out, left = run.finish(timeout=60)
  assert left == [], out  # the old script returned at once; process 0 lived on for ~90 s
  assert rc == 137, out
  assert 'local.sh: process 1 exited with status 137; stopping the others.' in out
  assert re.search(r'local.sh: process 0 exited with status \d+\.', out), out


@pytest.mark.slow
def test_local_sigterm_lets_the_processes_save_and_say_how_to_resume(tmp_path, tfds_dir):
  run = _train(tmp_path, tfds_dir)
  run.wait_for('First training step done', 90)
  run.proc.send_signal(signal.SIGTERM)
  rc, out, left = run.finish(timeout=120)
  assert left == [] and rc == 143, out
  assert '1 local devices, 2 in all' in out and '2 local devices' not in out
  assert re.search(r'\[p0\] Stopped by SIGTERM.* at step \d+ of 100000; checkpoint saved in .*'
                   r'To resume, rerun the same launch command', out), out
  assert 'local.sh: process 0 exited with status 0.' in out
  assert 'local.sh: process 1 exited with status 0.' in out
  assert os.listdir(tmp_path / 'run' / 'checkpoints')
