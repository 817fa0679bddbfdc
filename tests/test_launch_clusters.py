"""launch/ scripts for clusters: slurm.sbatch and slurm_sweep.sbatch through their dry runs (no
cluster here), tpu_vm.sh through its dry run and against a stand-in gcloud whose "workers" are
this machine. (local.sh: tests/test_launch.py.)
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.test_launch import MAIN_ARGS, _after_main, _commands, _run


SLURM_ENV = {'SLURM_JOB_ID': '4321', 'SLURM_JOB_NODELIST': 'gpu[007-010],gpu012',
             'SLURM_JOB_NUM_NODES': '5', 'SLURM_GPUS_ON_NODE': '4', 'DRY_RUN': '1'}


def _jax_slurm_coordinator(monkeypatch) -> str:
  """The coordinator JAX's own SLURM detection derives from the same environment."""
  from jax._src.clusters.slurm_cluster import SlurmCluster
  monkeypatch.setenv('SLURM_STEP_NODELIST', SLURM_ENV['SLURM_JOB_NODELIST'])
  monkeypatch.setenv('SLURM_JOB_ID', SLURM_ENV['SLURM_JOB_ID'])
  return SlurmCluster.get_coordinator_address(None, None)


def test_slurm_dry_run_one_process_per_node(monkeypatch):
  r = _run('slurm.sbatch', *MAIN_ARGS, env={**SLURM_ENV, 'SLURM_NTASKS_PER_NODE': '1(x5)',
                                             'SLURM_CPUS_ON_NODE': '96'})
  assert r.returncode == 0, r.stderr
  print(r.stdout)
  export, argv = _commands(r.stdout)
  # srun >= 22.05 passes no --cpus-per-task on by itself: the one process gets all 96 CPUs.
  assert export == ['export', 'SRUN_CPUS_PER_TASK=96']
  assert argv[:5] == ['srun', '--kill-on-bad-exit=1', '--nodes=5', '--ntasks-per-node=1',
                      '--cpus-per-task=96']
  coordinator = _jax_slurm_coordinator(monkeypatch)
  assert coordinator == 'gpu007:61665'  # 4321 % 4096 + 61440
  assert _after_main(argv) == MAIN_ARGS + [
      '--config.distributed.enabled=True',
      f'--config.distributed.coordinator_address={coordinator}',
      '--config.distributed.local_device_ids=0,1,2,3']  # one process drives all 4 GPUs


def test_slurm_dry_run_one_process_per_gpu():
  r = _run('slurm.sbatch', '--dry-run', *MAIN_ARGS, env={**SLURM_ENV, 'SLURM_NTASKS_PER_NODE': '4',
                                                         'SLURM_CPUS_ON_NODE': '96'})
  assert r.returncode == 0, r.stderr
  export, argv = _commands(r.stdout)
  assert export == ['export', 'SRUN_CPUS_PER_TASK=24'] and '--cpus-per-task=24' in argv
  assert '--ntasks-per-node=4' in argv
  assert not any('local_device_ids' in a for a in argv)  # JAX: task i of a node drives GPU i
  assert _after_main(argv)[:len(MAIN_ARGS)] == MAIN_ARGS


def test_slurm_cpus_per_task_from_sbatch_or_the_dry_run_default():
  r = _run('slurm.sbatch', *MAIN_ARGS, env={**SLURM_ENV, 'SLURM_CPUS_PER_TASK': '12',
                                             'SLURM_CPUS_ON_NODE': '96'})  # sbatch -c 12 wins
  assert _commands(r.stdout)[0] == ['export', 'SRUN_CPUS_PER_TASK=12'], r.stderr
  assert '--cpus-per-task=12' in _commands(r.stdout)[1]
  r = _run('slurm.sbatch', *MAIN_ARGS, env={'DRY_RUN': '1', 'CPUS_ON_NODE': '32'})
  assert r.returncode == 0, r.stderr
  assert _commands(r.stdout)[0] == ['export', 'SRUN_CPUS_PER_TASK=32']
  assert '32 CPUs per process' in r.stdout


def _directives(script: str) -> dict[str, str]:
  """The script's ``#SBATCH --key[=value]`` lines as {key: value}."""
  with open(os.path.join(REPO, 'launch', script)) as f:
    return dict((m.group(1), m.group(2) or '') for line in f
                if (m := re.match(r'#SBATCH --([\w-]+)(?:=(\S+))?', line)))


def test_sbatch_scripts_ask_for_cpus_a_save_before_the_time_limit_and_requeueing():
  """Whole nodes (the CPUs feed the input pipeline; the default is often 1 CPU a task), SIGTERM
  300 s before the time limit (the run saves a checkpoint), requeued on preemption or node
  failure, the log appended to rather than truncated when requeued."""
  multi = _directives('slurm.sbatch')
  assert 'exclusive' in multi and multi['mem'] == '0'
  assert multi['signal'] == 'TERM@300'      # to the tasks (the srun step), not the batch shell
  assert 'requeue' in multi and multi['open-mode'] == 'append'
  sweep = _directives('slurm_sweep.sbatch')
  assert int(sweep['cpus-per-task']) >= 4
  assert sweep['signal'] == 'B:TERM@300'    # python is the batch shell itself (exec, no srun)
  assert 'requeue' in sweep and sweep['open-mode'] == 'append'
  for script in ('slurm.sbatch', 'slurm_sweep.sbatch', 'tpu_vm.sh', 'local.sh'):
    r = subprocess.run(['bash', '-n', os.path.join(REPO, 'launch', script)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def test_slurm_refuses_bad_layouts_and_running_outside_slurm():
  r = _run('slurm.sbatch', *MAIN_ARGS, env={**SLURM_ENV, 'SLURM_NTASKS_PER_NODE': '3'})
  assert r.returncode == 2 and 'must be 1 (per node) or the GPUs per node (4)' in r.stderr
  r = _run('slurm.sbatch', *MAIN_ARGS)
  assert r.returncode == 2 and 'not inside a SLURM job' in r.stderr


@pytest.mark.parametrize('env, example', [
    ({'TASKS_PER_NODE': '0'}, '1'),        # was bash's `division by 0` first
    ({'NODES': 'abc'}, '2'),               # went into srun --nodes=abc
    ({'GPUS_PER_NODE': '0'}, '8'),         # an empty local_device_ids=
    ({'GPUS_PER_NODE': 'a100:0'}, '8'),
    ({'CPUS_ON_NODE': 'many'}, '64'),
    ({'SLURM_NTASKS_PER_NODE': 'x(x2)'}, '1'),
], ids=lambda v: ' '.join(f'{k}={x}' for k, x in v.items()) if isinstance(v, dict) else None)
def test_slurm_dry_run_counts_must_be_positive_integers(env, example):
  ((name, value),) = env.items()
  r = _run('slurm.sbatch', *MAIN_ARGS, env={'DRY_RUN': '1', **env})
  assert r.returncode == 2 and r.stdout == '', r.stdout
  value = value.split(':')[-1].split('(')[0]
  assert r.stderr.strip() == (f"slurm.sbatch: {name} must be a positive integer (e.g. "
                              f"{name}={example}), not '{value}'.")


def _remote_main_args(ssh_argv: list[str]) -> list[str]:
  """MAIN_ARGS as the run's ``--command`` (a shell line with ``setsid bash -c 'TRAIN'``) passes
  them."""
  assert ssh_argv[-1].startswith('--command=')
  remote = shlex.split(ssh_argv[-1][len('--command='):])
  train = remote[remote.index('setsid') + 3]   # setsid bash -c 'TRAIN; echo $? > STATUS'
  train = train[:train.rindex('; echo $? >')]
  assert remote[remote.index('setsid') + 1:remote.index('setsid') + 3] == ['bash', '-c']
  return _after_main(shlex.split(train))


def test_tpu_vm_dry_run_prints_the_whole_lifecycle():
  r = _run('tpu_vm.sh', '--name', 'exp1', '--zone', 'us-central2-b', '--project', 'proj',
           '--accelerator-type', 'v4-32', '--spot', '--dry-run', 'all', '--', *MAIN_ARGS)
  assert r.returncode == 0, r.stderr
  print(r.stdout)
  cmds = _commands(r.stdout)
  where = ['--zone=us-central2-b', '--project=proj']
  assert cmds[0] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'exp1', *where,
                     '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base', '--spot']
  files = '/tmp/imgcls_jax-exp1.tgz.files'
  assert cmds[1][:3] == ['git', '-C', REPO] and cmds[1][-2:] == ['>', files]
  assert 'ls-files' in cmds[1] and '--exclude-standard' in cmds[1]
  assert cmds[2][:2] == ['tar', '-czf'] and cmds[2][-5:] == ['-C', REPO, '--null', '-T', files]
  assert cmds[3][:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'] and '--worker=all' in cmds[3]
  ssh = [c for c in cmds if c[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']]
  assert len(ssh) == 4  # unpack, install, run, follow the log
  assert all('--worker=all' in c for c in ssh[:3]) and '--worker=0' in ssh[3]
  install = ssh[1][-1]
  assert 'uv pip install' in install and "jax[tpu]" in install
  run_cmd = ssh[2][-1]   # detached: a dropped SSH connection leaves it running
  assert 'nohup setsid bash -c' in run_cmd and '> ~/imgcls_run.log 2>&1 < /dev/null &' in run_cmd
  assert _remote_main_args(ssh[2]) == MAIN_ARGS + ['--config.distributed.enabled=True']
  assert 'tail -n +1 --pid=' in ssh[3][-1]
  assert cmds[-1] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'exp1', *where, '--quiet']


@pytest.mark.parametrize('accel, version', [
    ('v4-8', 'tpu-ubuntu2204-base'), ('v3-32', 'tpu-ubuntu2204-base'),
    ('v5litepod-16', 'v2-alpha-tpuv5-lite'), ('v5p-8', 'v2-alpha-tpuv5'),
    ('v6e-8', 'v2-alpha-tpuv6e')])
def test_tpu_vm_software_version_follows_the_accelerator_type(accel, version):
  """https://cloud.google.com/tpu/docs/runtimes; --version (or RUNTIME_VERSION) overrides it."""
  r = _run('tpu_vm.sh', '--zone=z', f'--accelerator-type={accel}', '--dry-run', 'create')
  assert r.returncode == 0, r.stderr
  assert f'--version={version}' in _commands(r.stdout)[0]
  r = _run('tpu_vm.sh', '--zone=z', f'--accelerator-type={accel}', '--version=mine', '--dry-run',
           'create')
  assert '--version=mine' in _commands(r.stdout)[0]
  r = _run('tpu_vm.sh', '--zone=z', f'--accelerator-type={accel}', '--dry-run', 'create',
           env={'RUNTIME_VERSION': 'env-version'})
  assert '--version=env-version' in _commands(r.stdout)[0]


def test_tpu_vm_single_actions_and_errors():
  r = _run('tpu_vm.sh', '--zone', 'z', '--name', 'n', '--dry-run', 'run', '--', *MAIN_ARGS)
  assert r.returncode == 0 and len(_commands(r.stdout)) == 1
  r = _run('tpu_vm.sh', '--zone', 'z', '--worker=2', '--dry-run', 'logs')
  (logs,) = _commands(r.stdout)
  assert '--worker=2' in logs and logs[-1].startswith('--command=')
  r = _run('tpu_vm.sh', '--zone', 'z', '--dry-run', 'stop')
  (stop,) = _commands(r.stdout)
  assert '--worker=all' in stop and 'pkill -TERM -P' in stop[-1]
  r = _run('tpu_vm.sh', '--zone', 'z', '--accelerator-type', 'tpu7x-8', '--dry-run', 'create')
  assert r.returncode == 2 and 'no default TPU software version' in r.stderr
  assert 'give --version' in r.stderr
  r = _run('tpu_vm.sh', '--zone', 'z', '--worker', 'w1', '--dry-run', 'logs')
  assert r.returncode == 2 and '--worker must be a worker number' in r.stderr
  r = _run('tpu_vm.sh', '--dry-run', 'create')
  assert r.returncode == 2 and 'give --zone' in r.stderr
  r = _run('tpu_vm.sh', '--zone', 'z', '--dry-run', 'run')
  assert r.returncode == 2 and 'no arguments for imgcls_jax.main' in r.stderr
  r = _run('tpu_vm.sh', '--zone', 'z', 'launch')
  assert r.returncode == 2 and "unknown argument 'launch'" in r.stderr
  # --opt=value, as the README and the script's own hint write it, is --opt value.
  spaced = _run('tpu_vm.sh', '--zone', 'z', '--accelerator-type', 'v4-32', '--dry-run', 'create')
  joined = _run('tpu_vm.sh', '--zone=z', '--accelerator-type=v4-32', '--dry-run', 'create')
  assert joined.returncode == 0, joined.stderr
  assert _commands(joined.stdout) == _commands(spaced.stdout)
  assert '--accelerator-type=v4-32' in _commands(joined.stdout)[0]


def test_tpu_vm_refuses_more_than_one_action():
  """The usage gives one ACTION: `create delete` ran only the delete, `run logs` never started the
  run."""
  for actions in (['create', 'delete'], ['run', 'logs'], ['stop', 'stop', 'delete']):
    r = _run('tpu_vm.sh', '--zone', 'z', '--dry-run', *actions, '--', *MAIN_ARGS)
    assert r.returncode == 2 and r.stdout == '', r.stdout
    assert r.stderr.strip() == (f'tpu_vm.sh: give one ACTION, not {len(actions)} '
                                f'({" ".join(actions)}); run tpu_vm.sh once for each, or use all.')


# ---- tpu_vm.sh really running, against a stand-in gcloud whose "workers" are this machine ----

# `ssh --command=C` runs C with HOME set to the fake worker's home; `scp SRC NAME:DEST` copies SRC
# there; every call is logged.
FAKE_GCLOUD = """#!/usr/bin/env bash
echo "gcloud $*" >> "$FAKE_LOG"
case "$4" in
  ssh) for a; do case $a in --command=*) cmd=${a#--command=};; esac; done
       cd "$FAKE_HOME" && HOME="$FAKE_HOME" exec bash -c "$cmd" ;;
  scp) cp "$5" "$FAKE_HOME/${6#*:}" ;;
esac
"""
# The worker's python: prints its arguments; exits FAKE_EXIT after a second, else runs until
# SIGTERM, when it "saves a checkpoint" and exits 0.
FAKE_WORKER_PYTHON = """#!/usr/bin/env bash
trap 'echo "saved a checkpoint"; exit 0' TERM
printf 'arg:%s\\n' "$@"
if [[ -n ${FAKE_EXIT:-} ]]; then sleep 1; exit "$FAKE_EXIT"; fi
while :; do sleep 0.1; done
"""


@pytest.fixture
def fake_tpu(tmp_path):
  """(a git checkout holding launch/tpu_vm.sh, the environment for it, the fake worker's home)."""
  repo, home, bin_dir = tmp_path / 'repo', tmp_path / 'home', tmp_path / 'bin'
  for d in (repo / 'launch', home / '.local' / 'bin', home / 'imgcls_venv' / 'bin', bin_dir,
            home / 'imgcls_jax'):
    d.mkdir(parents=True)
  for path, text in ((bin_dir / 'gcloud', FAKE_GCLOUD),
                     (home / 'imgcls_venv' / 'bin' / 'python', FAKE_WORKER_PYTHON),
                     (home / '.local' / 'bin' / 'uv', '#!/bin/sh\n')):
    path.write_text(text)
    path.chmod(0o755)
  with open(os.path.join(REPO, 'launch', 'tpu_vm.sh')) as f:
    (repo / 'launch' / 'tpu_vm.sh').write_text(f.read())
  env = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'FAKE_HOME': str(home),
         'FAKE_LOG': str(tmp_path / 'gcloud.log'), 'GIT_CONFIG_GLOBAL': os.devnull}
  name = f'imgcls-test-{os.getpid()}'
  yield repo, env, home, ['--name', name, '--zone', 'z']
  pid_file = home / 'imgcls_run.pid'
  if pid_file.exists():   # a run the test left going: its process group (setsid: its own)
    try:
      os.killpg(int(pid_file.read_text()), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass
  for path in (f'/tmp/imgcls_jax-{name}.tgz', f'/tmp/imgcls_jax-{name}.tgz.files'):
    if os.path.exists(path):
      os.remove(path)


def _tpu(repo, env, *args) -> subprocess.CompletedProcess:
  return subprocess.run(['bash', str(repo / 'launch' / 'tpu_vm.sh'), *args], cwd=repo, env=env,
                        capture_output=True, text=True, timeout=60)


def test_tpu_vm_all_copies_the_sources_only_runs_follows_and_deletes(fake_tpu):
  repo, env, home, where = fake_tpu
  kept = ['launch/tpu_vm.sh', 'imgcls_jax/a.py', 'benchmarks/b.py', 'notes.txt', '.gitignore']
  left = ['runs/r1/checkpoints/1/state', 'benchmarks/.data/big.bin', 'benchmarks/.vendor/v.js',
          'node_modules/m.js', 'imgcls_jax/__pycache__/a.cpython-311.pyc', 'arrays.npz',
          'weights.safetensors', '.venv/bin/python', 'debug.log']
  for rel in kept[1:] + left:
    (repo / rel).parent.mkdir(parents=True, exist_ok=True)
    (repo / rel).write_text(rel)
  (repo / '.gitignore').write_text('*.log\n')
  subprocess.run(['git', 'init', '-q', str(repo)], check=True, env=env)
  subprocess.run(['git', '-C', str(repo), 'add', 'launch', 'imgcls_jax/a.py', '.gitignore'],
                 check=True, env=env)
  r = _tpu(repo, {**env, 'FAKE_EXIT': '3'}, *where, 'all', '--', *MAIN_ARGS)
  print(r.stdout, r.stderr)
  assert r.returncode == 3, r.stderr   # the run's status
  copied = sorted(str(p.relative_to(home / 'imgcls_jax'))
                  for p in (home / 'imgcls_jax').rglob('*') if p.is_file())
  assert copied == sorted(kept)
  assert [line[len('arg:'):] for line in r.stdout.splitlines() if line.startswith('arg:')] == [
      '-m', 'imgcls_jax.main', *MAIN_ARGS, '--config.distributed.enabled=True']
  assert 'the run ended with status 3 on every worker' in r.stdout
  with open(env['FAKE_LOG']) as f:
    calls = f.read().splitlines()
  assert [c.split()[4] for c in calls] == ['create', 'scp', 'ssh', 'ssh', 'ssh', 'ssh', 'ssh',
                                           'delete']


def test_tpu_vm_run_is_detached_and_followed_stopped_by_logs_and_stop(fake_tpu):
  """A dropped SSH connection must not stop training: the run outlives the command that started
  it, in a session of its own; `logs` shows it, `stop` makes it save and exit."""
  repo, env, home, where = fake_tpu
  r = _tpu(repo, env, *where, 'run', '--', *MAIN_ARGS)
  assert r.returncode == 0, r.stderr
  assert 'output in ~/imgcls_run.log' in r.stdout
  pid = int((home / 'imgcls_run.pid').read_text())
  os.kill(pid, 0)                      # still running after tpu_vm.sh (the "ssh") has exited
  # Its own session, so no hangup reaches it. `$!` is nohup's pid, which execs setsid, which calls
  # setsid(2): on a loaded machine that comes a moment after tpu_vm.sh returns.
  deadline = time.monotonic() + 20
  while os.getsid(pid) != pid and time.monotonic() < deadline:
    time.sleep(0.05)
  assert os.getsid(pid) == pid
  r = _tpu(repo, env, *where, 'run', '--', *MAIN_ARGS)
  assert r.returncode != 0 and 'a run is still going on' in r.stderr
  deadline = time.monotonic() + 20       # started (its SIGTERM trap set) before it is stopped
  while 'arg:' not in (home / 'imgcls_run.log').read_text() and time.monotonic() < deadline:
    time.sleep(0.1)
  r = _tpu(repo, env, *where, 'stop')
  assert r.returncode == 0 and 'sent SIGTERM to the run' in r.stdout, r.stderr
  deadline = time.monotonic() + 20
  while not (home / 'imgcls_run.status').exists() and time.monotonic() < deadline:
    time.sleep(0.1)
  assert (home / 'imgcls_run.status').read_text().strip() == '0'
  r = _tpu(repo, env, *where, 'logs')
  assert r.returncode == 0, r.stderr
  assert 'arg:--workdir=/shared/runs/exp 1' in r.stdout and 'saved a checkpoint' in r.stdout
  assert r.stdout.rstrip().endswith(': 0')


def test_tpu_vm_stop_with_no_run_going_says_so(fake_tpu):
  """No pid file printed pkill's usage text; a run that had ended, nothing at all (status 1)."""
  repo, env, home, where = fake_tpu
  no_run = f'tpu_vm.sh: no run is going on {os.uname().nodename}, so there is nothing to stop.'
  r = _tpu(repo, env, *where, 'stop')                   # none ever started
  assert (r.returncode, r.stdout.strip(), r.stderr) == (0, no_run, '')
  r = _tpu(repo, {**env, 'FAKE_EXIT': '0'}, *where, 'run', '--', *MAIN_ARGS)
  assert r.returncode == 0, r.stderr
  pid = int((home / 'imgcls_run.pid').read_text())
  deadline = time.monotonic() + 20                      # the run ends by itself
  while time.monotonic() < deadline:
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      break
    time.sleep(0.1)
  assert (home / 'imgcls_run.status').read_text().strip() == '0'
  r = _tpu(repo, env, *where, 'stop')
  assert (r.returncode, r.stdout.strip(), r.stderr) == (0, no_run, '')



def test_slurm_sweep_gives_each_array_task_its_shard():
  env = {'SLURM_ARRAY_TASK_ID': '7', 'SLURM_ARRAY_TASK_MIN': '5', 'SLURM_ARRAY_TASK_COUNT': '3',
         'PYTHON': sys.executable}
  r = _run('slurm_sweep.sbatch', '--dry-run', *MAIN_ARGS, env=env)
  assert r.returncode == 0, r.stderr
  (argv,) = _commands(r.stdout)
  assert argv[:3] == [sys.executable, '-m', 'imgcls_jax.main']
  assert _after_main(argv) == MAIN_ARGS + ['--config.sweep.shard=2/3']
  r = _run('slurm_sweep.sbatch', *MAIN_ARGS, env={**env, 'SLURM_ARRAY_TASK_STEP': '2'})
  assert r.returncode == 2 and 'not in a contiguous array of 3 tasks' in r.stderr
  r = _run('slurm_sweep.sbatch', *MAIN_ARGS)
  assert r.returncode == 2 and 'not a task of a SLURM job array' in r.stderr
  r = _run('slurm_sweep.sbatch', env=env)
  assert r.returncode == 2 and 'no arguments for imgcls_jax.main' in r.stderr
